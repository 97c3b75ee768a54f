"""What guardrails cost: pass-through, ingress classifiers and midstream checks, one run.

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/guardrails.py [--rounds 3] [--workers 1] [--json out.json]

Reuses ``bench/passthrough.py``'s pieces (client, process handling, Envoy alone) and starts,
on free ports on 127.0.0.1: the demo upstream (``--chunk-delay-ms 0``), Envoy alone in
front of it, and one real gateway (``python -m checkstream run -c <temp config>``) whose
tenants, selected with ``X-Tenant-ID``, are:

- ``pass``: nothing to check (one ext_proc message per request);
- ``ingress``: ``classifiers: [pii_detector, banned]`` (``banned``: a keyword instance with
  20 terms), a ``log`` rule on each. The ``classifiers`` shorthand enables both phases, so
  a non-streamed answer is egress-checked too, as it would be for a user writing this;
- ``ingress-only``: the same with ``pipeline.midstream.enabled: false`` (prompt only);
- ``body-rt``: ``models: [checkstream-demo]`` (an allow-list), so extproc gets the buffered
  request body (one more round trip before the upstream is called) and nothing else: it
  separates that round trip from the response-side ones in the streams' TTFB;
- ``mid-noop``: response processing with no real classifier work: ingress off, midstream
  ``[never]`` (a keyword instance whose one term never occurs), a ``log`` rule on it;
- ``mid-pii``: ingress off, midstream ``[pii_detector, banned]``, ``log`` rules on both.

Nothing in the traffic triggers a rule (checked at the end from the gateway's log).
Non-streamed cases send a ~1.2 KB chat prompt (system + user message, no PII); streamed
cases send the same prompt with ``stream: true`` and ``x-demo-chunks: 50`` (a 50-event
answer plus role, stop and ``[DONE]`` events). All setups are measured in interleaved
rounds. Per case it reports latency, throughput (as % of Envoy alone, median of per-round
ratios), TTFB, extproc CPU (utime+stime of the ``extproc serve`` worker over the measured
phase) per request / per answer event, and ext_proc messages per request (gateway Envoy's
``ext_proc`` stats).

Targets (PASS/FAIL printed, exit code 0 either way): ingress tenant added p50 over Envoy
alone <= 1.5 ms; extproc CPU per answer event of ``mid-noop`` (body processed, nothing to
classify) <= 50 µs; TTFB of ``mid-pii`` <= Envoy alone + 2 ms. Also printed: passthrough.py's
own targets for ``pass`` (added p50 <= 1.0 ms, throughput >= 40% of Envoy alone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import passthrough as pt  # bench/ is sys.path[0] when this file is run as a script
import yaml

HOST = pt.HOST
ANSWER_EVENTS = 50  # x-demo-chunks: text events of the answer
TARGET_INGRESS_ADDED_P50_MS = 1.5
TARGET_NOOP_US_PER_EVENT = 50.0
TARGET_MIDSTREAM_ADDED_TTFB_MS = 2.0

SYSTEM = (
    "You are a support assistant for an online store that sells outdoor gear. Answer in a "
    "friendly, concise tone, cite the relevant section of the returns policy when it applies, "
    "and never invent delivery dates or stock levels you cannot see."
)
USER = (
    "Hi, I bought a two-person tent and a pair of hiking boots from your shop last month. The "
    "tent arrived with a bent pole and one of the zippers on the rain fly does not close "
    "properly, so I have not been able to use it on the weekend trip I planned. The boots are "
    "fine, but they run about half a size small and give me blisters after a few hours on the "
    "trail. I would like to exchange the boots for a larger size and either get a replacement "
    "pole and fly for the tent or return the tent altogether for a refund. I still have the "
    "original packaging for the boots, but I threw away the box the tent came in. Could you "
    "explain what my options are, whether I need to pay for return shipping, how long a refund "
    "usually takes to show up, and whether I can drop the items off at one of your stores "
    "instead of sending them back by mail? Thanks a lot for your help."
)
PROMPT = {
    "model": "checkstream-demo",
    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
}
BANNED_TERMS = [
    "project falcon",
    "internal only",
    "confidential roadmap",
    "acquisition target",
    "layoff list",
    "salary bands",
    "source code leak",
    "exploit kit",
    "credential dump",
    "zero-day",
    "insider trading",
    "wire the funds",
    "bypass the audit",
    "disable logging",
    "password spray",
    "ransomware builder",
    "pirated license",
    "unreleased earnings",
    "merger talks",
    "board minutes",
]
NEVER_TERM = "qzxv never matches jkwy"

# name, tenant, what it is
PLAIN_CASES = [
    ("envoy alone", None, "baseline"),
    ("pass", "pass", "gateway, nothing to check"),
    ("ingress", "ingress", "classifiers: [pii_detector, banned], log rules (ingress + egress)"),
    ("ingress-only", "ingress-only", "same, midstream/egress disabled"),
]
STREAM_CASES = [
    ("envoy alone", None, "baseline"),
    ("(i) pass", "pass", "no body processing"),
    ("body-rt", "body-rt", "request body round trip only (model allow-list)"),
    ("(ii) mid-noop", "mid-noop", "response processed, one never-matching keyword"),
    ("(iii) mid-pii", "mid-pii", "midstream [pii_detector, banned], log rules"),
]
# ext_proc messages of a request that are not response body chunks: request headers, and
# for tenants with midstream rules the (buffered) request body and the response headers.
NON_BODY_MESSAGES = {"pass": 1, "body-rt": 2, "mid-noop": 3, "mid-pii": 3}

_FIRST_TEXT = re.compile(rb'"content":"[^"]')


# -- gateway ----------------------------------------------------------------------------------


def _policy(workdir: Path, name: str, classifiers: list[str]) -> str:
    path = workdir / f"policy-{name}.yaml"
    rules = [
        {"name": f"{c}_seen", "trigger": {"classifier": c, "threshold": 0.5}, "action": "log"}
        for c in classifiers
    ]
    path.write_text(yaml.safe_dump({"version": "1.0", "name": name, "policies": rules}))
    return str(path)


def gateway_config(workdir: Path, upstream_port: int, workers: int) -> dict[str, Any]:
    backend = f"http://{HOST}:{upstream_port}/v1"
    both = ["pii_detector", "banned"]
    server: dict[str, Any] = {
        "host": HOST,
        "port": pt.free_port(),
        "admin_port": pt.free_port(),
        "extproc_port": pt.free_port_range(workers),
        "envoy_admin_port": pt.free_port(),
        "drain_timeout_s": 2,
    }
    if workers != 1:
        server["extproc_workers"] = workers
    no_ingress: dict[str, Any] = {"classifiers": []}
    return {
        "server": server,
        # Guardrail costs alone; bench/limits.py measures what usage accounting adds.
        "usage": {"enabled": False},
        "classifiers": {
            "banned": {"type": "keyword", "terms": BANNED_TERMS},
            "never": {"type": "keyword", "terms": [NEVER_TERM]},
        },
        "tenants": {
            "resolution": [{"header": "X-Tenant-ID"}],
            "default_tenant": "pass",
            "configs": {
                "pass": {"backend_url": backend},
                "body-rt": {"backend_url": backend, "models": [PROMPT["model"]]},
                "ingress": {
                    "backend_url": backend,
                    "classifiers": both,
                    "policy_path": _policy(workdir, "ingress", both),
                },
                "ingress-only": {
                    "backend_url": backend,
                    "classifiers": both,
                    "pipeline": {"midstream": {"enabled": False}},
                    "policy_path": _policy(workdir, "ingress-only", both),
                },
                "mid-noop": {
                    "backend_url": backend,
                    "pipeline": {"ingress": no_ingress, "midstream": {"classifiers": ["never"]}},
                    "policy_path": _policy(workdir, "mid-noop", ["never"]),
                },
                "mid-pii": {
                    "backend_url": backend,
                    "pipeline": {"ingress": no_ingress, "midstream": {"classifiers": both}},
                    "policy_path": _policy(workdir, "mid-pii", both),
                },
            },
        },
    }


def start_gateway(procs: pt.Processes, upstream_port: int, workers: int) -> pt.Service:
    config = gateway_config(procs.workdir, upstream_port, workers)
    server = config["server"]
    path = procs.workdir / "checkstream.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "checkstream", "run", "-c", str(path)]
    service = procs.spawn("gateway", argv, server["port"])
    service.admin_port = server["envoy_admin_port"]
    port = server["port"]
    procs.wait_until(
        service,
        lambda: pt._http_status(f"http://{HOST}:{port}/healthz") == 200,
        "the gateway",
    )
    procs.adopt_children(service)
    return service


def extproc_pids(gateway: pt.Service) -> list[int]:
    pids = [p for p in gateway.pids if pt.process_name(p) == "extproc"]
    if not pids:
        raise RuntimeError(f"no extproc worker among the gateway's processes {gateway.pids}")
    return pids


# -- client -----------------------------------------------------------------------------------


class StreamParser(pt.ResponseParser):
    """Also keeps the body and the time the first event carrying answer text arrived."""

    __slots__ = ("body", "first_text_at")

    def __init__(self) -> None:
        super().__init__(watch_events=True)
        self.body = bytearray()
        self.first_text_at: float | None = None

    def _body(self, data: bytes) -> None:
        super()._body(data)
        start = max(0, len(self.body) - 16)
        self.body += data
        if self.first_text_at is None and _FIRST_TEXT.search(self.body, start):
            self.first_text_at = time.perf_counter()


class StreamClient(pt.BlockingClient):
    def stream(self, request: bytes) -> tuple[int, float, float, float, bytes]:
        """(status, s to first SSE event, s to first text event, s total, body)."""
        parser = StreamParser()
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
        text = parser.first_text_at - start if parser.first_text_at else float("nan")
        return parser.status, first, text, end - start, bytes(parser.body)


# -- cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    tenant: str | None
    setup: pt.Setup  # .plain is what the load phase sends (the stream request for streams)
    stream: bool
    result: pt.Result = field(init=False)
    ttft: list[float] = field(default_factory=list)
    # Sequential streams, summed over rounds.
    seq_streams: int = 0
    seq_cpu_s: dict[str, float] = field(default_factory=dict)
    # ext_proc stats deltas per phase ("seq", "load", "paced"): counters summed over rounds.
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    paced_cpu_s: float = 0.0
    paced_events: int = 0
    paced_result: pt.Result = field(init=False)  # concurrent paced streams

    def __post_init__(self) -> None:
        self.result = pt.Result(self.name)
        self.paced_result = pt.Result(self.name)

    def add_stats(self, phase: str, delta: dict[str, int], requests: int) -> None:
        acc = self.stats.setdefault(phase, {})
        for key, value in delta.items():
            acc[key] = acc.get(key, 0) + value
        self.requests[phase] = self.requests.get(phase, 0) + requests

    def per_request(self, phase: str, key: str) -> float:
        n = self.requests.get(phase, 0)
        return self.stats.get(phase, {}).get(key, 0) / n if n else float("nan")


def make_case(
    name: str, tenant: str | None, service: pt.Service, upstream: pt.Service, stream: bool
) -> Case:
    setup = pt.Setup(name, service, service.port, upstream)
    headers = {"X-Tenant-ID": tenant or "pass"}
    plain = pt.build_request(service.port, PROMPT, headers)
    streamed = pt.build_request(
        service.port, {**PROMPT, "stream": True}, {**headers, "x-demo-chunks": str(ANSWER_EVENTS)}
    )
    setup.plain = streamed if stream else plain
    setup.stream = streamed
    return Case(name, tenant, setup, stream)


class StatsWindow:
    """ext_proc stats delta of the gateway Envoy around a phase (nothing for Envoy alone)."""

    def __init__(self, case: Case, phase: str, requests: int) -> None:
        self.case, self.phase, self.requests = case, phase, requests
        self.admin = case.setup.service.admin_port if case.tenant else None

    def __enter__(self) -> StatsWindow:
        self.before = pt.ext_proc_stats(self.admin) if self.admin else {}
        return self

    def __exit__(self, *exc: object) -> None:
        if self.admin and exc[0] is None:
            after = pt.ext_proc_stats(self.admin)
            delta = {k: v - self.before.get(k, 0) for k, v in after.items()}
            self.case.add_stats(self.phase, delta, self.requests)


def check_stream(case: Case, status: int, body: bytes, paced: bool = False) -> None:
    events = body.count(b"\n\n")
    # role + 50 text events + stop + [DONE]; CheckStream drops the usage chunk it asked for.
    if status != 200 or not body.endswith(b"data: [DONE]\n\n") or events != ANSWER_EVENTS + 3:
        what = "paced stream" if paced else "stream"
        raise RuntimeError(
            f"{case.name}: bad {what}: HTTP {status}, {events} events, ends {body[-60:]!r}"
        )


def sequential_streams(case: Case, count: int, extproc: list[int], record: bool = True) -> None:
    client = StreamClient(case.setup.port)
    try:
        window = StatsWindow(case, "seq", count) if record else contextlib.nullcontext()
        with window:
            before = sum(pt.cpu_seconds(p) for p in extproc)
            for _ in range(count):
                status, first, text, total, body = client.stream(case.setup.stream)
                check_stream(case, status, body)
                if record:
                    case.result.ttfb.append(first)
                    case.ttft.append(text)
                    case.result.stream_total.append(total)
            cpu = sum(pt.cpu_seconds(p) for p in extproc) - before
        if record:
            case.seq_cpu_s["extproc"] = case.seq_cpu_s.get("extproc", 0.0) + cpu
            case.seq_streams += count
    finally:
        client.close()


def paced_streams(case: Case, args: argparse.Namespace, extproc: list[int]) -> None:
    """Streams whose events arrive ``--paced-delay-ms`` apart, as a model's tokens do: one
    response body message per event. First one at a time, then ``--paced-concurrency``."""
    request = pt.build_request(
        case.setup.port,
        {**PROMPT, "stream": True},
        {
            "X-Tenant-ID": case.tenant or "pass",
            "x-demo-chunks": str(ANSWER_EVENTS),
            "x-demo-delay-ms": f"{args.paced_delay_ms:g}",
        },
    )
    count = args.paced_streams
    client = StreamClient(case.setup.port)
    try:
        with StatsWindow(case, "paced", count):
            before = sum(pt.cpu_seconds(p) for p in extproc)
            for _ in range(count):
                status, _first, _text, _total, body = client.stream(request)
                check_stream(case, status, body, paced=True)
            case.paced_cpu_s += sum(pt.cpu_seconds(p) for p in extproc) - before
        case.paced_events += count * ANSWER_EVENTS
    finally:
        client.close()
    if args.paced_concurrency:
        setup = pt.Setup(case.name, case.setup.service, case.setup.port, case.setup.upstream)
        setup.plain = request
        load_args = argparse.Namespace(
            requests=10**6, concurrency=args.paced_concurrency, max_seconds=args.paced_seconds
        )
        with StatsWindow(case, "paced_load", 0):
            pt.throughput(setup, load_args, case.paced_result)
        case.requests["paced_load"] = case.stats["paced_load"].get("streams_started", 0)
        if case.paced_result.errors:
            raise RuntimeError(f"{case.name}: paced load errors {case.paced_result.statuses}")


def load_phase(case: Case, args: argparse.Namespace) -> None:
    load_args = argparse.Namespace(
        requests=args.stream_requests if case.stream else args.requests,
        concurrency=args.stream_concurrency if case.stream else args.concurrency,
        max_seconds=args.max_seconds,
    )
    with StatsWindow(case, "load", 0):
        pt.throughput(case.setup, load_args, case.result)
    if case.tenant:  # one ext_proc stream per HTTP request
        case.requests["load"] = case.stats["load"].get("streams_started", 0)
    if case.result.errors:
        raise RuntimeError(f"{case.name}: {case.result.errors} errors {case.result.statuses}")


# -- report -----------------------------------------------------------------------------------


def fmt(value: float, digits: int = 2) -> str:
    return pt.fmt(value, digits)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def paired_pct(case: Case, base: Case) -> tuple[float, list[float]]:
    ratios = [100 * c / b for c, b in zip(case.result.rps, base.result.rps, strict=True)]
    return statistics.median(ratios), ratios


def report(
    plain: list[Case], streams: list[Case], args: argparse.Namespace, extras: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {"plain": {}, "streams": {}, "targets": {}}
    base = plain[0]
    base_p50 = pt.percentile(base.result.latencies, 50) * 1e3
    base_p99 = pt.percentile(base.result.latencies, 99) * 1e3
    print()
    print(
        f"CheckStream guardrails benchmark: workers={args.workers}, envoy --concurrency "
        f"{pt.ENVOY_CONCURRENCY}, {os.cpu_count()} CPUs, {args.rounds} rounds; prompt "
        f"{len(json.dumps(PROMPT, separators=(',', ':')))} bytes of JSON"
    )
    print()
    print(
        f"Non-streamed (1 at a time x {args.latency_requests}/round for latency; "
        f"{args.concurrency} connections for req/s; CPU = µs per request under load)"
    )
    head = (
        f"{'case':<14}{'p50 ms':>8}{'+p50':>8}{'p99 ms':>8}{'+p99':>8}{'req/s':>7}"
        f"{'% envoy':>8}{'extproc':>8}{'envoy':>7}{'upstr':>7}{'msgs':>6}  per-round %"
    )
    print(head)
    print("-" * len(head))
    for case in plain:
        s = case.result.summary()
        pct, ratios = paired_pct(case, base)
        cpu = s["cpu_us_per_request"]
        msgs = case.per_request("seq", "stream_msgs_sent") if case.tenant else float("nan")
        print(
            f"{case.name:<14}{fmt(s['p50_ms'], 3):>8}{s['p50_ms'] - base_p50:>+8.3f}"
            f"{fmt(s['p99_ms'], 3):>8}{s['p99_ms'] - base_p99:>+8.3f}{s['rps']:>7.0f}"
            f"{pct:>7.0f}%{cpu.get('extproc', 0):>8.0f}{cpu.get('envoy', 0):>7.0f}"
            f"{cpu.get('upstream', 0):>7.0f}{fmt(msgs, 2):>6}  {[round(r) for r in ratios]}"
        )
        out["plain"][case.name] = {
            **s,
            "added_p50_ms": s["p50_ms"] - base_p50,
            "throughput_pct_of_envoy": pct,
            "ext_proc_msgs_per_request": msgs,
        }

    print()
    print(
        f"Streamed, {ANSWER_EVENTS}-event answers ({ANSWER_EVENTS + 3} SSE events incl. role, "
        f"stop, [DONE]); sequential x {args.streams}/round for times and 'seq' columns; "
        f"{args.stream_concurrency} connections for streams/s and 'load' columns. "
        "µs/ev = extproc CPU per answer event (all of the stream's extproc CPU / 50)"
    )
    head = (
        f"{'case':<14}{'TTFB':>7}{'+TTFB':>7}{'1st txt':>8}{'total':>7}{'str/s':>7}"
        f"{'% envoy':>8}{'µs/ev':>7}{'µs/ev':>7}{'msgs':>7}{'ev/msg':>7}{'msgs':>7}"
        f"{'ev/msg':>7}"
    )
    sub = (
        f"{'':<14}{'ms':>7}{'ms':>7}{'ms':>8}{'ms':>7}{'load':>7}{'load':>8}{'seq':>7}"
        f"{'load':>7}{'seq':>7}{'seq':>7}{'load':>7}{'load':>7}"
    )
    print(head)
    print(sub)
    print("-" * len(head))
    sbase = streams[0]
    base_ttfb = statistics.median(sbase.result.ttfb) * 1e3
    for case in streams:
        s = case.result.summary()
        pct, _ = paired_pct(case, sbase)
        ttft = statistics.median(case.ttft) * 1e3
        seq_us = (
            case.seq_cpu_s.get("extproc", float("nan")) / (case.seq_streams * ANSWER_EVENTS) * 1e6
            if case.tenant
            else float("nan")
        )
        load_us = s["cpu_us_per_request"].get("extproc", float("nan")) / ANSWER_EVENTS
        row: dict[str, Any] = {
            **s,
            "ttft_ms": ttft,
            "added_ttfb_ms": s["ttfb_ms"] - base_ttfb,
            "streams_per_s_pct_of_envoy": pct,
            "extproc_us_per_event_seq": seq_us,
            "extproc_us_per_event_load": load_us,
        }
        cells = []
        for phase in ("seq", "load"):
            msgs = case.per_request(phase, "stream_msgs_sent") if case.tenant else float("nan")
            body_msgs = msgs - NON_BODY_MESSAGES.get(case.tenant or "", 0)
            if case.tenant in ("pass", "body-rt"):
                per_msg = float("nan")  # no response body messages
            else:
                per_msg = (ANSWER_EVENTS + 4) / body_msgs if body_msgs > 0 else float("nan")
            cells += [fmt(msgs, 1), fmt(per_msg, 1)]
            row[f"ext_proc_msgs_per_stream_{phase}"] = msgs
            row[f"ext_proc_msgs_received_per_stream_{phase}"] = case.per_request(
                phase, "stream_msgs_received"
            )
            row[f"events_per_body_msg_{phase}"] = per_msg
        print(
            f"{case.name:<14}{fmt(s['ttfb_ms'], 3):>7}{s['ttfb_ms'] - base_ttfb:>+7.2f}"
            f"{fmt(ttft, 3):>8}{fmt(s['stream_ms'], 2):>7}{s['rps']:>7.0f}{pct:>7.0f}%"
            f"{fmt(seq_us, 1):>7}{fmt(load_us, 1):>7}" + "".join(f"{c:>7}" for c in cells)
        )
        out["streams"][case.name] = row
    print(
        "  (ev/msg: upstream events (54 with the usage chunk CheckStream asks for) per "
        "response-body message; (i) and body-rt get no response-body messages)"
    )

    ttfb = {n: r["ttfb_ms"] for n, r in out["streams"].items()}
    print(
        "  TTFB, step by step (medians): Envoy alone -> (i) pass (request headers round trip) "
        f"{ttfb['(i) pass'] - ttfb['envoy alone']:+.2f} ms -> body-rt (+ request body round "
        f"trip) {ttfb['body-rt'] - ttfb['(i) pass']:+.2f} ms -> (ii) mid-noop (+ response "
        f"headers and first body chunk(s)) {ttfb['(ii) mid-noop'] - ttfb['body-rt']:+.2f} ms "
        f"-> (iii) mid-pii {ttfb['(iii) mid-pii'] - ttfb['(ii) mid-noop']:+.2f} ms"
    )

    msg_costs: list[str] = []
    for name in ("(ii) mid-noop", "(iii) mid-pii"):
        row = out["streams"][name]
        for phase in ("seq", "load"):
            us = row[f"extproc_us_per_event_{phase}"] * ANSWER_EVENTS
            row[f"extproc_us_per_msg_{phase}"] = us / row[f"ext_proc_msgs_per_stream_{phase}"]
        msg_costs.append(
            f"{name} {row['extproc_us_per_msg_seq']:.0f} seq / "
            f"{row['extproc_us_per_msg_load']:.0f} load"
        )
    print(
        "  extproc CPU per ext_proc message sent (per event = this / events per message, and "
        f"Envoy decides how many events a message carries): {'; '.join(msg_costs)} µs"
    )

    paced = [c for c in streams if c.paced_events]
    if paced:
        print()
        print(
            f"Paced streams (x-demo-delay-ms {args.paced_delay_ms:g}, as a model's tokens "
            "arrive: one body message per event): extproc CPU per answer event; 'seq' one "
            f"stream at a time ({args.paced_streams} per case), 'conc' "
            f"{args.paced_concurrency} concurrent streams for {args.paced_seconds:g} s"
        )
        head = (
            f"{'case':<14}{'msgs/str':>9}{'answers':>8}{'µs/ev':>7}{'µs/msg':>7}"
            f"{'msgs/str':>9}{'µs/ev':>7}{'µs/msg':>7}{'envoy µs/ev':>12}"
        )
        sub = f"{'':<14}{'seq':>9}{'seq':>8}{'seq':>7}{'seq':>7}{'conc':>9}{'conc':>7}{'conc':>7}"
        print(head)
        print(sub + f"{'conc':>12}")
        print("-" * len(head))
        for case in paced:
            msgs = case.per_request("paced", "stream_msgs_sent")
            total_msgs = case.stats["paced"].get("stream_msgs_sent", 0)
            if case.paced_cpu_s < 0.05:
                us_event = us_msg = float("nan")  # below the resolution of 10 ms ticks
            else:
                us_event = case.paced_cpu_s / case.paced_events * 1e6
                us_msg = case.paced_cpu_s / total_msgs * 1e6 if total_msgs else float("nan")
            conc = case.paced_result.summary()["cpu_us_per_request"]
            conc_msgs = case.per_request("paced_load", "stream_msgs_sent")
            conc_ev = conc.get("extproc", float("nan")) / ANSWER_EVENTS
            conc_msg = conc.get("extproc", float("nan")) / conc_msgs if conc_msgs else float("nan")
            envoy_ev = conc.get("envoy", float("nan")) / ANSWER_EVENTS
            answers = case.per_request("paced", "stream_msgs_received")
            print(
                f"{case.name:<14}{msgs:>9.1f}{answers:>8.1f}"
                f"{fmt(us_event, 1):>7}{fmt(us_msg, 1):>7}{conc_msgs:>9.1f}{fmt(conc_ev, 1):>7}"
                f"{fmt(conc_msg, 1):>7}{fmt(envoy_ev, 1):>12}"
            )
            out["streams"][case.name]["paced"] = {
                "msgs_per_stream": msgs,
                "us_per_event_seq": us_event,
                "us_per_msg_seq": us_msg,
                "msgs_per_stream_conc": conc_msgs,
                "us_per_event_conc": conc_ev,
                "us_per_msg_conc": conc_msg,
                "envoy_us_per_event_conc": envoy_ev,
            }
        print("  (pass: its per-event CPU is ~0: no body messages; µs/msg = per message sent)")

    # -- verdicts
    sby = {c.name: c for c in streams}
    ingress = out["plain"]["ingress"]
    ingress_only = out["plain"]["ingress-only"]
    passed = out["plain"]["pass"]
    noop = out["streams"]["(ii) mid-noop"]
    mid = out["streams"]["(iii) mid-pii"]
    noop_us = max(noop["extproc_us_per_event_seq"], noop["extproc_us_per_event_load"])
    checks = [
        (
            "ingress tenant: added p50 over Envoy alone",
            f"{ingress['added_p50_ms']:+.3f} ms (target <= {TARGET_INGRESS_ADDED_P50_MS} ms); "
            f"throughput {ingress['throughput_pct_of_envoy']:.0f}% of Envoy alone",
            ingress["added_p50_ms"] <= TARGET_INGRESS_ADDED_P50_MS,
        ),
        (
            "ingress-only tenant: added p50 over Envoy alone",
            f"{ingress_only['added_p50_ms']:+.3f} ms (target <= "
            f"{TARGET_INGRESS_ADDED_P50_MS} ms); throughput "
            f"{ingress_only['throughput_pct_of_envoy']:.0f}% of Envoy alone",
            ingress_only["added_p50_ms"] <= TARGET_INGRESS_ADDED_P50_MS,
        ),
        (
            "(ii) mid-noop: extproc CPU per answer event",
            f"{noop['extproc_us_per_event_seq']:.1f} seq / "
            f"{noop['extproc_us_per_event_load']:.1f} load µs (target <= "
            f"{TARGET_NOOP_US_PER_EVENT:.0f} µs, worse of the two)",
            noop_us <= TARGET_NOOP_US_PER_EVENT,
        ),
        (
            "(iii) mid-pii: added TTFB over Envoy alone",
            f"{mid['added_ttfb_ms']:+.3f} ms (target <= {TARGET_MIDSTREAM_ADDED_TTFB_MS} ms); "
            f"first text {mid['ttft_ms'] - statistics.median(sby['envoy alone'].ttft) * 1e3:+.3f}"
            f" ms; {mid['extproc_us_per_event_seq']:.1f} seq / "
            f"{mid['extproc_us_per_event_load']:.1f} load µs/event",
            mid["added_ttfb_ms"] <= TARGET_MIDSTREAM_ADDED_TTFB_MS,
        ),
        (
            "pass tenant (passthrough.py targets)",
            f"added p50 {passed['added_p50_ms']:+.3f} ms (<= {pt.TARGET_ADDED_P50_MS} ms), "
            f"throughput {passed['throughput_pct_of_envoy']:.0f}% (>= "
            f"{pt.TARGET_THROUGHPUT_PCT:.0f}%)",
            passed["added_p50_ms"] <= pt.TARGET_ADDED_P50_MS
            and passed["throughput_pct_of_envoy"] >= pt.TARGET_THROUGHPUT_PCT,
        ),
    ]
    print()
    print("Targets:")
    for what, detail, ok in checks:
        print(f"  {verdict(ok)}  {what}: {detail}")
        out["targets"][what] = {"detail": detail, "pass": ok}
    print(
        f"(run took {extras['elapsed']:.0f}s; other processes used "
        f"{extras['noise_pct']:.0f}% of the machine's CPU during the rounds"
        + ("  WARNING: noisy machine" if extras["noise_pct"] > 10 else "")
        + f"; policy triggers in the gateway log: {extras['triggers']})"
    )
    return out


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="server.extproc_workers")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--latency-requests", type=int, default=600, help="sequential non-streamed per round"
    )
    parser.add_argument("--requests", type=int, default=3000, help="load requests per round")
    parser.add_argument("--concurrency", type=int, default=16, help="load connections")
    parser.add_argument("--streams", type=int, default=80, help="sequential streams per round")
    parser.add_argument("--stream-requests", type=int, default=1000, help="load streams/round")
    parser.add_argument("--stream-concurrency", type=int, default=8, help="stream connections")
    parser.add_argument(
        "--max-seconds", type=float, default=2.5, help="cap on one load phase's duration"
    )
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per case")
    parser.add_argument("--paced-streams", type=int, default=8, help="paced streams per case")
    parser.add_argument("--paced-delay-ms", type=float, default=2.0, help="their event delay")
    parser.add_argument(
        "--paced-concurrency", type=int, default=8, help="concurrent paced streams (0: none)"
    )
    parser.add_argument("--paced-seconds", type=float, default=2.5, help="for that long")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    parser.add_argument(
        "--hold",
        action="store_true",
        help="after start-up, print ports and pids and wait (for py-spy) until SIGTERM/Ctrl-C",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    with pt._workdir(args.keep_logs) as workdir:
        procs = pt.Processes(workdir)
        signal.signal(signal.SIGTERM, pt._interrupt)
        try:
            pt.say("starting demo upstream, Envoy alone and the gateway ...")
            upstream = pt.start_upstream(procs)
            envoy = pt.start_envoy_alone(procs, upstream.port)
            gateway = start_gateway(procs, upstream.port, args.workers)
            extproc = extproc_pids(gateway)
            if args.hold:
                print(
                    f"upstream :{upstream.port} pid {upstream.process.pid}; envoy alone "
                    f":{envoy.port} pid {envoy.process.pid}; gateway :{gateway.port} "
                    f"(envoy admin :{gateway.admin_port}) pids {gateway.pids}; extproc {extproc}",
                    flush=True,
                )
                while True:
                    time.sleep(3600)

            def service_of(tenant: str | None) -> pt.Service:
                return envoy if tenant is None else gateway

            plain = [make_case(n, t, service_of(t), upstream, False) for n, t, _ in PLAIN_CASES]
            streams = [make_case(n, t, service_of(t), upstream, True) for n, t, _ in STREAM_CASES]
            pt.say("warming up ...")
            for case in plain:
                pt.sequential(case.setup, args.warmup, None)
            for case in streams:
                sequential_streams(case, 5, [], record=False)
            for case in plain + streams:
                pt.run_load(case.setup.port, case.setup.plain, 200, args.concurrency, 1.0)

            ours = [os.getpid()] + [p for s in (upstream, envoy, gateway) for p in s.pids]
            ours_before = sum(pt.cpu_seconds(p) for p in ours)
            busy_before, wall_before = pt.machine_busy_seconds(), time.monotonic()
            for round_no in range(args.rounds):
                pt.say(f"round {round_no + 1}/{args.rounds}")
                for case in plain:
                    pt.sequential(case.setup, 30, None)  # re-warm after the other cases ran
                    with StatsWindow(case, "seq", args.latency_requests):
                        pt.sequential(case.setup, args.latency_requests, case.result)
                    load_phase(case, args)
                for case in streams:
                    sequential_streams(case, 3, [], record=False)  # re-warm
                    sequential_streams(case, args.streams, extproc if case.tenant else [])
                    load_phase(case, args)
                for service in (upstream, envoy, gateway):
                    service.check_alive()
            wall = time.monotonic() - wall_before
            others = pt.machine_busy_seconds() - busy_before
            others -= sum(pt.cpu_seconds(p) for p in ours) - ours_before
            noise = max(0.0, 100 * others / (wall * (os.cpu_count() or 1)))
            if args.paced_streams:
                pt.say("paced streams ...")
                for case in streams[1:]:
                    if case.tenant == "body-rt":
                        continue
                    paced_streams(case, args, extproc)
            triggers = gateway.log.read_text(errors="replace").count("policy_trigger")
            extras = {"elapsed": time.monotonic() - started, "noise_pct": noise}
            extras["triggers"] = triggers
            summary = report(plain, streams, args, extras)
            summary.update(workers=args.workers, other_processes_cpu_pct=noise)
            if args.json:
                args.json.write_text(json.dumps(summary, indent=2))
            pt.say("stopping ...")
            procs.stop(gateway, signal.SIGTERM, 15.0)
            if gateway.process.returncode not in (0, None):
                pt.say(f"gateway exited with {gateway.process.returncode} on SIGTERM")
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
