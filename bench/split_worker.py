"""A prototype ext_proc worker for the counted tenant's split path, for bench/split_accounting.py.

Runs as its own process (``python bench/split_worker.py --port N --limiter memory``); it is
a measurement prototype, not the product: it does the counted tenant's store work with the
project's real stores (``MemoryLimiter`` or ``RedisLimiter``: acquire with a budget, then
finish with the charge; ``UsageLedger.record`` into SQLite) around whichever message
structure Envoy's filter config gives it. The variant comes in the gRPC initial metadata
``x-bench-variant`` (set per Envoy in the ext_proc ``grpc_service``):

- ``pass``: request headers only, no accounting (the pass-through floor);
- ``today``: one blocking filter seeing request headers, the buffered request body, the
  response headers and the response body (STREAMED): the shape of today's counted tenant.
  Acquire after the body, finish and record at the answer's end, in the same stream;
- ``split2`` / ``split1``: a blocking filter with request headers and the buffered body
  (``split2``) or request headers alone (``split1``, pre-paying no prompt tokens), which
  acquires and hands what the end of the request needs (tenant, lease, reserved tokens,
  model, start time, request id) to the second filter in dynamic metadata; the second
  filter runs with ``observability_mode: true`` (Envoy never waits for it, its answers are
  ignored, so this worker sends none), receives that metadata through
  ``metadata_options.forwarding_namespaces``, reads the status from the response headers
  and the usage from the end of the response body, and finishes and records. Any worker
  can finish any request: the state travels with the request, not in a worker's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ProcessingRequest,
    ProcessingResponse,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkstream.config.model import LimitsConfig, RateLimitConfig
from checkstream.ledger.usage import UsageLedger, UsageRecord, period_of
from checkstream.limits import build_limiter
from checkstream.limits.base import Limiter
from checkstream.limits.decisions import Budget, Charge, to_nano

NAMESPACE = "checkstream"
USAGE_NAMESPACE = "checkstream.usage"
TENANT = "counted"
LIMITS = RateLimitConfig(
    requests_per_minute=10_000_000, tokens_per_minute=1_000_000_000, max_concurrent_requests=1000
)
PRICE_IN, PRICE_OUT = 0.15e-6, 0.60e-6  # USD per token
CONTINUE_HEADERS = ProcessingResponse(request_headers=HeadersResponse())
CONTINUE_RESPONSE_BODY = ProcessingResponse(response_body=BodyResponse())


def _header(headers: Any, name: str) -> str:
    for h in headers.headers.headers:
        if h.key == name:
            return h.raw_value.decode() if h.raw_value else h.value
    return ""


def _usage(body: bytes) -> tuple[str, int, int]:
    """(model, input tokens, output tokens) from a non-streamed OpenAI answer."""
    with_usage = json.loads(body)
    usage = with_usage.get("usage") or {}
    return (
        str(with_usage.get("model", "")),
        int(usage.get("prompt_tokens", 0)),
        int(usage.get("completion_tokens", 0)),
    )


class Accounting:
    """The counted tenant's store work, identical in every variant."""

    def __init__(self, limiter: Limiter, ledger: UsageLedger) -> None:
        self.limiter, self.ledger = limiter, ledger
        self.period = period_of(time.time())
        self.budget = Budget(self.period, to_nano(1e9))

    async def acquire(self, reserved: int) -> dict[str, Any]:
        decision = await self.limiter.acquire(TENANT, LIMITS, reserved, budget=self.budget)
        if not decision.allowed:
            raise RuntimeError(f"refused: {decision}")
        return {
            "lease": decision.lease or "",
            "reserved": reserved,
            "start": time.time(),
            "remaining": decision.remaining or 0,
            "limit": decision.limit or 0,
        }

    async def finish(self, state: dict[str, Any], rid: str, status: int, body: bytes) -> None:
        model, tokens_in, tokens_out = _usage(body) if status == 200 else ("", 0, 0)
        await self.finish_tokens(state, rid, status, model, tokens_in, tokens_out)

    async def finish_tokens(
        self,
        state: dict[str, Any],
        rid: str,
        status: int,
        model: str,
        tokens_in: int,
        tokens_out: int,
    ) -> None:
        cost = tokens_in * PRICE_IN + tokens_out * PRICE_OUT
        await self.limiter.finish(
            TENANT,
            LIMITS,
            int(state["reserved"]),
            tokens_in + tokens_out,
            charge=Charge(self.period, to_nano(cost)),
            lease=str(state["lease"]) or None,
        )
        now = time.time()
        latency = (now - float(state["start"])) * 1e3
        record = UsageRecord(
            now, rid, TENANT, model, tokens_in, tokens_out, False, status, latency, cost
        )
        await self.ledger.record(record)


def _metadata_answer(kind: str, state: dict[str, Any]) -> ProcessingResponse:
    """Continue, handing ``state`` to the accounting filter (and the route's
    ``response_headers_to_add``, which prints ``x-ratelimit-*`` from it)."""
    if kind == "request_headers":
        answer = ProcessingResponse(request_headers=HeadersResponse())
    else:
        answer = ProcessingResponse(request_body=BodyResponse())
    answer.dynamic_metadata.update({NAMESPACE: state})
    return answer


class Worker(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, accounting: Accounting) -> None:
        self.accounting = accounting

    async def Process(
        self, requests: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ProcessingResponse]:
        variant = dict(context.invocation_metadata() or ()).get("x-bench-variant", "pass")
        acc = self.accounting
        state: dict[str, Any] = {}
        rid, status, body = "", 0, b""
        async for request in requests:
            kind = request.WhichOneof("request")
            if request.observability_mode:
                # The accounting-only read of the answer: nothing is answered.
                if not state:
                    fields = request.metadata_context.filter_metadata.get(NAMESPACE)
                    if fields is not None:
                        state = dict(fields.fields.items())
                        state = {k: _value(v) for k, v in state.items()}
                if kind == "response_headers":
                    status = int(_header(request.response_headers, ":status") or 0)
                    if request.response_headers.end_of_stream:
                        await acc.finish(state, str(state.get("rid", "")), status, b"")
                elif kind == "response_body":
                    body += request.response_body.body
                    if request.response_body.end_of_stream:
                        await acc.finish(state, str(state.get("rid", "")), status, body)
                continue
            if kind == "request_headers":
                rid = _header(request.request_headers, "x-request-id")
                if variant == "pass":
                    yield CONTINUE_HEADERS
                elif variant in ("split1", "als1"):
                    state = await acc.acquire(0)
                    state["rid"] = rid
                    yield _metadata_answer(kind, state)
                else:
                    yield CONTINUE_HEADERS
            elif kind == "request_body":
                reserved = len(request.request_body.body) // 4 + 1024
                state = await acc.acquire(reserved)
                state["rid"] = rid
                if variant in ("split2", "als2"):
                    yield _metadata_answer(kind, state)
                else:
                    yield ProcessingResponse(request_body=BodyResponse())
            elif kind == "response_headers":
                status = int(_header(request.response_headers, ":status") or 0)
                yield _limit_headers(state)
            elif kind == "response_body":
                body += request.response_body.body
                if request.response_body.end_of_stream:
                    await acc.finish(state, rid, status, body)
                yield CONTINUE_RESPONSE_BODY


class AccessLogs(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """The ``als`` variants: Envoy's gRPC access log, many requests per message. Each entry
    carries the blocking filter's metadata and the usage a Lua filter read from the end of
    the answer; the entries of one message are finished concurrently (the ledger batches)."""

    def __init__(self, accounting: Accounting) -> None:
        self.accounting = accounting

    async def StreamAccessLogs(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> Any:
        async for message in requests:
            jobs = []
            for entry in message.http_logs.log_entry:
                meta = entry.common_properties.metadata.filter_metadata
                if NAMESPACE not in meta:
                    continue  # not a counted request
                state = {k: _value(v) for k, v in meta[NAMESPACE].fields.items()}
                usage = meta.get(USAGE_NAMESPACE)
                fields = usage.fields if usage is not None else {}
                tokens_in = int(fields["in"].number_value) if "in" in fields else 0
                tokens_out = int(fields["out"].number_value) if "out" in fields else 0
                status = entry.response.response_code.value
                rid = entry.request.request_id
                jobs.append(
                    self.accounting.finish_tokens(state, rid, status, "", tokens_in, tokens_out)
                )
            await asyncio.gather(*jobs)
        return als_pb2.StreamAccessLogsResponse()


def _limit_headers(state: dict[str, Any]) -> ProcessingResponse:
    """Today's shape: ``x-ratelimit-*`` set on the response headers' answer."""
    remaining = str(state.get("remaining", 0)).encode()
    mutation = HeaderMutation(
        set_headers=[
            HeaderValueOption(header=HeaderValue(key="x-ratelimit-remaining", raw_value=remaining))
        ]
    )
    return ProcessingResponse(
        response_headers=HeadersResponse(response=CommonResponse(header_mutation=mutation))
    )


def _value(value: Any) -> Any:
    which = value.WhichOneof("kind")
    return getattr(value, which) if which else None


async def serve(port: int, limiter_kind: str, redis_url: str | None, ledger_path: Path) -> None:
    limiter = build_limiter(LimitsConfig(backend=limiter_kind, url=redis_url))  # type: ignore[arg-type]
    ledger = UsageLedger.open(ledger_path)
    server = grpc.aio.server()
    accounting = Accounting(limiter, ledger)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(Worker(accounting), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogs(accounting), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"split worker on {port} ({limiter_kind})", flush=True)
    await stop.wait()
    await server.stop(1)
    await limiter.aclose()
    await ledger.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--limiter", choices=["memory", "redis"], default="memory")
    parser.add_argument("--redis-url")
    parser.add_argument("--ledger", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.limiter, args.redis_url, args.ledger))


if __name__ == "__main__":
    main()
