"""This tree's gateway against an earlier commit's, in one run, on the same upstream.

Usage (from the repo root)::

    .venv/bin/python bench/before_after.py --before-python /path/to/old/.venv/bin/python \\
        [--before-module extproc] [--rounds 5] [--json out.json]

``--before-python`` is the interpreter of a checkout of the earlier commit installed in its
own venv (``git worktree add ../before <commit>``, then ``pip install -e .`` there), and
``--before-module`` the package it runs (``extproc`` before the package was renamed). Both
gateways serve the same pass-through tenant (usage off) in front of one demo upstream; the
rounds interleave them and measure, with ``bench/passthrough.py``'s client: p50/p99 one
request at a time, requests/s at 16 connections, streamed time to first byte, and CPU per
request of each process. Reported as after / before ratios (median of per-round ratios for
throughput). It answers issue #13's "bench numbers within noise" for the restructure: a
ratio within 0.90-1.10 is within the noise this 2-core machine shows between runs.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import passthrough as pt
import yaml


def start(procs: pt.Processes, name: str, python: str, module: str, upstream: int) -> pt.Service:
    port, admin, envoy_admin, extproc = (pt.free_port() for _ in range(4))
    config = {
        "server": {
            "host": pt.HOST,
            "port": port,
            "admin_port": admin,
            "extproc_port": extproc,
            "envoy_admin_port": envoy_admin,
            "drain_timeout_s": 2,
        },
        "usage": {"enabled": False},
        "tenants": {
            "default_tenant": "bench",
            "configs": {"bench": {"backend_url": f"http://{pt.HOST}:{upstream}/v1"}},
        },
    }
    path = procs.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # Run from the checkout the interpreter belongs to, so `-m` finds that tree's package.
    checkout = Path(python).absolute().parent.parent.parent
    argv = [python, "-m", module, "run", "-c", str(path)]
    service = procs.spawn(name, argv, port, cwd=checkout if module != "checkstream" else pt.REPO)
    service.admin_port = envoy_admin
    procs.wait_until(
        service, lambda: pt._http_status(f"http://{pt.HOST}:{port}/healthz") == 200, name
    )
    procs.adopt_children(service)
    return service


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-python", required=True, help="the earlier checkout's python")
    parser.add_argument("--before-module", default="extproc", help="its package (extproc)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with pt._workdir(False) as workdir:
        procs = pt.Processes(workdir)
        signal.signal(signal.SIGTERM, pt._interrupt)
        try:
            upstream = pt.start_upstream(procs)
            before = start(procs, "before", args.before_python, args.before_module, upstream.port)
            after = start(procs, "after", sys.executable, "checkstream", upstream.port)
            setups = [
                pt.Setup("before", before, before.port, upstream),
                pt.Setup("after", after, after.port, upstream),
            ]
            results = {s.name: pt.Result(s.name) for s in setups}
            for setup in setups:
                pt.sequential(setup, 300, None)
                pt.run_load(setup.port, setup.plain, args.requests // 4, args.concurrency, 2.0)
            for round_no in range(args.rounds):
                pt.say(f"round {round_no + 1}/{args.rounds}")
                for setup in setups if round_no % 2 == 0 else reversed(setups):
                    result = results[setup.name]
                    pt.sequential(setup, 50, None)
                    pt.sequential(setup, args.latency_requests, result)
                    pt.throughput(setup, args, result)
                    pt.sequential(setup, args.streams, result, stream=True)
            summary: dict[str, Any] = {n: r.summary() for n, r in results.items()}
            b, a = results["before"], results["after"]
            summary["ratios"] = {
                "p50": summary["after"]["p50_ms"] / summary["before"]["p50_ms"],
                "p99": summary["after"]["p99_ms"] / summary["before"]["p99_ms"],
                "rps": statistics.median(x / y for x, y in zip(a.rps, b.rps, strict=True)),
                "ttfb": summary["after"]["ttfb_ms"] / summary["before"]["ttfb_ms"],
            }
            for name in ("before", "after"):
                s = summary[name]
                print(
                    f"{name:7} p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  "
                    f"{s['rps']:.0f} req/s  ttfb {s['ttfb_ms']:.2f} ms  cpu/req "
                    + ", ".join(f"{k} {v:.0f} µs" for k, v in s["cpu_us_per_request"].items())
                )
            print(
                "after / before: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["ratios"].items())
            )
            if args.json:
                args.json.write_text(json.dumps(summary, indent=2))
            for service in (before, after):
                procs.stop(service, signal.SIGTERM, 15.0)
        except KeyboardInterrupt:
            return 130
        except Exception as exc:
            return pt.report_failure(procs, exc)
        finally:
            procs.cleanup()
    time.sleep(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
