"""An extproc worker with a selectable gRPC handler style, for bench/investigate.py only.

Every style but ``null`` runs the project's own ``Exchange`` (extproc/gateway/exchange.py) on the
same ``Runtime``; only the gRPC plumbing around it differs (``rw``/``rw-close``/``sync``
re-implement the message loop of extproc/gateway/server.py: keep them in step if it changes):

- ``gen``: ``checkstream.gateway.server.ExternalProcessor`` unchanged (grpc.aio, async generator).
- ``rw``: grpc.aio, a coroutine handler using ``context.read()`` / ``context.write()``.
- ``rw-close``: like ``rw``, but returns (ends the RPC) right after answering the request
  headers when the answer's mode_override leaves nothing else to send, instead of waiting
  for Envoy to half-close.
- ``sync``: classic threaded ``grpc.server`` with a synchronous generator handler.
- ``null``: grpc.aio async generator answering every message with one prebuilt pass-through
  answer for tenant ``bench`` (no Exchange at all): the floor of the gRPC plumbing.

Flags appended with ``+``: ``uvloop`` (run the aio server on uvloop, if installed),
``gcfreeze`` (``gc.freeze()`` after start-up and a higher gen-0 threshold),
``cio`` (``GRPC_ASYNCIO_ENGINE=custom_io_manager``). Example: ``--style gen+uvloop``.

Usage: python bench/variant_worker.py --style rw -c checkstream.yaml --port 50051
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    CommonResponse,
    HeadersResponse,
    ProcessingRequest,
    ProcessingResponse,
)

# This repo's extproc, also when run from a copy of the repo.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkstream.config.model import load_config
from checkstream.gateway.exchange import Exchange
from checkstream.gateway.mutations import ROUTE_HEADER, header
from checkstream.gateway.runtime import Runtime
from checkstream.gateway.server import ExternalProcessor

_METHODS = {
    "request_headers": "on_request_headers",
    "request_body": "on_request_body",
    "request_trailers": "on_request_trailers",
    "response_headers": "on_response_headers",
    "response_body": "on_response_body",
    "response_trailers": "on_response_trailers",
}


def _call(exchange: Exchange, request: ProcessingRequest) -> Any:
    """The Exchange's answer to one message (may be awaitable in newer Exchange versions)."""
    kind = request.WhichOneof("request")
    if kind not in _METHODS:
        raise ValueError(f"unsupported message {kind}")
    return getattr(exchange, _METHODS[kind])(getattr(request, kind))


def _as_list(answer: Any) -> list[ProcessingResponse]:
    """An Exchange answer (a response, None, or a list of responses) as a list."""
    if answer is None:
        return []
    return list(answer) if isinstance(answer, list) else [answer]


_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def _nothing_more(response: ProcessingResponse) -> bool:
    """True if the answer to request headers leaves Envoy nothing else to send us."""
    if response.HasField("immediate_response"):
        return True
    if not response.HasField("mode_override"):
        return False
    mode = response.mode_override
    return bool(
        mode.request_body_mode == ProcessingMode.NONE
        and mode.response_header_mode == ProcessingMode.SKIP
        and mode.response_body_mode == ProcessingMode.NONE
        and mode.response_trailer_mode != ProcessingMode.SEND
        and mode.request_trailer_mode != ProcessingMode.SEND
    )


class ReadWrite(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime, close_early: bool) -> None:
        self.runtime = runtime
        self.close_early = close_early

    async def Process(
        self, request_iterator: AsyncIterator[ProcessingRequest], context: Any
    ) -> None:
        exchange = Exchange(self.runtime)
        first = True
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            try:
                answer = _call(exchange, request)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(exc))
                return
            if inspect.isawaitable(answer):
                answer = await answer
            responses = _as_list(answer)
            for response in responses:
                await context.write(response)
            if first and self.close_early and responses and _nothing_more(responses[0]):
                return
            first = False


_NULL_ANSWER = ProcessingResponse(
    request_headers=HeadersResponse(
        response=CommonResponse(
            header_mutation={"set_headers": [header(ROUTE_HEADER, "bench")]},
            clear_route_cache=True,
        )
    ),
    mode_override=ProcessingMode(
        request_header_mode=ProcessingMode.SEND,
        request_body_mode=ProcessingMode.NONE,
        response_header_mode=ProcessingMode.SKIP,
        response_body_mode=ProcessingMode.NONE,
        response_trailer_mode=ProcessingMode.SKIP,
    ),
)


class Null(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(
        self, request_iterator: AsyncIterator[ProcessingRequest], context: Any
    ) -> AsyncIterator[ProcessingResponse]:
        async for _ in request_iterator:
            yield _NULL_ANSWER


class Sync(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def Process(
        self, request_iterator: Iterator[ProcessingRequest], context: Any
    ) -> Iterator[ProcessingResponse]:
        exchange = Exchange(self.runtime)
        for request in request_iterator:
            answer = _call(exchange, request)
            if inspect.isawaitable(answer):
                raise TypeError("style sync needs a synchronous Exchange")
            yield from _as_list(answer)


async def _serve_aio(servicer: Any, port: int) -> None:
    server = grpc.aio.server(options=_OPTIONS)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"extproc listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def _serve_sync(servicer: Any, port: int, threads: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=_OPTIONS)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"extproc listening on 127.0.0.1:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--style", default="gen", help="gen|rw|rw-close|sync|null[+flag...]")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args()
    style, *flags = args.style.split("+")
    if "cio" in flags:
        os.environ["GRPC_ASYNCIO_ENGINE"] = "custom_io_manager"
    runtime = Runtime.from_config(load_config(args.config))
    if "gcfreeze" in flags:
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
    if style == "sync":
        _serve_sync(Sync(runtime), args.port, args.threads)
        return
    servicer: Any
    if style == "gen":
        servicer = ExternalProcessor(runtime)
    elif style == "null":
        servicer = Null()
    elif style in ("rw", "rw-close"):
        servicer = ReadWrite(runtime, close_early=style == "rw-close")
    else:
        raise SystemExit(f"unknown style {style}")
    if "uvloop" in flags:
        import uvloop

        uvloop.run(_serve_aio(servicer, args.port))
    else:
        asyncio.run(_serve_aio(servicer, args.port))


if __name__ == "__main__":
    main()
