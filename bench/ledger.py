"""What the shared PostgreSQL usage ledger costs a counted tenant, next to SQLite, in one run.

Usage (from the repo root, with the project's venv; PostgreSQL from Debian's ``postgresql``
package, started here as user ``postgres`` when run as root)::

    .venv/bin/python bench/ledger.py [--rounds 4] [--requests 3000] [--concurrency 16]
                                     [--json out.json] [--keep-logs]

Part 1, in this process: ``record`` per request of each ledger alone, after a warm-up, one at
a time (wall µs: the latency it adds to a request's end) and with ``--concurrency`` tasks (wall
and this process's CPU per request): ``UsageLedger`` (SQLite, WAL, ``synchronous=FULL``) and
``PostgresLedger`` (psycopg 3 pool, ``synchronous_commit`` on, both one commit per batch).

Part 2, through real gateways (``python -m checkstream run -c <temp config>``), the demo upstream
(``--chunk-delay-ms 0``) and a loopback PostgreSQL this script starts (fsync on), all on
127.0.0.1: non-streamed ``POST /v1/chat/completions`` for one counted tenant (usage recorded,
no limits), tenant by ``X-Tenant-ID``:

| setup | gateway |
| --- | --- |
| ``off`` | ``usage: {enabled: false}``: the cost of counting, for context |
| ``sqlite`` | ``usage: {path: ...}`` (the default backend): the baseline |
| ``postgres`` | ``usage: {backend: postgres, url: ...}`` |

All stay up and are measured in interleaved rounds: p50 and p99 one request at a time, then
req/s with ``--concurrency`` keep-alive connections. Reported: req/s (median over rounds),
``postgres`` as % of ``sqlite`` (median of the per-round ratios, which cancels most of the
noise of other work on the machine), the p50/p99 PostgreSQL adds over SQLite, and CPU µs per
request of extproc, Envoy and PostgreSQL (postmaster and its backends).

Target (issue #14; PASS/FAIL printed, exit code 0 either way): ``postgres`` keeps >= 90% of
``sqlite``'s throughput. Checked: every answer 200, each ledger holds every request it served,
no gateway logged a store failure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sqlite3
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import limits as lb  # bench/ is sys.path[0] when this file is run as a script
import passthrough as pt
import psycopg

from checkstream.ledger.postgres import TABLE, PostgresLedger
from checkstream.ledger.usage import UsageLedger, UsageRecord

sys.path.insert(1, str(pt.REPO))  # the test suite's PostgreSQL starter
from tests.postgres_server import PostgresServer, postgres_available

HOST = pt.HOST
TARGET_PCT = 90.0
MODEL = str(pt.PROMPT["model"])
PRICING = {MODEL: {"input": 0.15, "output": 0.6}}
TENANT = "counted"
_ids = itertools.count()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- part 1: the ledgers alone ----------------------------------------------------------------


def _record_step(ledger: UsageLedger | PostgresLedger) -> Callable[[], Awaitable[None]]:
    async def step() -> None:
        rec = UsageRecord(
            time.time(), f"b{next(_ids)}", "bench", MODEL, 12, 30, False, 200, 1.5, 2e-5
        )
        await ledger.record(rec)

    return step


async def part1(dsn: str, workdir: Path, args: argparse.Namespace) -> list[lb.StoreCost]:
    n, c = args.store_requests, args.concurrency
    sqlite_ledger = UsageLedger.open(workdir / "part1-usage.db")
    pg_ledger = PostgresLedger.open(dsn)
    try:
        return [
            await lb._measure("sqlite record", _record_step(sqlite_ledger), n, c, None),
            await lb._measure("postgres record", _record_step(pg_ledger), n, c, None),
        ]
    finally:
        await sqlite_ledger.aclose()
        await pg_ledger.aclose()


def report_part1(costs: list[lb.StoreCost], concurrency: int) -> list[dict[str, Any]]:
    print()
    print("Part 1: ledgers alone, µs per record (durable when it returns)")
    header = f"{'ledger':<18}{'1 at a time':>13}{f'{concurrency} tasks: wall':>18}{'CPU here':>10}"
    print(header)
    print("-" * len(header))
    for cost in costs:
        print(
            f"{cost.name:<18}{lb.fmt(cost.seq_wall_us, 1):>13}{lb.fmt(cost.conc_wall_us, 1):>18}"
            f"{lb.fmt(cost.conc_cpu_us, 1):>10}"
        )
    return [{k: v for k, v in vars(cost).items() if k != "conc_redis_us"} for cost in costs]


# -- part 2: gateways --------------------------------------------------------------------------


def gateway_config(upstream_port: int, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {
            "host": HOST,
            "port": pt.free_port(),
            "admin_port": pt.free_port(),
            "extproc_port": pt.free_port(),
            "envoy_admin_port": pt.free_port(),
            "drain_timeout_s": 2,
        },
        "usage": usage,
        "pricing": PRICING,
        "tenants": {
            "resolution": [{"header": "X-Tenant-ID"}],
            "configs": {TENANT: {"backend_url": f"http://{HOST}:{upstream_port}/v1"}},
        },
    }


@dataclass
class Setup:
    name: str
    gateway: pt.Service
    postgres: PostgresServer
    request: bytes = b""
    latencies: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    requests_sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.request = pt.build_request(self.gateway.port, pt.PROMPT, {"X-Tenant-ID": TENANT})

    def pids(self) -> dict[str, list[int]]:
        kinds: dict[str, list[int]] = {"postgres": self.postgres.pids()}
        for pid in self.gateway.pids:
            kinds.setdefault(pt.process_name(pid), []).append(pid)
        return kinds


def sequential(setup: Setup, count: int, record: bool) -> None:
    client = pt.BlockingClient(setup.gateway.port)
    try:
        for _ in range(count):
            status, _, total, _ = client.send(setup.request)
            if status != 200:
                raise RuntimeError(f"{setup.name}: HTTP {status}")
            setup.requests_sent += 1
            if record:
                setup.latencies.append(total)
    finally:
        client.close()


def throughput(setup: Setup, args: argparse.Namespace) -> None:
    pids = setup.pids()
    before = {kind: sum(pt.cpu_seconds(p) for p in ps) for kind, ps in pids.items()}
    state, elapsed = pt.run_load(
        setup.gateway.port, setup.request, args.requests, args.concurrency, args.max_seconds
    )
    after = {kind: sum(pt.cpu_seconds(p) for p in ps) for kind, ps in pids.items()}
    done = max(1, state.done)
    setup.rps.append(state.done / elapsed)
    setup.requests_sent += state.done
    for status, n in state.statuses.items():
        setup.statuses[status] = setup.statuses.get(status, 0) + n
    for kind in before:
        setup.cpu_us.setdefault(kind, []).append((after[kind] - before[kind]) / done * 1e6)


def ledger_rows(setup: Setup, sqlite_path: Path, dsn: str) -> int:
    if setup.name == "sqlite":
        conn = sqlite3.connect(sqlite_path)
        try:
            (n,) = conn.execute("SELECT COUNT(*) FROM usage WHERE tenant = ?", (TENANT,)).fetchone()
        finally:
            conn.close()
        return int(n)
    with psycopg.connect(dsn) as pg:
        row = pg.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE tenant = %s", (TENANT,)).fetchone()
    return int(row[0]) if row else 0


def _paired(setup: Setup, base: Setup) -> list[float]:
    return [100 * s / b for s, b in zip(setup.rps, base.rps, strict=True)]


def report_part2(setups: dict[str, Setup], args: argparse.Namespace) -> dict[str, Any]:
    base = setups["sqlite"]
    print()
    print(
        f"Part 2: gateways, one counted tenant, non-streamed requests, {args.rounds} rounds, "
        f"{args.concurrency} connections, {args.requests} requests per round "
        f"(cap {args.max_seconds:g} s)"
    )
    header = (
        f"{'setup':<10}{'p50 ms':>8}{'p99 ms':>8}{'req/s':>8}{'% of sqlite':>13}"
        f"{'extproc':>9}{'envoy':>7}{'postgres':>10}   % of sqlite per round"
    )
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {}
    for name, setup in setups.items():
        ratios = _paired(setup, base)
        cpu = {k: statistics.median(v) for k, v in setup.cpu_us.items()}
        row = {
            "p50_ms": pt.percentile(setup.latencies, 50) * 1e3,
            "p99_ms": pt.percentile(setup.latencies, 99) * 1e3,
            "rps": statistics.median(setup.rps),
            "rps_rounds": [round(r) for r in setup.rps],
            "pct_of_sqlite": statistics.median(ratios),
            "pct_of_sqlite_rounds": [round(r, 1) for r in ratios],
            "cpu_us_per_request": cpu,
        }
        summary[name] = row
        columns = "".join(
            f"{cpu.get(kind, float('nan')):>{width}.0f}"
            for kind, width in (("extproc", 9), ("envoy", 7), ("postgres", 10))
        )
        print(
            f"{name:<10}{row['p50_ms']:>8.3f}{row['p99_ms']:>8.3f}{row['rps']:>8.0f}"
            f"{row['pct_of_sqlite']:>12.1f}%{columns}   {row['pct_of_sqlite_rounds']}"
        )
    print(
        "(CPU: µs per request under load, median over rounds; postgres: the postmaster and its "
        "backends, which every setup shares but only the postgres setup uses)"
    )
    pg = summary["postgres"]
    added_p50 = pg["p50_ms"] - summary["sqlite"]["p50_ms"]
    added_p99 = pg["p99_ms"] - summary["sqlite"]["p99_ms"]
    verdict = "PASS" if pg["pct_of_sqlite"] >= TARGET_PCT else "FAIL"
    print()
    print(
        f"  postgres ledger: {pg['pct_of_sqlite']:.1f}% of sqlite's throughput (target >= "
        f"{TARGET_PCT:.0f}%)  {verdict};  added per request: p50 {added_p50:+.3f} ms, "
        f"p99 {added_p99:+.3f} ms"
    )
    return {
        "setups": summary,
        "added_p50_ms": added_p50,
        "added_p99_ms": added_p99,
        "verdict": verdict,
    }


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per setup")
    parser.add_argument("--requests", type=int, default=3000, help="load requests per round")
    parser.add_argument("--concurrency", type=int, default=16, help="load connections / tasks")
    parser.add_argument(
        "--latency-requests", type=int, default=300, help="sequential requests per round"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=3.0, help="cap on one load round's duration"
    )
    parser.add_argument(
        "--store-requests", type=int, default=2000, help="part 1: records per phase"
    )
    parser.add_argument("--skip-stores", action="store_true", help="skip part 1")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace, procs: pt.Processes, postgres: PostgresServer) -> dict[str, Any]:
    workdir = procs.workdir
    dsn = postgres.create_database()
    result: dict[str, Any] = {"cpus": os.cpu_count()}
    if not args.skip_stores:
        say("part 1: ledgers alone ...")
        result["stores"] = report_part1(asyncio.run(part1(dsn, workdir, args)), args.concurrency)
    say("part 2: starting the demo upstream and gateways (usage off, sqlite, postgres) ...")
    upstream = pt.start_upstream(procs)
    sqlite_path = workdir / "usage-sqlite.db"
    usages = {
        "off": {"enabled": False},
        "sqlite": {"path": str(sqlite_path)},
        "postgres": {"backend": "postgres", "url": dsn},
    }
    setups = {
        name: Setup(
            name, lb.start_gateway(procs, name, gateway_config(upstream.port, usage)), postgres
        )
        for name, usage in usages.items()
    }
    for setup in setups.values():
        sequential(setup, 200, record=False)
        pt.run_load(setup.gateway.port, setup.request, args.requests // 4, args.concurrency, 1.5)
    ours = [os.getpid(), *postgres.pids()] + [p for s in procs.services for p in s.pids]
    ours_before = sum(pt.cpu_seconds(p) for p in ours)
    busy_before, wall_before = pt.machine_busy_seconds(), time.monotonic()
    for setup in setups.values():
        setup.requests_sent = 0  # counted from here: warm-up rows were written too
    warm_rows = {
        name: ledger_rows(s, sqlite_path, dsn) for name, s in setups.items() if name != "off"
    }
    for round_no in range(args.rounds):
        say(f"round {round_no + 1}/{args.rounds}")
        for setup in setups.values():
            sequential(setup, 30, record=False)  # re-warm after the other setups ran
            sequential(setup, args.latency_requests, record=True)
            throughput(setup, args)
        for service in procs.services:
            service.check_alive()
    wall = time.monotonic() - wall_before
    ours_after = [os.getpid(), *postgres.pids()] + [p for s in procs.services for p in s.pids]
    others = pt.machine_busy_seconds() - busy_before
    others -= sum(pt.cpu_seconds(p) for p in ours_after) - ours_before
    noise = max(0.0, 100 * others / (wall * (os.cpu_count() or 1)))
    result.update(report_part2(setups, args))
    problems = []
    for name, setup in setups.items():
        if setup.statuses:
            problems.append(f"{name}: non-200 answers under load {setup.statuses}")
        if name in warm_rows:
            rows = ledger_rows(setup, sqlite_path, dsn) - warm_rows[name]
            if rows < setup.requests_sent:
                problems.append(f"{name}: ledger has {rows} rows for {setup.requests_sent}")
        text = setup.gateway.log.read_text(errors="replace")
        for marker in lb.STORE_FAILURES:
            if marker in text:
                problems.append(f"{name} logged {marker!r}")
    for problem in problems:
        print(f"  CHECK FAILED: {problem}")
    if not problems:
        print("  checks: every answer 200; each ledger holds every request; no store failure")
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
    try:
        postgres_available()
    except BaseException as exc:  # pytest's Skipped: PostgreSQL is not installed
        print(f"bench/ledger.py: {exc}", file=sys.stderr)
        return 1
    with pt._workdir(args.keep_logs) as workdir:
        procs = pt.Processes(workdir)
        signal.signal(signal.SIGTERM, _interrupt)
        say("starting PostgreSQL ...")
        postgres = PostgresServer()
        try:
            postgres.start()
            result = run(args, procs, postgres)
            print(f"(run took {time.monotonic() - started:.0f}s)")
            if args.json:
                import json

                args.json.write_text(json.dumps(result, indent=2))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            return pt.report_failure(procs, exc)
        finally:
            procs.cleanup()
            postgres.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
