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
import time
from collections.abc import Mapping
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
    TrailersResponse,
)
from google.protobuf.struct_pb2 import Struct

from checkstream.accounting.accounts import CLIENT_CLOSED, Tally
from checkstream.accounting.client_text import store_safe
from checkstream.accounting.store_failure import STORE_UNAVAILABLE, store_refusal
from checkstream.formats import WireFormat
from checkstream.formats.endpoints import Endpoint, find_endpoint
from checkstream.formats.texts import dump_json
from checkstream.gateway.access_log import hand_off
from checkstream.gateway.admission import admit, limit_headers
from checkstream.gateway.answers import (
    PASS_THROUGH,
    AnswerHandler,
    CheckedError,
    MeteredBody,
    MeteredStream,
    choose_handler,
    decoded,
    oversized,
)
from checkstream.gateway.backends import answered_by_backend
from checkstream.gateway.mutations import (
    error_response,
    header,
    header_map,
    immediate,
    streamed_body,
)
from checkstream.gateway.operator_paths import route_operator
from checkstream.gateway.request_checks import (
    Refusal,
    headers_refusal,
    read_body,
    streaming_refusal,
)
from checkstream.gateway.runtime import Runtime, TenantPlan
from checkstream.gateway.verdicts import observe
from checkstream.intake.request_size import request_too_large
from checkstream.ops import logs
from checkstream.ops.metrics import ACCESS_REFUSED
from checkstream.policy.pipeline import Verdict
from checkstream.tenants.resolution import Refused, Resolved

log = logs.get("checkstream.policy")

RULE_HEADER = "x-checkstream-rule"
_EMPTY_BODY_RESPONSE = ProcessingResponse(request_body=BodyResponse())
_EMPTY_RESPONSE_HEADERS = ProcessingResponse(response_headers=HeadersResponse())
_EMPTY_TRAILERS = ProcessingResponse(response_trailers=TrailersResponse())
_ACCESS = "checkstream_access"
# Client-chosen strings stored in usage records, audit trails and logs are capped.
_MAX_MODEL_CHARS = 200

Answer: TypeAlias = ProcessingResponse | list[ProcessingResponse] | None
_CHECK_FAILED = Refusal(
    503,
    "a guardrail check failed, so the request was not processed",
    "guardrail_error",
    "checkstream_classifier",
)


class Exchange:
    """The state of one request between its ext_proc messages."""

    __slots__ = (
        "drop_usage_chunk",
        "endpoint",
        "fmt",
        "handler",
        "plan",
        "request_body",
        "request_encoding",
        "runtime",
        "tally",
    )

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.plan: TenantPlan | None = None
        self.request_body = bytearray()
        #: The API this request is for; None: not one CheckStream reads (passed through).
        self.endpoint: Endpoint | None = None
        #: The wire format of the endpoint (or, without one, of the tenant).
        self.fmt: WireFormat | None = None
        self.request_encoding = ""
        #: What happens to the answer's body, chosen at its headers.
        self.handler: AnswerHandler = PASS_THROUGH
        #: CheckStream asked the backend for stream usage; the client did not.
        self.drop_usage_chunk = False
        #: What is counted about this request (usage, limits, audit), when its tenant counts.
        self.tally: Tally | None = None

    # -- request ---------------------------------------------------------------------------
    async def on_request_headers(
        self, msg: HttpHeaders, attributes: Mapping[str, Struct] | None = None
    ) -> ProcessingResponse:
        headers = header_map(msg)
        path = headers.get(":path", "/")
        runtime = self.runtime
        operator = route_operator(runtime, path, headers.get(":method", "GET"))
        if operator is not None:
            return operator
        found = runtime.resolver.resolve(path, headers)
        if isinstance(found, Refused):
            return error_response(
                found.format, found.status, found.message, found.code, "checkstream_tenancy"
            )
        barred = runtime.access.check(
            found.tenant.id, found.key_is_ours, attributes, headers.get("x-forwarded-for")
        )
        if barred is not None:
            ACCESS_REFUSED.labels(found.tenant.id, barred.code).inc()
            return error_response(
                found.tenant.format, barred.status, barred.message, barred.code, _ACCESS
            )
        plan = runtime.plans[found.tenant.id]
        self.plan = plan
        tenant = plan.tenant
        fmt = tenant.format
        if runtime.accounts.suspended(tenant.id, tenant.config):
            if plan.tracks:  # counted, logged and recorded like any refusal
                self.tally = Tally.start(tenant.id, headers.get("x-request-id"))
            refusal = error_response(
                fmt, 403, "tenant is suspended", "tenant_suspended", "checkstream_tenancy"
            )
            return await self._local(refusal)
        if found.path.startswith("/admin/"):
            return await self._admin(found)
        endpoint = find_endpoint(found.path)
        self.endpoint = endpoint
        self.fmt = endpoint.fmt if endpoint is not None else fmt
        encoding = headers.get("content-encoding", "identity").strip().lower()
        refusal = headers_refusal(plan, endpoint, found.path, not msg.end_of_stream, encoding)
        if refusal is not None:
            return refusal.response(fmt)
        if encoding not in ("", "identity") and endpoint is not None and plan.guarded:
            self.request_encoding = encoding
        if plan.tracks:
            self.tally = Tally.start(tenant.id, headers.get("x-request-id"))
        store_down = store_refusal(runtime.accounts, tenant.id, tenant.config)
        if store_down is not None:
            # Accounted like any answer: its own records are the probe that lifts the refusal.
            return await self._local(
                error_response(fmt, 503, store_down, STORE_UNAVAILABLE, "checkstream_store")
            )
        limits = tenant.config.rate_limit
        if plan.admits and (not limits.tokens_per_minute or msg.end_of_stream):
            refusal = await self._admit(plan, 0)
            if refusal is not None:
                return refusal
        keep_key = tenant.config.auth_passthrough and not found.key_is_ours
        fwd = plan.forwarding if keep_key else plan.forwarding_without_key
        upstream_path = tenant.backend.upstream_path(found.path)
        sets = list(fwd.set_headers)
        removes = list(fwd.remove_headers)
        if upstream_path != path:
            sets.append(header(":path", upstream_path))
        if self.request_encoding:
            removes.append("content-encoding")  # the decoded body goes on
        mutation = HeaderMutation(set_headers=sets, remove_headers=removes)
        response = ProcessingResponse(
            request_headers=HeadersResponse(
                response=CommonResponse(header_mutation=mutation, clear_route_cache=True)
            ),
            mode_override=fwd.mode,
        )
        if fwd.metadata is not None:
            response.dynamic_metadata.CopyFrom(fwd.metadata)
        if plan.defers and (msg.end_of_stream or not fwd.mode.request_body_mode):
            return self._hand_off(response)  # nothing more comes to extproc
        return response

    async def on_request_body(self, msg: HttpBody) -> ProcessingResponse:
        answer = await self._request_body(msg)
        plan = self.plan
        if plan is not None and plan.defers and msg.end_of_stream:
            return self._hand_off(answer)
        return answer

    async def _request_body(self, msg: HttpBody) -> ProcessingResponse:
        self.request_body += msg.body
        if not msg.end_of_stream:
            return _EMPTY_BODY_RESPONSE
        plan = self.plan
        if plan is None:
            return _EMPTY_BODY_RESPONSE
        tally = self.tally
        limits = plan.tenant.config.rate_limit
        pending_admission = bool(limits.tokens_per_minute) and not (tally and tally.admitted)
        if not self.request_body:
            if pending_admission:
                refusal = await self._admit(plan, 0)
                if refusal is not None:
                    return refusal
            return _EMPTY_BODY_RESPONSE
        # Errors answer in the tenant's format (what its clients speak); texts are found
        # where the endpoint's format puts them.
        fmt = plan.tenant.format
        endpoint = self.endpoint
        if endpoint is None:
            # Bodies of paths the operator passes through are not read, only forwarded.
            if pending_admission:
                refusal = await self._admit(plan, 0)
                if refusal is not None:
                    return refusal
            return _EMPTY_BODY_RESPONSE
        api = endpoint.fmt
        read = read_body(bytes(self.request_body), self.request_encoding, plan, api)
        if isinstance(read, Refusal):
            return await self._local(read.response(fmt))
        raw, payload, model, slots = read.raw, read.payload, read.model, read.slots
        if tally is not None:
            tally.model = store_safe(model, _MAX_MODEL_CHARS) if isinstance(model, str) else ""
            tally.prompt_chars = sum(len(slot.text) for slot in slots)
        if pending_admission:
            asked = api.max_answer_tokens(payload)
            answer = asked or limits.default_max_tokens
            prompt = -(-sum(len(slot.text) for slot in slots) // 4)
            too_large = request_too_large(prompt, answer, asked, limits.tokens_per_minute)
            if too_large is not None:
                # It could never fit, so it is not a rate limit: no Retry-After, no retry.
                return await self._local(
                    error_response(fmt, 400, too_large, "request_too_large", "checkstream_limits")
                )
            refusal = await self._admit(plan, prompt + answer)
            if refusal is not None:
                return refusal
        if tally is not None and not plan.defers:
            # Deferred requests need no journal: Envoy's access log closes them wherever.
            self.runtime.accounts.journaled(tally)
        rails = plan.guardrails.ingress
        new_body: bytes | None = None
        if rails.rules:
            started = time.perf_counter()
            verdict = await self.runtime.checker.check(
                rails, [slot.text for slot in slots], [slot.source for slot in slots]
            )
            elapsed_ms = (time.perf_counter() - started) * 1000
            texts = [slot.text for slot in slots]
            observe(self.runtime, plan, self.tally, "ingress", verdict, elapsed_ms, texts)
            outcome = verdict.outcome(fail_open=plan.tenant.config.fail_mode == "open")
            if outcome == "fail":
                return await self._local(_CHECK_FAILED.response(fmt))
            if outcome == "block":
                assert verdict.deciding is not None
                rule = verdict.deciding.rule
                message = rule.message or f"the request was blocked by policy rule '{rule.name}'"
                body = fmt.policy_error_body(message, rule.name)
                return await self._local(
                    immediate(400, body, [(RULE_HEADER, rule.name)], details="checkstream_policy")
                )
            if outcome == "redact":
                new_body = api.redact_request(payload, slots, verdict.redactions)
                payload = json.loads(new_body)
        if new_body is None and self.request_encoding:
            new_body = raw
        if plan.reads_answer_usage:
            refusal = streaming_refusal(plan, payload)
            if refusal is not None:
                return await self._local(refusal.response(fmt))
            # Exact token counts need the backend's usage, which OpenAI streams only on
            # request; the extra chunk is removed before the client sees it.
            with_usage = api.ensure_stream_usage(payload)
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
    async def on_response_headers(
        self, msg: HttpHeaders, attributes: Mapping[str, Struct] | None = None
    ) -> ProcessingResponse:
        plan = self.plan
        if plan is None:
            return _EMPTY_RESPONSE_HEADERS
        headers = header_map(msg)
        status = headers.get(":status", "")
        tally = self.tally
        sets = []
        if tally is not None:
            tally.status = int(status) if status.isdigit() else 0
            tally.billable = answered_by_backend(attributes) and tally.status < 400
            if tally.decision is not None:
                sets = [header(k, v) for k, v in limit_headers(tally.decision)]
        removes: list[str] = []
        if msg.end_of_stream:
            await self._finish()
        else:
            handler = self._answer_handler(plan, headers, status)
            encoding = headers.get("content-encoding", "identity").strip().lower()
            if handler is not PASS_THROUGH and encoding not in ("", "identity"):
                closed = plan.checks_answers and plan.tenant.config.fail_mode != "open"
                fmt = self.fmt or plan.tenant.format
                handler, removed = decoded(handler, encoding, fmt, withhold=closed)
                removes += removed
            length = headers.get("content-length", "")
            handler, reset = oversized(handler, length, plan.max_response_bytes)
            sets += [header(k, v) for k, v in reset]
            self.handler = handler
            keeps_length = isinstance(handler, MeteredBody) or (
                isinstance(handler, MeteredStream) and not self.drop_usage_chunk
            )
            if handler is not PASS_THROUGH and not keeps_length:
                removes.append("content-length")  # the answer's length may change
        if not sets and not removes:
            return _EMPTY_RESPONSE_HEADERS
        return ProcessingResponse(
            response_headers=HeadersResponse(
                response=CommonResponse(
                    header_mutation=HeaderMutation(set_headers=sets, remove_headers=removes)
                )
            )
        )

    def _answer_handler(
        self, plan: TenantPlan, headers: Mapping[str, str], status: str
    ) -> AnswerHandler:
        """The handler for an answer: checked, metered or passed. Every success is read,
        not only 200; a backend's error is checked too where answers are (it may echo the
        prompt), and otherwise passes unchanged."""
        endpoint = self.endpoint
        checks = endpoint is not None and endpoint.checks_answer and plan.checks_answers
        fmt = self.fmt or plan.tenant.format
        fail_open = plan.tenant.config.fail_mode == "open"
        on_egress = partial(self._egress_verdict, plan)
        if status[:1] in ("4", "5") and checks:
            rails = plan.guardrails.egress
            checker = self.runtime.checker
            return CheckedError(
                fmt, checker, rails, int(status), fail_open=fail_open, on_verdict=on_egress
            )
        if not status.startswith("2"):
            return PASS_THROUGH
        return choose_handler(
            fmt,
            self.runtime.checker,
            plan.guardrails,
            content_type=headers.get("content-type", ""),
            checks=checks,
            counted=self.tally is not None and endpoint is not None,
            drop_usage_chunk=self.drop_usage_chunk,
            fail_open=fail_open,
            on_midstream=partial(self._midstream_verdict, plan),
            on_egress=on_egress,
            max_bytes=plan.max_response_bytes,
        )

    async def on_response_body(self, msg: HttpBody) -> Answer:
        handler = self.handler
        if handler.closed:
            return None  # the client's response has ended; the rest is discarded
        out = await handler.feed(msg.body)
        end: bool = handler.closed  # a stream the guard stopped ends here
        if msg.end_of_stream and not end:
            out += await handler.finish()
            end = True
        if end:
            await self._finish_answer()
        elif not out:
            return None  # held back: full-duplex mode needs no answer per chunk
        return streamed_body(out, end)

    async def on_response_trailers(self, msg: HttpTrailers) -> Answer:
        handler = self.handler
        tail = b""
        if not handler.closed:
            # The body ended with trailers rather than end_of_stream: release the rest now.
            tail = await handler.finish()
        await self._finish_answer()
        return [streamed_body(tail, False), _EMPTY_TRAILERS] if tail else _EMPTY_TRAILERS

    # -- accounting ------------------------------------------------------------------------
    async def _admit(self, plan: TenantPlan, tokens: int) -> ProcessingResponse | None:
        """The tenant's limits (``admission.py``); a refusal is accounted like any answer."""
        refusal = await admit(self.runtime.accounts, plan, self.tally, tokens)
        return None if refusal is None else await self._local(refusal)

    def _hand_off(self, response: ProcessingResponse) -> ProcessingResponse:
        """An admitted deferred request's Tally goes to Envoy (access_log.py)."""
        endpoint = self.endpoint.name if self.endpoint is not None else ""
        handed = hand_off(response, self.tally, endpoint)
        if handed is not response:
            self.tally = None  # closed by the access log now, never by this stream's end
        return handed

    async def _local(self, response: ProcessingResponse) -> ProcessingResponse:
        """An answer extproc gives itself: the request ends here, so it is accounted now."""
        tally = self.tally
        if tally is not None:
            tally.status = response.immediate_response.status.code
            if tally.decision is not None and response.HasField("immediate_response"):
                names = {h.header.key for h in response.immediate_response.headers.set_headers}
                extra = [header(k, v) for k, v in limit_headers(tally.decision) if k not in names]
                response.immediate_response.headers.set_headers.extend(extra)
            await self._finish()
        return response

    async def _finish(self) -> None:
        tally = self.tally
        plan = self.plan
        if tally is None or tally.done or plan is None:
            return
        runtime = self.runtime
        await runtime.accounts.finish(
            tally, plan.tenant.config, runtime.pricing, runtime.known_models
        )

    async def _finish_answer(self) -> None:
        tally = self.tally
        if tally is not None:
            tally.usage, tally.answer_chars = self.handler.result()
        await self._finish()

    async def abandon(self) -> None:
        """The gRPC stream ended before the response did (client gone, Envoy reset)."""
        tally = self.tally
        if tally is None or tally.done:
            return
        usage, chars = self.handler.result()
        if usage is not None or chars:
            tally.usage, tally.answer_chars = usage, chars
        if not self.handler.ended:
            # 499 only when the client left before the end; a client that hung up right
            # after the last event (the SDKs do) read the whole answer with its status.
            tally.status = CLIENT_CLOSED
        await self._finish()

    # -- policy bookkeeping (verdicts.py) --------------------------------------------------
    def _midstream_verdict(
        self, plan: TenantPlan, verdict: Verdict, elapsed_ms: float, window: str
    ) -> None:
        observe(self.runtime, plan, self.tally, "midstream", verdict, elapsed_ms, [window])

    def _egress_verdict(
        self, plan: TenantPlan, verdict: Verdict, elapsed_ms: float, texts: list[str]
    ) -> None:
        observe(self.runtime, plan, self.tally, "egress", verdict, elapsed_ms, texts)

    # -- local answers ---------------------------------------------------------------------
    async def _admin(self, found: Resolved) -> ProcessingResponse:
        fmt = found.tenant.format
        if found.path.partition("?")[0] != "/admin/tenant-info":
            return error_response(fmt, 404, "not found", "not_found", "checkstream_admin")
        info = await self.runtime.tenant_info(found.tenant.id)
        return immediate(200, json.dumps(info, indent=2).encode(), details="checkstream_admin")
