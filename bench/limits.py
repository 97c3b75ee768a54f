"""What rate limits, usage accounting and budgets cost: the limiter alone, then the gateway.

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/limits.py [--rounds 4] [--requests 3000] [--concurrency 16]
                                     [--json out.json] [--keep-logs]

Part 1, in this process: the cost per request of each store, after a warm-up:

- limiter: ``acquire`` + ``finish`` (rpm, tpm and concurrency limits, high enough never to
  refuse), without and with a budget riding along (``+budget``), ``MemoryLimiter`` and
  ``RedisLimiter`` against a loopback ``redis-server`` this script starts (no persistence);
- the usage ledger: ``record`` (SQLite, WAL, ``synchronous=FULL``, one commit per batch).

Each is run one request at a time (wall µs per request: the latency it adds) and with
``--concurrency`` tasks (CPU µs per request of this process, all threads, and of
redis-server: what it costs a 2-core machine's throughput).

Part 2, through real gateways (``python -m checkstream run -c <temp config>``), the demo upstream
(``--chunk-delay-ms 0``) and the same redis-server, all on 127.0.0.1. Non-streamed
``POST /v1/chat/completions`` (the demo answers with its usage), tenant by ``X-Tenant-ID``:

| setup | gateway | tenant config |
| --- | --- | --- |
| ``off`` | A: ``usage: {enabled: false}``, ``limits.backend: memory`` | nothing (the baseline) |
| ``mem-only`` | A | rate_limit + budget, memory: limits without the usage ledger |
| ``usage`` | B: usage on (SQLite ledger), memory | nothing: usage accounting only |
| ``memory`` | B | rate_limit + budget, memory |
| ``redis`` | C: usage on, ``limits: {backend: redis}`` | rate_limit + budget, Redis |

``rate_limit`` is ``requests_per_minute`` 10,000,000, ``tokens_per_minute`` 1,000,000,000,
``max_concurrent_requests`` 1000 and ``budget.monthly_usd`` 1e9 (with a price for the demo
model, so every request is charged): high enough never to refuse, which is checked (every
answer must be 200, limited setups must carry ``x-ratelimit-limit``, the ledgers must hold
the requests and the gateway logs no store failure).

All setups stay up and are measured in interleaved rounds (as ``passthrough.py``): p50 of
one request at a time, then req/s with ``--concurrency`` keep-alive connections. Reported
per setup: req/s (median over rounds), throughput as % of ``off`` and of ``usage`` (medians
of the per-round ratios, which cancel most of the noise of other work on the machine), CPU µs
per request of extproc, Envoy and redis-server, and ext_proc messages per request (from each
gateway Envoy's ``ext_proc`` stats).

Targets (issue #6; PASS/FAIL printed, exit code 0 either way): limits cost <= 10% of
throughput with the memory backend and <= 25% with Redis on loopback, i.e. ``memory`` >= 90%
and ``redis`` >= 75% of ``off``. The same ratios against ``usage`` are printed next to them:
they separate the limiter and budget work from the cost of reading every answer's usage,
which any counted tenant pays.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import passthrough as pt  # bench/ is sys.path[0] when this file is run as a script
import yaml
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
)

from checkstream.config.model import LimitsConfig, RateLimitConfig, load_config
from checkstream.gateway.runtime import Runtime
from checkstream.gateway.server import ExternalProcessor
from checkstream.ledger.usage import UsageLedger, UsageRecord, period_of
from checkstream.limits import build_limiter
from checkstream.limits.base import Limiter
from checkstream.limits.decisions import Budget, Charge, to_nano
from checkstream.limits.memory import MemoryLimiter

HOST = pt.HOST
TARGET_MEMORY_PCT = 90.0
TARGET_REDIS_PCT = 75.0
MODEL = str(pt.PROMPT["model"])
RATE_LIMIT = {
    "requests_per_minute": 10_000_000,
    "tokens_per_minute": 1_000_000_000,
    "max_concurrent_requests": 1000,
}
BUDGET = {"monthly_usd": 1e9}
PRICING = {MODEL: {"input": 0.15, "output": 0.6}}
# Events a gateway logs when a store fails (accounting.store_failed).
STORE_FAILURES = ("limiter_error", "usage_ledger_error", "audit_error")

# name, gateway, tenant, limited
SETUPS = [
    ("off", "A", "off", False),
    ("mem-only", "A", "mem-only", True),
    ("usage", "B", "usage", False),
    ("memory", "B", "memory", True),
    ("redis", "C", "redis", True),
]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- part 1: the stores alone ---------------------------------------------------------------


@dataclass
class StoreCost:
    name: str
    seq_wall_us: float = float("nan")  # one request at a time: latency added per request
    conc_wall_us: float = float("nan")  # --concurrency tasks: wall time / requests
    conc_cpu_us: float = float("nan")  # this process (all threads) per request
    conc_redis_us: float = float("nan")  # redis-server per request (Redis stores)


async def _timed(
    step: Callable[[], Awaitable[None]], count: int, tasks: int, redis_pid: int | None
) -> tuple[float, float, float]:
    """(wall µs, CPU µs of this process, CPU µs of redis-server) per step."""

    async def worker(n: int) -> None:
        for _ in range(n):
            await step()

    per_task = max(1, count // tasks)
    redis_before = pt.cpu_seconds(redis_pid) if redis_pid else 0.0
    cpu_before, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(per_task) for _ in range(tasks)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_before
    redis = (pt.cpu_seconds(redis_pid) - redis_before) if redis_pid else 0.0
    done = per_task * tasks
    return wall / done * 1e6, cpu / done * 1e6, redis / done * 1e6


async def _measure(
    name: str,
    step: Callable[[], Awaitable[None]],
    count: int,
    concurrency: int,
    redis_pid: int | None,
) -> StoreCost:
    await _timed(step, max(50, count // 10), concurrency, None)  # warm-up
    cost = StoreCost(name)
    cost.seq_wall_us, _, _ = await _timed(step, count, 1, None)
    cost.conc_wall_us, cost.conc_cpu_us, redis = await _timed(step, count, concurrency, redis_pid)
    cost.conc_redis_us = redis if redis_pid else float("nan")
    return cost


def _limiter_step(limiter: Limiter, with_budget: bool) -> Callable[[], Awaitable[None]]:
    """One request's limiter work: ``acquire`` then ``finish`` (with the budget check and
    charge riding along when ``with_budget``), as ``extproc/accounting/accounts.py`` does it."""
    limits = RateLimitConfig.model_validate(RATE_LIMIT)
    period = period_of(time.time())
    budget = Budget(period, to_nano(1e9)) if with_budget else None
    charge = Charge(period, to_nano(0.0000123)) if with_budget else None

    async def step() -> None:
        decision = await limiter.acquire("bench", limits, 1027, budget=budget)
        if not decision.allowed:
            raise RuntimeError(f"the limiter refused: {decision}")
        await limiter.finish("bench", limits, 1027, 42, charge=charge, lease=decision.lease)

    return step


def _ledger_step(ledger: UsageLedger) -> Callable[[], Awaitable[None]]:
    async def step() -> None:
        now = time.time()
        await ledger.record(UsageRecord(now, "r", "bench", MODEL, 12, 30, False, 200, 1.5, 2e-5))

    return step


async def part1(
    redis_url: str, redis_pid: int, workdir: Path, args: argparse.Namespace
) -> list[StoreCost]:
    n, c = args.store_requests, args.concurrency
    costs = []
    for with_budget in (False, True):
        suffix = " +budget" if with_budget else ""
        memory = MemoryLimiter()
        step = _limiter_step(memory, with_budget)
        costs.append(await _measure(f"MemoryLimiter{suffix}", step, n * 5, c, None))
        redis_limiter = build_limiter(LimitsConfig(backend="redis", url=redis_url))
        try:
            step = _limiter_step(redis_limiter, with_budget)
            costs.append(await _measure(f"RedisLimiter{suffix}", step, n, c, redis_pid))
        finally:
            await redis_limiter.aclose()
    ledger = UsageLedger.open(workdir / "part1-usage.db")
    try:
        costs.append(await _measure("UsageLedger.record", _ledger_step(ledger), n // 4, c, None))
    finally:
        await ledger.aclose()
    return costs


# -- part 2: gateways --------------------------------------------------------------------------


def _redis_ping(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=0.5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


def start_redis(procs: pt.Processes) -> pt.Service:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not installed (apt-get install -y redis-server)")
    port = pt.free_port()
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    service = procs.spawn("redis", argv, port)
    procs.wait_until(service, lambda: _redis_ping(port), "redis-server")
    return service


def gateway_config(
    upstream_port: int, usage: bool, redis_url: str | None, usage_path: str
) -> dict[str, Any]:
    backend = f"http://{HOST}:{upstream_port}/v1"
    limited = {"backend_url": backend, "rate_limit": RATE_LIMIT, "budget": BUDGET}
    server = {
        "host": HOST,
        "port": pt.free_port(),
        "admin_port": pt.free_port(),
        "extproc_port": pt.free_port(),
        "envoy_admin_port": pt.free_port(),
        "drain_timeout_s": 2,
    }
    return {
        "server": server,
        "limits": {"backend": "redis", "url": redis_url} if redis_url else {"backend": "memory"},
        "usage": {"enabled": True, "path": usage_path} if usage else {"enabled": False},
        "pricing": PRICING,
        "tenants": {
            "resolution": [{"header": "X-Tenant-ID"}],
            "configs": {
                "off": {"backend_url": backend},
                "usage": {"backend_url": backend},
                "mem-only": limited,
                "memory": limited,
                "redis": limited,
            },
        },
    }


def start_gateway(procs: pt.Processes, name: str, config: dict[str, Any]) -> pt.Service:
    server = config["server"]
    path = procs.workdir / f"gateway-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "checkstream", "run", "-c", str(path)]
    service = procs.spawn(f"gateway-{name}", argv, server["port"])
    service.admin_port = server["envoy_admin_port"]
    port = server["port"]
    procs.wait_until(
        service,
        lambda: pt._http_status(f"http://{HOST}:{port}/healthz") == 200,
        f"gateway {name}",
    )
    procs.adopt_children(service)
    return service


@dataclass
class Setup:
    name: str
    gateway: pt.Service
    tenant: str
    limited: bool
    redis: pt.Service
    request: bytes = b""
    latencies: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    requests_sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    msgs: dict[str, int] = field(default_factory=dict)  # ext_proc stats deltas, summed

    def __post_init__(self) -> None:
        self.request = pt.build_request(self.gateway.port, pt.PROMPT, {"X-Tenant-ID": self.tenant})

    def pids(self) -> dict[str, list[int]]:
        kinds: dict[str, list[int]] = {"redis": [self.redis.process.pid]}
        for pid in self.gateway.pids:
            kinds.setdefault(pt.process_name(pid), []).append(pid)
        return kinds


def check_setup(setup: Setup) -> None:
    """One request: 200, and X-RateLimit-* exactly when the tenant is limited."""
    request = urllib.request.Request(
        f"http://{HOST}:{setup.gateway.port}{pt.PATH}",
        data=json.dumps(pt.PROMPT).encode(),
        headers={"Content-Type": "application/json", "X-Tenant-ID": setup.tenant},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()
        status, has_limit = response.status, response.headers.get("x-ratelimit-limit")
    if status != 200 or bool(has_limit) != setup.limited:
        raise RuntimeError(
            f"{setup.name}: status {status}, x-ratelimit-limit {has_limit!r} "
            f"(limited: {setup.limited})"
        )


def sequential(setup: Setup, count: int, record: bool) -> None:
    client = pt.BlockingClient(setup.gateway.port)
    try:
        for _ in range(count):
            status, _, total, _ = client.send(setup.request)
            if status != 200:
                raise RuntimeError(f"{setup.name}: HTTP {status}")
            if record:
                setup.latencies.append(total)
    finally:
        client.close()


def throughput(setup: Setup, args: argparse.Namespace) -> None:
    pids = setup.pids()
    before = {kind: sum(pt.cpu_seconds(p) for p in ps) for kind, ps in pids.items()}
    stats_before = pt.ext_proc_stats(setup.gateway.admin_port or 0)
    state, elapsed = pt.run_load(
        setup.gateway.port, setup.request, args.requests, args.concurrency, args.max_seconds
    )
    stats_after = pt.ext_proc_stats(setup.gateway.admin_port or 0)
    after = {kind: sum(pt.cpu_seconds(p) for p in ps) for kind, ps in pids.items()}
    done = max(1, state.done)
    setup.rps.append(state.done / elapsed)
    setup.requests_sent += state.done
    for status, n in state.statuses.items():
        setup.statuses[status] = setup.statuses.get(status, 0) + n
    for kind in before:
        setup.cpu_us.setdefault(kind, []).append((after[kind] - before[kind]) / done * 1e6)
    for key, value in stats_after.items():
        setup.msgs[key] = setup.msgs.get(key, 0) + value - stats_before.get(key, 0)


def fetch_answer(port: int) -> bytes:
    """The demo upstream's answer to the benchmark's request (with its usage)."""
    request = urllib.request.Request(
        f"http://{HOST}:{port}{pt.PATH}",
        data=json.dumps(pt.PROMPT).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return bytes(response.read())


def ledger_counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT tenant, COUNT(*) FROM usage GROUP BY tenant").fetchall()
    finally:
        conn.close()
    return {tenant: int(n) for tenant, n in rows}


def verify(setups: list[Setup], ledgers: dict[str, Path], procs: pt.Processes) -> list[str]:
    """What says the measured traffic was not what it should be (empty when all is well)."""
    problems = []
    for setup in setups:
        if setup.statuses:
            problems.append(f"{setup.name}: non-200 answers under load {setup.statuses}")
    counts = {gw: ledger_counts(path) for gw, path in ledgers.items()}
    for setup in setups:
        gateway = setup.gateway.name.removeprefix("gateway-")
        if gateway in counts and counts[gateway].get(setup.tenant, 0) < setup.requests_sent:
            problems.append(
                f"{setup.name}: ledger has {counts[gateway].get(setup.tenant, 0)} rows for "
                f"{setup.requests_sent} requests under load"
            )
    for service in procs.services:
        if service.name.startswith("gateway-"):
            text = service.log.read_text(errors="replace")
            for marker in STORE_FAILURES:
                if marker in text:
                    problems.append(f"{service.name} logged {marker!r}")
    return problems


# -- part 3: extproc's own work, without gRPC ------------------------------------------------


def _headers(pairs: list[tuple[str, str]]) -> HttpHeaders:
    values = [HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
    return HttpHeaders(headers=HeaderMap(headers=values))


def exchange_messages(tenant: str, counted: bool, answer: bytes) -> list[bytes]:
    """The serialized messages Envoy sends extproc for one request of ``tenant``: request
    headers only for a tenant nothing counts, else also the buffered request body, the
    response headers, the answer and an empty end-of-stream chunk (5, as Envoy's stats say)."""
    body = json.dumps(pt.PROMPT, separators=(",", ":")).encode()
    request_headers = [
        (":method", "POST"),
        (":path", pt.PATH),
        (":authority", f"{HOST}:10000"),
        (":scheme", "http"),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("x-tenant-id", tenant),
        ("x-request-id", "0f5b8f8e-4f8a-4b8e-9a77-0f6f2f1f3a4b"),
    ]
    out = [ProcessingRequest(request_headers=_headers(request_headers))]
    if counted:
        ctype = "application/json; charset=utf-8"
        out += [
            ProcessingRequest(request_body=HttpBody(body=body, end_of_stream=True)),
            ProcessingRequest(
                response_headers=_headers([(":status", "200"), ("content-type", ctype)])
            ),
            ProcessingRequest(response_body=HttpBody(body=answer)),
            ProcessingRequest(response_body=HttpBody(body=b"", end_of_stream=True)),
        ]
    return [m.SerializeToString() for m in out]


async def _replay(raw: list[bytes]) -> AsyncIterator[ProcessingRequest]:
    for item in raw:
        yield ProcessingRequest.FromString(item)


async def _one_exchange(processor: ExternalProcessor, raw: list[bytes]) -> None:
    async for answer in processor.Process(_replay(raw), None):
        if answer.HasField("immediate_response"):
            raise RuntimeError(f"extproc answered by itself: {answer.immediate_response}")
        answer.SerializeToString()


async def part3(
    configs: dict[str, dict[str, Any]],
    answer: bytes,
    workdir: Path,
    redis_pid: int,
    args: argparse.Namespace,
) -> dict[str, StoreCost]:
    runtimes: dict[str, Runtime] = {}
    costs: dict[str, StoreCost] = {}
    try:
        for gw, config in configs.items():
            own = {**config}
            if own["usage"]["enabled"]:
                own["usage"] = {"enabled": True, "path": str(workdir / f"part3-usage-{gw}.db")}
            path = workdir / f"part3-{gw}.yaml"
            path.write_text(yaml.safe_dump(own, sort_keys=False))
            runtimes[gw] = Runtime.from_config(load_config(path))
        for name, gw, tenant, _ in SETUPS:
            runtime = runtimes[gw]
            processor = ExternalProcessor(runtime)
            raw = exchange_messages(tenant, runtime.plans[tenant].tracks, answer)

            async def step(
                processor: ExternalProcessor = processor, raw: list[bytes] = raw
            ) -> None:
                await _one_exchange(processor, raw)

            pid = redis_pid if gw == "C" else None
            costs[name] = await _measure(name, step, args.exchange_requests, args.concurrency, pid)
    finally:
        for runtime in runtimes.values():
            await runtime.accounts.aclose()
    return costs


# -- report -----------------------------------------------------------------------------------


def fmt(value: float, digits: int = 0) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def report_part1(costs: list[StoreCost], concurrency: int) -> list[dict[str, Any]]:
    print()
    print(
        "Part 1: stores alone, µs per request (limiter: acquire + finish, +budget: with the "
        "budget checked and charged in the same calls; ledger: record)"
    )
    header = (
        f"{'store':<20}{'1 at a time':>13}{f'{concurrency} tasks: wall':>18}"
        f"{'CPU here':>10}{'redis CPU':>11}"
    )
    print(header)
    print("-" * len(header))
    for cost in costs:
        print(
            f"{cost.name:<20}{fmt(cost.seq_wall_us, 1):>13}{fmt(cost.conc_wall_us, 1):>18}"
            f"{fmt(cost.conc_cpu_us, 1):>10}{fmt(cost.conc_redis_us, 1):>11}"
        )
    return [vars(cost) for cost in costs]


def report_part3(costs: dict[str, StoreCost], setups: list[Setup], concurrency: int) -> Any:
    print()
    print(
        "Part 3: extproc's Python work per request without gRPC (server.py's loop, the real "
        "Exchange and stores), µs"
    )
    header = (
        f"{'setup':<10}{'1 at a time':>13}{f'{concurrency} tasks: CPU':>17}{'redis CPU':>11}"
        f"{'gateway extproc CPU':>21}{'rest per msg':>14}"
    )
    print(header)
    print("-" * len(header))
    out = {}
    for setup in setups:
        cost = costs[setup.name]
        gateway = statistics.median(setup.cpu_us.get("extproc", [float("nan")]))
        msgs = setup.msgs.get("stream_msgs_sent", 0) / max(1, setup.requests_sent)
        rest = (gateway - cost.conc_cpu_us) / msgs if msgs else float("nan")
        out[setup.name] = {**vars(cost), "gateway_extproc_cpu_us": gateway, "rest_per_msg": rest}
        print(
            f"{setup.name:<10}{fmt(cost.seq_wall_us):>13}{fmt(cost.conc_cpu_us):>17}"
            f"{fmt(cost.conc_redis_us):>11}{fmt(gateway):>21}{fmt(rest):>14}"
        )
    print(
        "(1 at a time: wall, fsync of the usage ledger included; rest per msg: the gateway's "
        "extproc CPU minus this, per ext_proc message: the gRPC plumbing)"
    )
    return out


def _paired(setup: Setup, base: Setup) -> list[float]:
    return [100 * s / b for s, b in zip(setup.rps, base.rps, strict=True)]


def report_part2(setups: list[Setup], args: argparse.Namespace) -> dict[str, Any]:
    by_name = {s.name: s for s in setups}
    off, usage = by_name["off"], by_name["usage"]
    print()
    print(
        f"Part 2: gateways, non-streamed requests, {args.rounds} rounds, {args.concurrency} "
        f"connections, {args.requests} requests per round (cap {args.max_seconds:g} s)"
    )
    header = (
        f"{'setup':<10}{'p50 ms':>8}{'req/s':>8}{'% of off':>10}{'% of usage':>12}"
        f"{'extproc':>9}{'envoy':>7}{'launch':>8}{'redis':>7}{'msgs':>6}   % of off per round"
    )
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {}
    for setup in setups:
        vs_off = _paired(setup, off)
        vs_usage = _paired(setup, usage)
        cpu = {k: statistics.median(v) for k, v in setup.cpu_us.items()}
        msgs = setup.msgs.get("stream_msgs_sent", 0) / max(1, setup.requests_sent)
        p50 = pt.percentile(setup.latencies, 50) * 1e3
        row = {
            "p50_ms": p50,
            "rps": statistics.median(setup.rps),
            "rps_rounds": [round(r) for r in setup.rps],
            "pct_of_off": statistics.median(vs_off),
            "pct_of_off_rounds": [round(r, 1) for r in vs_off],
            "pct_of_usage": statistics.median(vs_usage),
            "cpu_us_per_request": cpu,
            "ext_proc_msgs_per_request": msgs,
        }
        summary[setup.name] = row
        columns = "".join(
            f"{cpu.get(kind, float('nan')):>{width}.0f}"
            for kind, width in (("extproc", 9), ("envoy", 7), ("launcher", 8), ("redis", 7))
        )
        print(
            f"{setup.name:<10}{p50:>8.3f}{row['rps']:>8.0f}{row['pct_of_off']:>9.1f}%"
            f"{row['pct_of_usage']:>11.1f}%{columns}{msgs:>6.2f}   {row['pct_of_off_rounds']}"
        )
    print(
        "(CPU: µs per request under load, median over rounds: the extproc worker, Envoy, the "
        "launcher (it relays extproc's log lines) and redis-server; msgs: ext_proc messages "
        "sent per request)"
    )
    verdicts = {}
    print()
    for name, target in (("memory", TARGET_MEMORY_PCT), ("redis", TARGET_REDIS_PCT)):
        pct, vs_usage = summary[name]["pct_of_off"], summary[name]["pct_of_usage"]
        verdicts[name] = "PASS" if pct >= target else "FAIL"
        print(
            f"  {name} limits: {pct:.1f}% of off's throughput (cost {100 - pct:.1f}%, target "
            f"<= {100 - target:.0f}%)  {verdicts[name]};  vs usage only: {vs_usage:.1f}% "
            f"(cost {100 - vs_usage:.1f}%)"
        )
    return {"setups": summary, "verdicts": verdicts}


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per setup")
    parser.add_argument("--requests", type=int, default=3000, help="load requests per round")
    parser.add_argument("--concurrency", type=int, default=16, help="load connections / tasks")
    parser.add_argument(
        "--latency-requests", type=int, default=200, help="sequential requests per round"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=3.0, help="cap on one load round's duration"
    )
    parser.add_argument(
        "--store-requests", type=int, default=4000, help="part 1: Redis requests per phase"
    )
    parser.add_argument(
        "--exchange-requests", type=int, default=2000, help="part 3: requests per setup"
    )
    parser.add_argument("--skip-stores", action="store_true", help="skip parts 1 and 3")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace, procs: pt.Processes) -> dict[str, Any]:
    workdir = procs.workdir
    say("starting redis-server ...")
    redis = start_redis(procs)
    redis_url = f"redis://{HOST}:{redis.port}/0"
    result: dict[str, Any] = {"cpus": os.cpu_count()}
    if not args.skip_stores:
        say("part 1: stores alone ...")
        costs = asyncio.run(part1(redis_url, redis.process.pid, workdir, args))
        result["stores"] = report_part1(costs, args.concurrency)
    say("part 2: starting the demo upstream and gateways A (usage off), B (usage on), C (redis)")
    upstream = pt.start_upstream(procs)
    ledgers = {"B": workdir / "usage-B.db", "C": workdir / "usage-C.db"}
    configs = {
        "A": gateway_config(upstream.port, False, None, ""),
        "B": gateway_config(upstream.port, True, None, str(ledgers["B"])),
        "C": gateway_config(upstream.port, True, redis_url, str(ledgers["C"])),
    }
    gateways = {name: start_gateway(procs, name, config) for name, config in configs.items()}
    setups = [
        Setup(name, gateways[gw], tenant, limited, redis) for name, gw, tenant, limited in SETUPS
    ]
    for setup in setups:
        check_setup(setup)
        sequential(setup, 200, record=False)
        pt.run_load(setup.gateway.port, setup.request, args.requests // 4, args.concurrency, 1.5)
    ours = [os.getpid()] + [p for s in procs.services for p in s.pids]
    ours_before = sum(pt.cpu_seconds(p) for p in ours)
    busy_before, wall_before = pt.machine_busy_seconds(), time.monotonic()
    for round_no in range(args.rounds):
        say(f"round {round_no + 1}/{args.rounds}")
        for setup in setups:
            sequential(setup, 30, record=False)  # re-warm after the other setups ran
            sequential(setup, args.latency_requests, record=True)
            throughput(setup, args)
        for service in procs.services:
            service.check_alive()
    wall = time.monotonic() - wall_before
    others = pt.machine_busy_seconds() - busy_before
    others -= sum(pt.cpu_seconds(p) for p in ours) - ours_before
    noise = max(0.0, 100 * others / (wall * (os.cpu_count() or 1)))
    result.update(report_part2(setups, args))
    if not args.skip_stores:
        say("part 3: extproc's own work ...")
        answer = fetch_answer(upstream.port)
        costs3 = asyncio.run(part3(configs, answer, workdir, redis.process.pid, args))
        result["exchange"] = report_part3(costs3, setups, args.concurrency)
    problems = verify(setups, ledgers, procs)
    for problem in problems:
        print(f"  CHECK FAILED: {problem}")
    if not problems:
        print(
            "  checks: every answer 200; limited setups carry x-ratelimit-*; ledgers hold every "
            "request; no store failure logged"
        )
    result["problems"] = problems
    result["other_processes_cpu_pct"] = noise
    print(
        f"other processes used {noise:.0f}% of the machine's CPU during the rounds"
        + ("  (WARNING: noisy machine, compare with care)" if noise > 10 else "")
    )
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    with pt._workdir(args.keep_logs) as workdir:
        procs = pt.Processes(workdir)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            result = run(args, procs)
            print(f"(run took {time.monotonic() - started:.0f}s)")
            if args.json:
                args.json.write_text(json.dumps(result, indent=2))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            return pt.report_failure(procs, exc)
        finally:
            procs.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
