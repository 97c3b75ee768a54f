"""Ready-made ext_proc answers: header mutations, immediate responses, per-tenant forwarding.

The constant part of each tenant's answer is built once per config load, so the per-request
work is a lookup plus, at most, one path header.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    HttpHeaders,
    ImmediateResponse,
    ProcessingResponse,
    StreamedBodyResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct

from checkstream.formats import WireFormat
from checkstream.tenants.resolution import Tenant

ROUTE_HEADER = "x-checkstream-route"
#: The route to the launcher's admin server; not a valid tenant id, so it names no tenant.
ADMIN_ROUTE = "_admin"
METADATA_NAMESPACE = "checkstream"
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_SEND = ProcessingMode.SEND
_SKIP = ProcessingMode.SKIP
_CLIENT_AUTH_HEADERS = ("authorization", "x-api-key")


def header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name, raw_value=value.encode()), append_action=_OVERWRITE
    )


def header_map(headers: HttpHeaders) -> dict[str, str]:
    """Envoy's header list as a dict (names are already lower-case in HTTP/2 and Envoy).

    A header sent several times becomes one comma-separated value (RFC 9110 section 5.3),
    so no value is lost: two ``x-api-key`` headers are both seen, two ``x-tenant-id``
    headers name no tenant.
    """
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        out[h.key] = f"{out[h.key]},{value}" if h.key in out else value
    return out


def immediate(
    status: int,
    body: bytes,
    extra_headers: Iterable[tuple[str, str]] = (),
    details: str = "checkstream",
) -> ProcessingResponse:
    headers = [header("content-type", "application/json")]
    headers += [header(k, v) for k, v in extra_headers]
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=status),
            headers=HeaderMutation(set_headers=headers),
            body=body,
            details=details,
        )
    )


def error_response(
    fmt: WireFormat, status: int, message: str, code: str, details: str
) -> ProcessingResponse:
    return immediate(status, fmt.error_body(status, message, code), details=details)


@dataclass(frozen=True)
class Forwarding:
    """The constant part of a tenant's request-headers answer, built once per config load."""

    set_headers: tuple[HeaderValueOption, ...]
    remove_headers: tuple[str, ...]
    mode: ProcessingMode
    metadata: Struct | None


def build_forwarding(
    tenant: Tenant,
    *,
    needs_request_body: bool,
    needs_response: bool,
    keep_client_key: bool,
    plain_answers: bool | None = None,
) -> Forwarding:
    """``needs_response``: extproc reads the answer; ``plain_answers`` (default: the same):
    something reads it (extproc, or Envoy's usage reader for deferred accounting)."""
    cfg = tenant.config
    sets = [header(ROUTE_HEADER, tenant.id)]
    sets += [header(name, value) for name, value in cfg.headers.items()]
    if needs_response if plain_answers is None else plain_answers:
        # An answer that is read (checked or metered) must be readable: compressed answers
        # would pass every check unseen. Encodings a backend sends anyway are decoded.
        sets.append(header("accept-encoding", "identity"))
    removes: list[str] = []
    if tenant.secret is not None:
        sets.append(header(tenant.format.auth_header, tenant.format.auth_value(tenant.secret)))
        removes += [h for h in _CLIENT_AUTH_HEADERS if h != tenant.format.auth_header]
    elif not keep_client_key:
        removes += list(_CLIENT_AUTH_HEADERS)
    mode = ProcessingMode(
        request_header_mode=_SEND,
        request_body_mode=ProcessingMode.BUFFERED if needs_request_body else ProcessingMode.NONE,
        response_header_mode=_SEND if needs_response else _SKIP,
        response_body_mode=(
            ProcessingMode.FULL_DUPLEX_STREAMED if needs_response else ProcessingMode.NONE
        ),
        response_trailer_mode=_SEND if needs_response else _SKIP,
    )
    metadata = None
    if tenant.format.name != "openai":
        # Envoy's local replies (backend down, timeout) read this to answer in the
        # tenant's format; OpenAI's is the default there.
        metadata = Struct()
        metadata.update({METADATA_NAMESPACE: {"format": tenant.format.name}})
    return Forwarding(tuple(sets), tuple(removes), mode, metadata)


#: The answer for /metrics, /readyz and operator /admin/* requests: on to the admin server,
#: which checks the admin token itself; extproc sees nothing more of them.
TO_ADMIN = ProcessingResponse(
    request_headers=HeadersResponse(
        response=CommonResponse(
            header_mutation=HeaderMutation(set_headers=[header(ROUTE_HEADER, ADMIN_ROUTE)]),
            clear_route_cache=True,
        )
    ),
    mode_override=ProcessingMode(
        request_header_mode=_SEND,
        request_body_mode=ProcessingMode.NONE,
        response_header_mode=_SKIP,
        response_body_mode=ProcessingMode.NONE,
        response_trailer_mode=_SKIP,
    ),
)


def streamed_body(body: bytes, end_of_stream: bool) -> ProcessingResponse:
    """A response-body answer in full-duplex mode: these bytes go to the client now, and
    ``end_of_stream`` ends its response."""
    return ProcessingResponse(
        response_body=BodyResponse(
            response=CommonResponse(
                body_mutation=BodyMutation(
                    streamed_response=StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
                )
            )
        )
    )
