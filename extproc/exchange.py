"""One HTTP request as extproc sees it: ext_proc messages in, ext_proc answers out.

``server.py`` owns the gRPC stream and hands each message to an ``Exchange``; the exchange
never touches gRPC, so tests feed it real protobuf messages directly.

Body modes, and why. Every request starts with its headers; the answer to
them carries a ``mode_override`` that asks for exactly what the tenant needs:

- request body ``BUFFERED`` (tenants with ingress rules, a model allowlist or midstream
  rules): classifiers and redaction need the whole prompt, which is small next to the
  answer; Envoy enforces ``server.max_request_bytes`` (413) before extproc sees it.
- response headers and body ``FULL_DUPLEX_STREAMED`` (tenants with midstream rules): answers
  are long SSE streams that must reach the client incrementally, and midstream checks must
  be able to hold text back, merge chunks and end the client's response *at once* with
  ``end_of_stream`` (STREAMED mode cannot end a response before the upstream does). It
  requires trailers to be sent too.

Python's cost is per gRPC message, so a plain pass-through request costs one message.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import TypeAlias

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

from extproc.formats.texts import dump_json
from extproc.metrics import CLASSIFIER_ERRORS, POLICY_TRIGGERS
from extproc.midstream import MidstreamGuard, Release
from extproc.mutations import error_response, header, header_map, immediate
from extproc.pipeline import Verdict
from extproc.runtime import Runtime, TenantPlan
from extproc.tenancy import Refused, Resolved

log = logging.getLogger("checkstream.policy")

RULE_HEADER = "x-checkstream-rule"
_EMPTY_BODY_RESPONSE = ProcessingResponse(request_body=BodyResponse())
_EMPTY_RESPONSE_HEADERS = ProcessingResponse(response_headers=HeadersResponse())
_EMPTY_TRAILERS = ProcessingResponse(response_trailers=TrailersResponse())
_WITHOUT_CONTENT_LENGTH = ProcessingResponse(
    response_headers=HeadersResponse(
        response=CommonResponse(header_mutation=HeaderMutation(remove_headers=["content-length"]))
    )
)

Answer: TypeAlias = ProcessingResponse | list[ProcessingResponse] | None


def _streamed(body: bytes, end_of_stream: bool) -> ProcessingResponse:
    return ProcessingResponse(
        response_body=BodyResponse(
            response=CommonResponse(
                body_mutation=BodyMutation(
                    streamed_response=StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
                )
            )
        )
    )


class Exchange:
    """The state of one request between its ext_proc messages."""

    __slots__ = (
        "answer",
        "checking_answer",
        "drop_usage_chunk",
        "midstream",
        "plan",
        "request_body",
        "runtime",
    )

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.plan: TenantPlan | None = None
        self.request_body = bytearray()
        #: The non-streamed answer, held back until it has been checked whole (egress).
        self.answer = bytearray()
        self.checking_answer = False
        #: The streamed answer's guard, when its tenant has midstream rules.
        self.midstream: MidstreamGuard | None = None
        #: CheckStream asked the backend for stream usage; the client did not.
        self.drop_usage_chunk = False

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

    async def on_request_body(self, msg: HttpBody) -> ProcessingResponse:
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
        rails = plan.guardrails.ingress
        new_body: bytes | None = None
        if rails.rules:
            slots = fmt.prompt_texts(payload)
            verdict = await self.runtime.checker.check(
                rails, [slot.text for slot in slots], [slot.source for slot in slots]
            )
            if verdict.failure is not None:
                if not self._fails_open(plan, verdict, "ingress"):
                    return error_response(
                        fmt,
                        503,
                        "a guardrail check failed, so the request was not processed",
                        "guardrail_error",
                        "checkstream_classifier",
                    )
            elif verdict.action is not None:
                self._record(plan, verdict, "ingress")
                deciding = verdict.deciding
                assert deciding is not None
                if verdict.action in ("block", "stop"):
                    rule = deciding.rule
                    message = (
                        rule.message or f"the request was blocked by policy rule '{rule.name}'"
                    )
                    return immediate(
                        400,
                        fmt.policy_error_body(message, rule.name),
                        [(RULE_HEADER, rule.name)],
                        details="checkstream_policy",
                    )
                if verdict.action == "redact":
                    new_body = fmt.redact_request(payload, slots, verdict.redactions)
                    payload = json.loads(new_body)
        if plan.guardrails.midstream.rules:
            if isinstance(payload, dict) and payload.get("stream") and payload.get("n", 1) != 1:
                # Only one streamed choice can be checked in order; others would pass unseen.
                return error_response(
                    fmt,
                    400,
                    "streamed requests with n > 1 are not supported by this tenant's guardrails",
                    "unsupported_parameter",
                    "checkstream_n",
                )
            # Exact token counts need the backend's usage, which OpenAI streams only on
            # request; the extra chunk is removed before the client sees it.
            with_usage = fmt.ensure_stream_usage(payload)
            if with_usage is not None:
                self.drop_usage_chunk = True
                new_body = dump_json(with_usage)
        if new_body is None:
            return _EMPTY_BODY_RESPONSE
        return ProcessingResponse(
            request_body=BodyResponse(
                response=CommonResponse(
                    header_mutation=HeaderMutation(
                        set_headers=[header("content-length", str(len(new_body)))]
                    ),
                    body_mutation=BodyMutation(body=new_body),
                )
            )
        )

    def on_request_trailers(self, msg: HttpTrailers) -> ProcessingResponse:
        return ProcessingResponse(request_trailers=TrailersResponse())

    # -- response --------------------------------------------------------------------------
    def on_response_headers(self, msg: HttpHeaders) -> ProcessingResponse:
        plan = self.plan
        if plan is None or not plan.guardrails.midstream.rules:
            return _EMPTY_RESPONSE_HEADERS
        headers = header_map(msg)
        if headers.get(":status") != "200":
            return _EMPTY_RESPONSE_HEADERS  # the backend's own errors pass unchanged
        rails = plan.guardrails
        if "text/event-stream" in headers.get("content-type", ""):
            tenant = plan.tenant
            self.midstream = MidstreamGuard(
                tenant.format,
                self.runtime.checker,
                rails.midstream,
                window_tokens=rails.window_tokens,
                holdback_tokens=rails.holdback_tokens,
                drop_usage_chunk=self.drop_usage_chunk,
                fail_open=tenant.config.fail_mode == "open",
                on_verdict=partial(self._midstream_verdict, plan),
            )
        else:
            # A whole answer is checked before any of it is released (egress).
            self.checking_answer = True
        # The answer's length may change.
        return _WITHOUT_CONTENT_LENGTH

    async def on_response_body(self, msg: HttpBody) -> Answer:
        guard = self.midstream
        if guard is not None:
            if guard.stopped:
                return None  # the client's response has ended; the rest is discarded
            release = await guard.feed(msg.body)
            if msg.end_of_stream and not release.end:
                tail = await guard.finish()
                release = Release(release.body + tail.body, end=True)
            if not release.body and not release.end:
                return None  # held back: full-duplex mode needs no answer per chunk
            return _streamed(release.body, release.end)
        if not self.checking_answer:
            # FULL_DUPLEX_STREAMED: whatever is not sent back is lost, so pass-through echoes.
            return _streamed(msg.body, msg.end_of_stream)
        self.answer += msg.body
        if not msg.end_of_stream:
            return None  # held back: full-duplex mode needs no answer per chunk
        return _streamed(await self._checked_answer(), True)

    async def on_response_trailers(self, msg: HttpTrailers) -> Answer:
        guard = self.midstream
        if guard is not None and not guard.stopped:
            return [_streamed((await guard.finish()).body, False), _EMPTY_TRAILERS]
        if self.checking_answer:
            # The body ended with trailers rather than end_of_stream: release it now.
            return [_streamed(await self._checked_answer(), False), _EMPTY_TRAILERS]
        return _EMPTY_TRAILERS

    async def _checked_answer(self) -> bytes:
        """The held-back answer after egress checks: unchanged, redacted or replaced."""
        plan = self.plan
        assert plan is not None
        self.checking_answer = False
        body = bytes(self.answer)
        fmt = plan.tenant.format
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return body  # not an answer we know how to read, e.g. an error page
        slots = fmt.answer_texts(payload)
        verdict = await self.runtime.checker.check(
            plan.guardrails.egress, [slot.text for slot in slots], ["answer"] * len(slots)
        )
        if verdict.failure is not None:
            if self._fails_open(plan, verdict, "egress"):
                return body
            return fmt.blocked_answer(
                payload, "the answer was withheld: its guardrail check failed", "guardrail_error"
            )
        if verdict.action is None:
            return body
        self._record(plan, verdict, "egress")
        deciding = verdict.deciding
        assert deciding is not None
        if verdict.action in ("block", "stop"):
            rule = deciding.rule
            message = rule.message or f"the answer was withheld by policy rule '{rule.name}'"
            return fmt.blocked_answer(payload, message, rule.name)
        if verdict.action == "redact":
            return fmt.redact_answer(payload, slots, verdict.redactions)
        return body

    # -- policy bookkeeping ----------------------------------------------------------------
    def _midstream_verdict(self, plan: TenantPlan, verdict: Verdict) -> None:
        if verdict.failure is not None:
            self._fails_open(plan, verdict, "midstream")
        elif verdict.action is not None:
            self._record(plan, verdict, "midstream")

    def _record(self, plan: TenantPlan, verdict: Verdict, phase: str) -> None:
        tenant = plan.tenant.id
        for trigger in verdict.triggers:
            rule = trigger.rule
            POLICY_TRIGGERS.labels(tenant, rule.name, rule.action).inc()
            # Structured, and never the text itself: prompts and answers may hold PII.
            log.info(
                json.dumps(
                    {
                        "event": "policy_trigger",
                        "tenant": tenant,
                        "phase": phase,
                        "rule": rule.name,
                        "action": rule.action,
                        "classifier": rule.classifier,
                        "score": round(trigger.score, 4),
                        "threshold": rule.threshold,
                        "regulation": rule.regulation,
                    }
                )
            )

    def _fails_open(self, plan: TenantPlan, verdict: Verdict, phase: str) -> bool:
        """Count and log a failed check; True if the tenant's fail mode lets traffic pass."""
        tenant = plan.tenant
        CLASSIFIER_ERRORS.labels(tenant.id, verdict.failed_classifier or "unknown").inc()
        log.error(
            json.dumps(
                {
                    "event": "classifier_failure",
                    "tenant": tenant.id,
                    "phase": phase,
                    "error": verdict.failure,
                    "fail_mode": tenant.config.fail_mode,
                }
            )
        )
        return tenant.config.fail_mode == "open"

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
