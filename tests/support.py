"""Real parts for end-to-end tests: free ports, recording upstreams, a gateway process.

Everything listens on 127.0.0.1 with ephemeral ports, so tests can run side by side.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port where connections are refused for as long as this lasts: bound, never
    listening, so no server started later in the run can take it (a port from `free_port`
    could be reused and stop being "down")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


# A stream whose framing is deliberately awkward: an event split across writes, a
# multi-byte character split in the middle, CRLF endings, a comment and a keep-alive.
AWKWARD_STREAM: tuple[bytes, ...] = (
    b'data: {"choices":[{"delta":{"content":"Hel',
    b'lo"}}]}\n\n',
    b": keep-alive comment\r\n\r\n",
    'data: {"choices":[{"delta":{"content":"caf\u00e9 \u2603"}}]}\n\n'.encode()[:-12],
    'data: {"choices":[{"delta":{"content":"caf\u00e9 \u2603"}}]}\n\n'.encode()[-12:],
    b'event: message\r\ndata: {"choices":[{"delta":{},"finish_reason":"stop"}]}\r\n\r\n',
    b"data: [DONE]\n\n",
)


@dataclass
class RecordingUpstream:
    """An HTTP backend in its own thread that records what it receives.

    Any path answers JSON naming this upstream. ``x-test-stream: N`` streams
    ``AWKWARD_STREAM`` with N ms between writes; ``x-test-sleep-ms`` delays the answer.
    """

    name: str
    port: int = 0
    received: list[Received] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                request.method,
                request.path_qs,
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )
        )
        sleep_ms = float(request.headers.get("x-test-sleep-ms", "0"))
        if sleep_ms:
            await asyncio.sleep(sleep_ms / 1000)
        if "x-test-stream" in request.headers:
            gap = float(request.headers["x-test-stream"]) / 1000
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            for index, chunk in enumerate(AWKWARD_STREAM):
                if index:
                    await asyncio.sleep(gap)
                await response.write(chunk)
            await response.write_eof()
            return response
        return web.json_response({"upstream": self.name, "path": request.path_qs})

    def start(self) -> RecordingUpstream:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", self.port)
            loop.run_until_complete(site.start())
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())

        self._thread = threading.Thread(target=serve, name=f"upstream-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def last(self) -> Received:
        assert self.received, f"upstream {self.name} received nothing"
        return self.received[-1]


@dataclass
class DemoUpstreamThread:
    """The built-in demo upstream, run in a thread for SDK tests."""

    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def start(self, chunk_delay_ms: float = 5.0) -> DemoUpstreamThread:
        from checkstream.demo import start_demo_upstream

        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            upstream = loop.run_until_complete(start_demo_upstream("127.0.0.1", 0, chunk_delay_ms))
            self.port = upstream.port
            ready.set()
            loop.run_forever()
            loop.run_until_complete(upstream.close())

        self._thread = threading.Thread(target=serve, name="demo-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


def gateway_ports() -> dict[str, int]:
    return {
        "port": free_port(),
        "admin_port": free_port(),
        "extproc_port": free_port(),
        "envoy_admin_port": free_port(),
    }


@dataclass
class Gateway:
    """``checkstream run -c FILE`` as a child process, like a user starts it."""

    config_path: Path
    port: int
    envoy_admin_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The log as JSON Lines records (every line must be one)."""
        return [json.loads(line) for line in self.log().splitlines() if line]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == event]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise


def write_config(directory: Path, config: dict[str, Any], name: str = "checkstream.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_policy(directory: Path, name: str, rules: list[tuple[str, str, str]]) -> Path:
    """A policy file with (rule name, classifier, action) rules, thresholds left to defaults."""
    path = directory / name
    policies = [
        {"name": rule, "trigger": {"classifier": classifier, "threshold": 0.5}, "action": action}
        for rule, classifier, action in rules
    ]
    path.write_text(yaml.safe_dump({"version": "1.0", "name": name, "policies": policies}))
    return path


# The launcher's line once everything serves (JSON log format, the default off a terminal).
LISTENING = '"event": "listening"'


def start_gateway(
    config_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 40,
    args: Sequence[str] = (),
) -> Gateway:
    loaded = yaml.safe_load(config_path.read_text())
    server = loaded["server"]
    log_path = config_path.with_suffix(".log")
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "checkstream", "run", "-c", str(config_path), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    gateway = Gateway(config_path, server["port"], server["envoy_admin_port"], process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gateway.log()}")
        if LISTENING in gateway.log():
            return gateway
        time.sleep(0.05)
    gateway.stop(signal.SIGKILL)
    raise RuntimeError(f"gateway did not start:\n{gateway.log()}")


@contextmanager
def running_gateway(config_path: Path, env: dict[str, str] | None = None) -> Iterator[Gateway]:
    gateway = start_gateway(config_path, env)
    try:
        yield gateway
    finally:
        gateway.stop()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
    timeout: float = 20,
) -> Reply:
    """One HTTP request; error statuses are returned, not raised."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    if data is not None and "Content-Type" not in req.headers:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Reply(
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` for what happens asynchronously (log lines, hang-ups, followers);
    False if it never held within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def child_processes(pid: int) -> dict[int, str]:
    """Direct children of ``pid`` and their command lines, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found
