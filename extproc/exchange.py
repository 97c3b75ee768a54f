"""One HTTP request as extproc sees it: ext_proc messages in, ext_proc answers out.

``server.py`` owns the gRPC stream and hands each message to an ``Exchange``; the exchange
never touches gRPC, so tests feed it real protobuf messages directly.

Body modes (the filter's static config, see ``envoy_config.py``), and why:

- request body ``BUFFERED``: classifiers and redaction need the whole prompt, which is small
  next to the answer; Envoy enforces ``server.max_request_bytes`` (413) before extproc sees it.
- response body ``FULL_DUPLEX_STREAMED``: answers are long SSE streams that must reach the
  client incrementally, and midstream checks must be able to hold text back, merge chunks
  and end the client's response *at once* with ``end_of_stream`` (STREAMED mode cannot end a
  response before the upstream does). It requires trailers to be sent too.

Python's cost is per gRPC message, so every request asks only for what its tenant needs:
the answer to the request headers carries a ``mode_override`` that switches off the request
body, response headers and response body for tenants with nothing to check there. A plain
pass-through request costs one message.
"""

from __future__ import annotations

import json

from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingResponse,
    StreamedBodyResponse,
    TrailersResponse,
)

from extproc.mutations import error_response, header, header_map, immediate
from extproc.runtime import Runtime, TenantPlan
from extproc.tenancy import Refused, Resolved

_EMPTY_BODY_RESPONSE = ProcessingResponse(request_body=BodyResponse())
_EMPTY_RESPONSE_HEADERS = ProcessingResponse(response_headers=HeadersResponse())
_EMPTY_TRAILERS = ProcessingResponse(response_trailers=TrailersResponse())


class Exchange:
    """The state of one request between its ext_proc messages."""

    __slots__ = ("plan", "request_body", "runtime")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.plan: TenantPlan | None = None
        self.request_body = bytearray()

    # -- request ---------------------------------------------------------------------------
    def on_request_headers(self, msg: HttpHeaders) -> ProcessingResponse:
        headers = header_map(msg)
        path = headers.get(":path", "/")
        if path == "/healthz" or path.startswith("/healthz?"):
            return self._health()
        runtime = self.runtime
        found = runtime.resolver.resolve(path, headers)
        if isinstance(found, Refused):
            return error_response(
                found.format, found.status, found.message, found.code, "checkstream_tenancy"
            )
        plan = runtime.plans[found.tenant.id]
        self.plan = plan
        if found.path.startswith("/admin/"):
            return self._admin(found)
        keep_key = plan.tenant.config.auth_passthrough and not found.key_is_ours
        fwd = plan.forwarding if keep_key else plan.forwarding_without_key
        upstream_path = plan.tenant.backend.upstream_path(found.path)
        sets = list(fwd.set_headers)
        if upstream_path != path:
            sets.append(header(":path", upstream_path))
        mutation = HeaderMutation(set_headers=sets, remove_headers=fwd.remove_headers)
        response = ProcessingResponse(
            request_headers=HeadersResponse(
                response=CommonResponse(header_mutation=mutation, clear_route_cache=True)
            ),
            mode_override=fwd.mode,
        )
        if fwd.metadata is not None:
            response.dynamic_metadata.CopyFrom(fwd.metadata)
        return response

    def on_request_body(self, msg: HttpBody) -> ProcessingResponse:
        self.request_body += msg.body
        if not msg.end_of_stream:
            return _EMPTY_BODY_RESPONSE
        plan = self.plan
        if plan is None or not self.request_body:
            return _EMPTY_BODY_RESPONSE
        fmt = plan.tenant.format
        try:
            payload = json.loads(self.request_body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return error_response(
                fmt,
                400,
                f"request body is not valid JSON: {exc}",
                "invalid_json",
                "checkstream_json",
            )
        models = plan.allowed_models
        if models is not None:
            model = payload.get("model") if isinstance(payload, dict) else None
            if not isinstance(model, str) or model not in models:
                return error_response(
                    fmt,
                    400,
                    f"model {model!r} is not enabled for this tenant",
                    "model_not_allowed",
                    "checkstream_model",
                )
        return _EMPTY_BODY_RESPONSE

    def on_request_trailers(self, msg: HttpTrailers) -> ProcessingResponse:
        return ProcessingResponse(request_trailers=TrailersResponse())

    # -- response --------------------------------------------------------------------------
    def on_response_headers(self, msg: HttpHeaders) -> ProcessingResponse:
        return _EMPTY_RESPONSE_HEADERS

    def on_response_body(self, msg: HttpBody) -> ProcessingResponse:
        # FULL_DUPLEX_STREAMED: whatever is not sent back is lost, so pass-through echoes.
        return ProcessingResponse(
            response_body=BodyResponse(
                response=CommonResponse(
                    body_mutation=BodyMutation(
                        streamed_response=StreamedBodyResponse(
                            body=msg.body, end_of_stream=msg.end_of_stream
                        )
                    )
                )
            )
        )

    def on_response_trailers(self, msg: HttpTrailers) -> ProcessingResponse:
        return _EMPTY_TRAILERS

    # -- local answers ---------------------------------------------------------------------
    def _health(self) -> ProcessingResponse:
        if self.runtime.draining:
            return immediate(503, b'{"status":"draining"}', details="checkstream_health")
        return immediate(200, b'{"status":"ok"}', details="checkstream_health")

    def _admin(self, found: Resolved) -> ProcessingResponse:
        fmt = found.tenant.format
        if found.path.partition("?")[0] != "/admin/tenant-info":
            return error_response(fmt, 404, "not found", "not_found", "checkstream_admin")
        body = json.dumps(self.runtime.tenant_info(found.tenant.id), indent=2).encode()
        return immediate(200, body, details="checkstream_admin")
