"""The ext_proc gRPC service: one ``Process`` stream per HTTP request, mapped to an Exchange.

This module holds the protocol loop and nothing else; decisions live in ``exchange.py``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    ProcessingRequest,
    ProcessingResponse,
)

from extproc.exchange import Answer, Exchange
from extproc.runtime import Runtime

log = logging.getLogger("checkstream.extproc")


class ExternalProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def Process(
        self, request_iterator: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ProcessingResponse]:
        exchange = Exchange(self.runtime)
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            answer: Answer
            if kind == "request_headers":
                answer = exchange.on_request_headers(request.request_headers)
            elif kind == "response_body":
                answer = await exchange.on_response_body(request.response_body)
            elif kind == "request_body":
                answer = await exchange.on_request_body(request.request_body)
            elif kind == "response_headers":
                answer = exchange.on_response_headers(request.response_headers)
            elif kind == "response_trailers":
                answer = await exchange.on_response_trailers(request.response_trailers)
            elif kind == "request_trailers":
                answer = exchange.on_request_trailers(request.request_trailers)
            else:
                # A message this version does not know: answering nothing would stall the
                # request until message_timeout, so fail it now and say why.
                log.error("unsupported ext_proc message %r", kind)
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"unsupported message {kind}")
                return
            if answer is None:
                continue
            if isinstance(answer, list):
                for item in answer:
                    yield item
            else:
                yield answer


def build_server(runtime: Runtime, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessor(runtime), server
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0  # grpcio raises where older versions returned 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} for extproc (port in use?)")
    return server, bound


async def serve(runtime: Runtime, host: str, port: int, grace_s: float) -> None:
    """Serve until SIGTERM/SIGINT, then finish in-flight streams (up to ``grace_s``)."""
    server, bound = build_server(runtime, host, port)
    await server.start()
    print(f"extproc listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    runtime.draining = True
    await server.stop(grace_s)
