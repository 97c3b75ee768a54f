"""The id that ties a response to its ledger row, audit records and log line (worker).

A client may choose it (``x-request-id``): it is kept when it is a plain, short token, since
it lands in logs, audit trails and the ledger; anything else is replaced by a new id, which
the client then sees on the response.
"""

from __future__ import annotations

import re
import uuid

from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ProcessingResponse

from checkstream.gateway.mutations import header

HEADER = "x-request-id"
MAX_CHARS = 128
_VALID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_CHARS}}}")


def is_valid(value: str) -> bool:
    return _VALID.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id(given: str | None) -> str:
    """``given`` if it is a valid id, else a new one."""
    if given is not None and is_valid(given):
        return given
    return new_request_id()


def stamp(msg: HttpHeaders) -> str | None:
    """Make the request's ``x-request-id`` valid in ``msg`` itself; the new id if it had to
    be replaced (or added), None if the client's (or Envoy's) stands."""
    for entry in msg.headers.headers:
        if entry.key == HEADER:
            given = entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value
            if is_valid(given):
                return None
            fresh = new_request_id()
            entry.raw_value = fresh.encode()
            entry.value = ""
            return fresh
    fresh = new_request_id()
    msg.headers.headers.add(key=HEADER, raw_value=fresh.encode())
    return fresh


def with_request_id(answer: ProcessingResponse, rid: str) -> ProcessingResponse:
    """A copy of the request-headers ``answer`` that gives the request (and so its response)
    the id ``rid``: set on the request forwarded, or on the immediate response."""
    out = ProcessingResponse()
    out.CopyFrom(answer)
    if out.HasField("immediate_response"):
        out.immediate_response.headers.set_headers.append(header(HEADER, rid))
    else:
        out.request_headers.response.header_mutation.set_headers.append(header(HEADER, rid))
    return out
