"""Memory under many long streams: RSS of Envoy, each extproc worker and the launcher.

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/memory.py [--streams 500] [--seconds 120] [--workers 2]
                                     [--json out.json]

Starts the demo upstream and one gateway (``python -m checkstream run -c <temp config>``, what
``checkstream run`` runs) with ``server.extproc_workers: --workers`` and a tenant whose
answers are checked midstream (``pii_detector`` and a 20-term keyword list, ``log`` rules)
and counted (the default usage ledger, SQLite), so every answer event passes through
extproc. Then keeps ``--streams`` streams open at once for ``--seconds``: each connection
sends a streamed chat request for ``--events`` pieces ``--delay-ms`` apart and, when it
ends complete (``data: [DONE]``), sends the next. RSS (``VmRSS``) of Envoy, each worker and
the launcher is sampled before the load, once every stream is open (``start``), every 10 s,
at the end of the window while the streams are still open (``end``), and 3 s after the load.
Growth is ``end / start - 1``; target < 10% per process. The growth over the second half
of the window is printed too: warm-up (allocator arenas, caches) levels off, a leak does not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import guardrails as gr  # bench/ is sys.path[0] when this file is run as a script
import passthrough as pt
import yaml

HOST = pt.HOST
TARGET_GROWTH_PCT = 10.0


def gateway_config(workdir: Path, upstream_port: int, workers: int) -> dict[str, Any]:
    both = ["pii_detector", "banned"]
    policy = workdir / "policy.yaml"
    rules = [
        {"name": f"{c}_seen", "trigger": {"classifier": c, "threshold": 0.5}, "action": "log"}
        for c in both
    ]
    policy.write_text(yaml.safe_dump({"version": "1.0", "name": "streams", "policies": rules}))
    server: dict[str, Any] = {
        "host": HOST,
        "port": pt.free_port(),
        "admin_port": pt.free_port(),
        "extproc_port": pt.free_port_range(workers),
        "envoy_admin_port": pt.free_port(),
        "drain_timeout_s": 2,
        "extproc_workers": workers,
    }
    return {
        "server": server,
        "usage": {"path": str(workdir / "usage.db")},
        "classifiers": {"banned": {"type": "keyword", "terms": gr.BANNED_TERMS}},
        "tenants": {
            "default_tenant": "streams",
            "configs": {
                "streams": {
                    "backend_url": f"http://{HOST}:{upstream_port}/v1",
                    "pipeline": {
                        "ingress": {"classifiers": []},
                        "midstream": {"classifiers": both},
                    },
                    "policy_path": str(policy),
                }
            },
        },
    }


def start_gateway(procs: pt.Processes, upstream_port: int, workers: int) -> pt.Service:
    config = gateway_config(procs.workdir, upstream_port, workers)
    path = procs.workdir / "checkstream.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = config["server"]["port"]
    service = procs.spawn(
        "gateway", [sys.executable, "-m", "checkstream", "run", "-c", str(path)], port
    )
    service.admin_port = config["server"]["envoy_admin_port"]
    procs.wait_until(
        service, lambda: pt._http_status(f"http://{HOST}:{port}/healthz") == 200, "the gateway"
    )
    procs.adopt_children(service)
    return service


def rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def named_pids(gateway: pt.Service) -> dict[str, int]:
    """envoy, worker-0.., launcher -> pid."""
    out: dict[str, int] = {}
    workers = 0
    for pid in gateway.pids:
        kind = pt.process_name(pid)
        if kind == "extproc":
            out[f"worker-{workers}"] = pid
            workers += 1
        elif kind in ("envoy", "launcher"):
            out[kind] = pid
    if "envoy" not in out or "launcher" not in out or not workers:
        raise RuntimeError(f"could not tell the gateway's processes apart: {gateway.pids}")
    return out


class Streams:
    """``count`` connections, each sending one stream after another until ``stop``."""

    def __init__(self, port: int, request: bytes) -> None:
        self.port, self.request = port, request
        self.open = 0
        self.completed = 0
        self.errors: list[str] = []
        self.stop = False

    async def connection(self) -> None:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        try:
            while not self.stop:
                writer.write(self.request)
                parser = pt.ResponseParser()
                tail = b""
                self.open += 1
                try:
                    while True:
                        data = await reader.read(65536)
                        if not data:
                            raise ConnectionError("closed by the gateway")
                        tail = (tail + data)[-64:]
                        if parser.feed(data):
                            break
                finally:
                    self.open -= 1
                if parser.status != 200 or b"[DONE]" not in tail:
                    self.errors.append(f"status {parser.status}, tail {tail!r}")
                else:
                    self.completed += 1
        except (OSError, ValueError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()


async def run(args: argparse.Namespace, gateway: pt.Service) -> dict[str, Any]:
    pids = named_pids(gateway)
    samples: list[dict[str, Any]] = []

    def sample(label: str) -> None:
        samples.append(
            {"label": label, "t": round(time.monotonic() - t0, 1), "open": streams.open}
            | {name: rss_kib(pid) for name, pid in pids.items()}
        )

    request = pt.build_request(
        gateway.port,
        {**gr.PROMPT, "stream": True},
        {"x-demo-chunks": str(args.events), "x-demo-delay-ms": str(args.delay_ms)},
    )
    streams = Streams(gateway.port, request)
    t0 = time.monotonic()
    sample("before")
    tasks = []
    for i in range(args.streams):
        tasks.append(asyncio.create_task(streams.connection()))
        if i % 50 == 49:
            await asyncio.sleep(0.2)  # do not open 500 connections in one burst
    deadline = time.monotonic() + 30
    while streams.open < args.streams and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if streams.open < args.streams:
        raise RuntimeError(f"only {streams.open} of {args.streams} streams open after 30 s")
    sample("start")
    window_start = time.monotonic()
    next_sample = window_start + 10
    while time.monotonic() - window_start < args.seconds:
        await asyncio.sleep(0.5)
        if time.monotonic() >= next_sample:
            sample("during")
            next_sample += 10
        if len(streams.errors) > 10:
            break
    sample("end")
    streams.stop = True
    await asyncio.wait_for(
        asyncio.gather(*tasks, return_exceptions=True), args.delay_ms / 1e3 * args.events + 30
    )
    await asyncio.sleep(3)
    sample("after")
    start = next(s for s in samples if s["label"] == "start")
    end = next(s for s in samples if s["label"] == "end")
    growth = {name: 100 * (end[name] / start[name] - 1) for name in pids if start[name]}
    # Warm-up (allocator arenas, caches filling) against a leak: the second half's growth.
    half = next(s for s in samples if s["t"] >= start["t"] + args.seconds / 2)
    growth_late = {name: 100 * (end[name] / half[name] - 1) for name in pids if half[name]}
    return {
        "streams": args.streams,
        "seconds": args.seconds,
        "events_per_stream": args.events,
        "delay_ms": args.delay_ms,
        "workers": args.workers,
        "completed_streams": streams.completed,
        "errors": streams.errors[:10],
        "error_count": len(streams.errors),
        "samples": samples,
        "growth_pct": growth,
        "growth_second_half_pct": growth_late,
        "verdict": "PASS"
        if all(g < TARGET_GROWTH_PCT for g in growth.values()) and not streams.errors
        else "FAIL",
    }


def print_report(doc: dict[str, Any]) -> None:
    names = [k for k in doc["samples"][0] if k not in ("label", "t", "open")]
    print()
    print(
        f"{doc['streams']} concurrent streams for {doc['seconds']} s ({doc['events_per_stream']} "
        f"events {doc['delay_ms']} ms apart each), {doc['workers']} workers: "
        f"{doc['completed_streams']} streams completed, {doc['error_count']} errors"
    )
    header = f"{'sample':<8}{'t s':>7}{'open':>6}" + "".join(f"{n + ' MiB':>15}" for n in names)
    print(header)
    for s in doc["samples"]:
        print(
            f"{s['label']:<8}{s['t']:>7}{s['open']:>6}"
            + "".join(f"{s[n] / 1024:>15.1f}" for n in names)
        )
    print(
        "growth start -> end: "
        + ", ".join(f"{n} {g:+.1f}%" for n, g in doc["growth_pct"].items())
        + f" (target < {TARGET_GROWTH_PCT:.0f}%)  {doc['verdict']}"
    )
    print(
        "growth over the second half of the window: "
        + ", ".join(f"{n} {g:+.1f}%" for n, g in doc["growth_second_half_pct"].items())
    )
    for error in doc["errors"]:
        print(f"  error: {error}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--events", type=int, default=30, help="text pieces per stream")
    parser.add_argument("--delay-ms", type=int, default=1000, help="between pieces")
    parser.add_argument("--workers", type=int, default=2, help="server.extproc_workers")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep-logs", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    with pt._workdir(args.keep_logs) as workdir:
        procs = pt.Processes(workdir)
        signal.signal(signal.SIGTERM, pt._interrupt)
        try:
            upstream = pt.start_upstream(procs)
            gateway = start_gateway(procs, upstream.port, args.workers)
            doc = asyncio.run(run(args, gateway))
            doc["loadavg"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            print_report(doc)
            if args.json:
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
