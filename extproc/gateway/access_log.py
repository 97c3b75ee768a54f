"""Deferred accounting's two ends in the worker: the hand-off of a request's Tally to Envoy
(``hand_off``), and Envoy's gRPC access log, where deferred requests are closed.

Envoy sends one stream per Envoy worker thread and batches the entries of many requests in
each message (``envoy_config.py``: flushed every 50 ms); its filter sends only entries of
requests extproc handed off (``accounting/deferred.py``). Each entry is closed exactly as
an inline request: limiter ``finish`` (the lease freed, tokens settled, the budget
charged), ledger row, audit records, metrics and log line. The entries of one message are
closed concurrently, so the Redis limiter and the ledger batch them.

Any worker may close any request: the state travels with it. Run by the worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse

from checkstream.accounting.accounts import Tally, store_failed
from checkstream.accounting.deferred import (
    HANDOFF_KEY,
    LUA_NAMESPACE,
    NAMESPACE,
    Ending,
    handoff,
    settled,
)
from checkstream.gateway.admission import limit_headers
from checkstream.gateway.runtime import Runtime
from checkstream.ops import logs
from checkstream.ops.metrics import EXTPROC_ERRORS

log = logs.get("checkstream.accounting")

_FROM_UPSTREAM = "via_upstream"


def hand_off(
    response: ProcessingResponse, tally: Tally | None, endpoint: str
) -> ProcessingResponse:
    """``response`` with ``tally`` in its dynamic metadata (a copy: the answers without a
    body may be shared constants), or ``response`` itself when there is nothing to hand
    off: no tally, or one already closed because the request was refused here."""
    if tally is None or tally.done or response.HasField("immediate_response"):
        return response
    limits = limit_headers(tally.decision) if tally.decision is not None else []
    handed = ProcessingResponse()
    handed.CopyFrom(response)
    handed.dynamic_metadata.fields[NAMESPACE].struct_value.update(handoff(tally, endpoint, limits))
    return handed


class AccessLogAccounting(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, runtime: Callable[[], Runtime]) -> None:
        #: The runtime in force when an entry arrives (a reload swaps it).
        self.runtime = runtime

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> StreamAccessLogsResponse:
        async for message in request_iterator:
            entries = message.http_logs.log_entry
            if entries:
                await asyncio.gather(*(self.close(entry) for entry in entries))
        return StreamAccessLogsResponse()

    async def close(self, entry: HTTPAccessLogEntry) -> None:
        """Close the request ``entry`` ends; never raises (the stream serves the others)."""
        common = entry.common_properties
        metadata = common.metadata.filter_metadata
        ours = metadata.get(NAMESPACE)
        if ours is None or HANDOFF_KEY not in ours.fields:
            return  # Envoy's filter sends only handed-off requests; nothing to close
        found = metadata.get(LUA_NAMESPACE)
        flags = common.response_flags
        response = entry.response
        ending = Ending(
            status=response.response_code.value,
            from_upstream=response.response_code_details == _FROM_UPSTREAM,
            # Reset by the client, or its connection closed, before Envoy finished.
            client_left=flags.downstream_connection_termination or flags.downstream_remote_reset,
            request_body_bytes=entry.request.request_body_bytes,
            response_body_bytes=response.response_body_bytes,
            found={k: v.string_value for k, v in found.fields.items()} if found else {},
            ended=_ended(entry),
        )
        runtime = self.runtime()
        try:
            tally = settled(ours.fields[HANDOFF_KEY].string_value, ending)
        except (ValueError, KeyError, TypeError) as exc:
            EXTPROC_ERRORS.labels("deferred_entry").inc()
            log.error("deferred_entry_unreadable", error=str(exc))
            return
        plan = runtime.plans.get(tally.tenant)
        if plan is None:
            # Removed by a reload while its request was in flight: its limits and budget
            # went with it, but what it used is still recorded.
            store_failed("deferred_tenant", tally.tenant, KeyError("tenant no longer configured"))
            return
        await runtime.accounts.finish(
            tally, plan.tenant.config, runtime.pricing, runtime.known_models
        )


def _ended(entry: HTTPAccessLogEntry) -> float:
    """When the response ended (its last byte to the client, else the stream's end)."""
    common = entry.common_properties
    start: int = common.start_time.ToNanoseconds()
    last = common.time_to_last_downstream_tx_byte
    end = last if last.seconds or last.nanos else common.duration
    elapsed: int = end.ToNanoseconds()
    return (start + elapsed) / 1e9


def add_to_server(server: grpc.aio.Server, runtime: Callable[[], Runtime]) -> None:
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogAccounting(runtime), server)
