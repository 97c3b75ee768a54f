"""The request's checks before any guardrail runs, each a plain step that either lets the
request go on or says why it is refused (worker process).

Decode (gzip/deflate), parse (bounded JSON), the tenant's model allow-list, parts no text
classifier can read (images, audio, files), then the texts classifiers will see. No I/O: the
exchange turns a ``Refusal`` into the tenant's error answer and accounts for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse

from checkstream.formats import WireFormat
from checkstream.formats.endpoints import Endpoint
from checkstream.formats.jsonbody import RequestJsonError, parse_request_json
from checkstream.formats.texts import TextSlot, readable
from checkstream.gateway.mutations import error_response
from checkstream.gateway.runtime import TenantPlan
from checkstream.intake.encodings import DECODABLE, decode_body


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    code: str
    details: str

    def response(self, fmt: WireFormat) -> ProcessingResponse:
        return error_response(fmt, self.status, self.message, self.code, self.details)


@dataclass(frozen=True)
class ReadBody:
    """A request body that passed its checks: as sent (decoded), parsed, and its texts."""

    raw: bytes
    payload: Any
    model: object
    slots: list[TextSlot]


def headers_refusal(
    plan: TenantPlan, endpoint: Endpoint | None, path: str, has_body: bool, encoding: str
) -> Refusal | None:
    """What the request's headers alone refuse, for a tenant with guardrails: a body for an
    endpoint no guardrail reads (unless the operator passes the path), or a body encoding
    CheckStream cannot decode."""
    if not plan.guarded:
        return None
    bare = path.partition("?")[0]
    if endpoint is None:
        if has_body and bare not in plan.passthrough_paths:
            message = (
                f"{bare} is not an endpoint this gateway checks; the operator can allow it "
                "with the tenant's passthrough_paths"
            )
            return Refusal(400, message, "unsupported_endpoint", "checkstream_endpoint")
        return None
    if encoding not in ("", "identity") and encoding not in DECODABLE:
        message = (
            f"request bodies encoded with {encoding!r} cannot be checked: send identity, "
            "gzip or deflate"
        )
        return Refusal(415, message, "unsupported_content_encoding", "checkstream_encoding")
    return None


def read_body(raw: bytes, encoding: str, plan: TenantPlan, api: WireFormat) -> ReadBody | Refusal:
    if encoding:
        try:
            raw = decode_body(raw, encoding, plan.max_request_bytes)
        except ValueError as exc:
            return Refusal(400, str(exc), "invalid_encoding", "checkstream_encoding")
    try:
        payload = parse_request_json(raw)
    except RequestJsonError as exc:
        return Refusal(400, str(exc), exc.code, "checkstream_json")
    problem = api.request_problem(payload)
    if problem is not None:
        return Refusal(400, problem, "invalid_request", "checkstream_json")
    model = payload.get("model") if isinstance(payload, dict) else None
    models = plan.allowed_models
    if models is not None and (not isinstance(model, str) or model not in models):
        message = f"model {model!r} is not enabled for this tenant"
        return Refusal(400, message, "model_not_allowed", "checkstream_model")
    media = api.media_parts(payload) if plan.refuses_media else []
    if media:
        message = (
            f"this tenant's guardrails cannot check {media[0]} content, so it is not "
            "accepted (the operator can allow it with passthrough_media)"
        )
        return Refusal(400, message, "unsupported_content", "checkstream_media")
    # Lone surrogates (valid JSON escapes) become U+FFFD for the classifiers: a client's odd
    # text is no server error.
    slots = [replace(slot, text=readable(slot.text)) for slot in api.prompt_texts(payload)]
    return ReadBody(raw, payload, model, slots)


def streaming_refusal(plan: TenantPlan, payload: Any) -> Refusal | None:
    """Only one streamed choice can be checked in order; others would pass unseen."""
    if (
        plan.guardrails.midstream.rules
        and isinstance(payload, dict)
        and payload.get("stream")
        and payload.get("n", 1) != 1
    ):
        message = "streamed requests with n > 1 are not supported by this tenant's guardrails"
        return Refusal(400, message, "unsupported_parameter", "checkstream_n")
    return None
