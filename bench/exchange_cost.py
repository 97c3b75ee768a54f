"""extproc's own Python work per request, without gRPC: what is left once the wire is gone.

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/exchange_cost.py [--iterations 2000] [--events-per-chunk 1 4 54]
                                            [--profile TENANT:K]

Builds the ``Runtime`` of ``bench/guardrails.py``'s gateway config (same tenants, classifiers
and policies) and feeds ``checkstream.gateway.server.ExternalProcessor.Process`` (server.py's
message
loop and the real ``Exchange``) the ext_proc messages Envoy would send for one request, as
serialized protobuf bytes: request headers, then for tenants that need them the buffered
request body, response headers and the response body cut into chunks of K SSE events each
(K=1: every event its own network read, as with a paced upstream; the gateway benchmark
measures 4 to 10 events per message with the demo upstream at chunk delay 0), plus an empty
end-of-stream chunk. Every answer is serialized. Bodies are the demo upstream's real answers
to the benchmark's prompt (fetched once from a demo upstream subprocess).

Printed: CPU µs per request and per answer event for each tenant and K. Subtracting this
from the extproc CPU that ``bench/guardrails.py`` measures per request gives the cost of the
gRPC plumbing (grpc.aio, HTTP/2, the poller thread) per message.

``--profile TENANT:K`` also prints the top functions (cProfile, cumulative) for that case.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import guardrails as gr
import passthrough as pt
import yaml
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
)

from checkstream.config.model import load_config
from checkstream.gateway.runtime import Runtime
from checkstream.gateway.server import ExternalProcessor

TENANTS = ["pass", "body-rt", "ingress", "ingress-only", "mid-noop", "mid-pii"]


def _headers(pairs: list[tuple[str, str]], end: bool = False) -> HttpHeaders:
    values = [HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
    return HttpHeaders(headers=HeaderMap(headers=values), end_of_stream=end)


def fetch(port: int, body: dict[str, Any]) -> bytes:
    request = urllib.request.Request(
        f"http://{pt.HOST}:{port}{pt.PATH}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "x-demo-chunks": str(gr.ANSWER_EVENTS)},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


def messages(
    tenant: str, stream: bool, answer: bytes, events_per_chunk: int, runtime: Runtime
) -> list[bytes]:
    """Serialized ProcessingRequests Envoy sends for one request of ``tenant``."""
    plan = runtime.plans[tenant]
    payload = {**gr.PROMPT, "stream": True} if stream else gr.PROMPT
    body = json.dumps(payload, separators=(",", ":")).encode()
    out = [
        ProcessingRequest(
            request_headers=_headers(
                [
                    (":method", "POST"),
                    (":path", pt.PATH),
                    (":authority", f"{pt.HOST}:10000"),
                    (":scheme", "http"),
                    ("content-type", "application/json"),
                    ("content-length", str(len(body))),
                    ("x-tenant-id", tenant),
                    ("x-demo-chunks", str(gr.ANSWER_EVENTS)),
                    ("x-request-id", "0f5b8f8e-4f8a-4b8e-9a77-0f6f2f1f3a4b"),
                    ("x-forwarded-proto", "http"),
                ]
            )
        )
    ]
    if plan.forwarding.mode.request_body_mode != ProcessingMode.NONE:
        out.append(ProcessingRequest(request_body=HttpBody(body=body, end_of_stream=True)))
    if plan.reads_answer_usage:
        ctype = "text/event-stream" if stream else "application/json; charset=utf-8"
        out.append(
            ProcessingRequest(
                response_headers=_headers(
                    [(":status", "200"), ("content-type", ctype), ("server", "envoy")]
                )
            )
        )
        if stream:
            events = [e + b"\n\n" for e in answer.split(b"\n\n") if e]
            chunks = [
                b"".join(events[i : i + events_per_chunk])
                for i in range(0, len(events), events_per_chunk)
            ]
        else:
            chunks = [answer]
        for chunk in chunks:
            out.append(ProcessingRequest(response_body=HttpBody(body=chunk)))
        out.append(ProcessingRequest(response_body=HttpBody(body=b"", end_of_stream=True)))
    return [m.SerializeToString() for m in out]


async def _requests(raw: list[bytes]) -> AsyncIterator[ProcessingRequest]:
    for item in raw:
        yield ProcessingRequest.FromString(item)


async def one(processor: ExternalProcessor, raw: list[bytes]) -> int:
    answers = 0
    async for answer in processor.Process(_requests(raw), None):
        answer.SerializeToString()
        answers += 1
    return answers


async def measure(processor: ExternalProcessor, raw: list[bytes], iterations: int) -> float:
    for _ in range(min(200, iterations)):
        await one(processor, raw)
    start = time.process_time()
    for _ in range(iterations):
        await one(processor, raw)
    return (time.process_time() - start) / iterations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--events-per-chunk", type=int, nargs="+", default=[1, 4, 54])
    parser.add_argument("--profile", help="TENANT:K, e.g. mid-noop:4")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="checkstream-exchange-") as tmp:
        workdir = Path(tmp)
        procs = pt.Processes(workdir)
        try:
            upstream = pt.start_upstream(procs)
            streamed = fetch(
                upstream.port,
                {**gr.PROMPT, "stream": True, "stream_options": {"include_usage": True}},
            )
            plain = fetch(upstream.port, gr.PROMPT)
        finally:
            procs.cleanup()
        config = gr.gateway_config(workdir, upstream.port, 1)
        path = workdir / "checkstream.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        runtime = Runtime.from_config(load_config(path))
    processor = ExternalProcessor(runtime)
    print(
        f"extproc Python work per request, no gRPC ({args.iterations} iterations each); "
        f"stream: {streamed.count(b'data: ')} SSE events from upstream, {gr.ANSWER_EVENTS} "
        "with answer text"
    )
    print(f"{'tenant':<14}{'kind':<14}{'msgs':>5}{'answers':>8}{'µs/request':>11}{'µs/event':>9}")
    for tenant in TENANTS:
        plan = runtime.plans[tenant]
        cases: list[tuple[str, bool, int]] = [("non-streamed", False, 0)]
        if plan.reads_answer_usage:
            cases += [(f"stream K={k}", True, k) for k in args.events_per_chunk]
        else:
            cases.append(("stream", True, 0))
        for kind, stream, k in cases:
            raw = messages(tenant, stream, streamed if stream else plain, k, runtime)
            answers = asyncio.run(one(processor, raw))
            cost = asyncio.run(measure(processor, raw, args.iterations))
            per_event = f"{cost / gr.ANSWER_EVENTS * 1e6:9.1f}" if stream else f"{'':>9}"
            print(f"{tenant:<14}{kind:<14}{len(raw):>5}{answers:>8}{cost * 1e6:>11.0f}{per_event}")
    if args.profile:
        tenant, _, k = args.profile.partition(":")
        raw = messages(tenant, True, streamed, int(k or 4), runtime)
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(measure(processor, raw, args.iterations))
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
