"""How one answer's body is handled, from its response headers to its end (worker process).

The exchange picks one ``AnswerHandler`` when the response headers arrive, from what the
tenant and the endpoint need, and from then on only feeds it:

- ``PassThrough``: nothing reads the answer (Envoy's full-duplex mode still needs every
  byte echoed).
- ``MeteredBody`` / ``MeteredStream``: usage is read on the way; the bytes go on unchanged.
- ``CheckedBody`` (egress): a whole answer is held until it has been checked.
- ``CheckedStream`` (midstream): a streamed answer is checked while it flows.
- ``Decoded`` wraps any of them when the backend compressed its answer anyway.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from typing import Protocol

from checkstream.accounting.metering import MAX_METERED_BODY, BodyMeter, StreamMeter
from checkstream.formats import WireFormat
from checkstream.formats.texts import Usage
from checkstream.intake.encodings import DECODABLE, decoder
from checkstream.policy.guardrails import PhasePlan, TenantGuardrails
from checkstream.policy.midstream import MidstreamGuard
from checkstream.policy.pipeline import Checker, Verdict

OnVerdict = Callable[[Verdict, float, list[str]], None]


class AnswerHandler(Protocol):
    @property
    def closed(self) -> bool:
        """The client's response has ended early (a stopped stream): the rest is discarded."""
        ...

    @property
    def ended(self) -> bool:
        """The answer's last event reached the client (a stream read to its end)."""
        ...

    async def feed(self, chunk: bytes) -> bytes:
        """What to send the client now for ``chunk`` (possibly nothing: held back)."""
        ...

    async def finish(self) -> bytes:
        """The upstream's answer ended: whatever is still to send."""
        ...

    def result(self) -> tuple[Usage | None, int]:
        """The usage the answer reported, if any, and the characters the model wrote."""
        ...


class PassThrough:
    closed = False
    ended = False

    async def feed(self, chunk: bytes) -> bytes:
        return chunk

    async def finish(self) -> bytes:
        return b""

    def result(self) -> tuple[Usage | None, int]:
        return None, 0


class MeteredBody:
    closed = False
    ended = False

    def __init__(self, fmt: WireFormat) -> None:
        self.meter = BodyMeter(fmt)

    async def feed(self, chunk: bytes) -> bytes:
        self.meter.feed(chunk)
        return chunk

    async def finish(self) -> bytes:
        return b""

    def result(self) -> tuple[Usage | None, int]:
        return self.meter.result()


class MeteredStream:
    closed = False

    def __init__(self, fmt: WireFormat, *, drop_usage_chunk: bool) -> None:
        self.meter = StreamMeter(fmt, drop_usage_chunk=drop_usage_chunk)

    @property
    def ended(self) -> bool:
        return self.meter.ended

    async def feed(self, chunk: bytes) -> bytes:
        return self.meter.feed(chunk)

    async def finish(self) -> bytes:
        return self.meter.finish()

    def result(self) -> tuple[Usage | None, int]:
        return self.meter.usage, self.meter.answer_chars


class CheckedStream:
    def __init__(self, guard: MidstreamGuard) -> None:
        self.guard = guard
        self.closed = False

    @property
    def ended(self) -> bool:
        return self.guard.ended

    async def feed(self, chunk: bytes) -> bytes:
        release = await self.guard.feed(chunk)
        self.closed = release.end
        return release.body

    async def finish(self) -> bytes:
        release = await self.guard.finish()
        self.closed = True
        return release.body

    def result(self) -> tuple[Usage | None, int]:
        return self.guard.usage, self.guard.answer_chars


class CheckedBody:
    """Egress: the whole answer is held, checked, then released unchanged, redacted or
    replaced. An answer that cannot be read (not JSON, or larger than the cap) is never
    released unchecked: it is replaced, unless the tenant fails open."""

    closed = False
    ended = False

    def __init__(
        self,
        fmt: WireFormat,
        checker: Checker,
        plan: PhasePlan,
        *,
        fail_open: bool,
        on_verdict: OnVerdict,
        max_bytes: int = MAX_METERED_BODY,
    ) -> None:
        self.fmt = fmt
        self.checker = checker
        self.plan = plan
        self.fail_open = fail_open
        self.on_verdict = on_verdict
        self.max_bytes = max_bytes
        self.body = bytearray()
        self.overflow = False
        self.usage: Usage | None = None
        self.chars = 0

    async def feed(self, chunk: bytes) -> bytes:
        if len(self.body) + len(chunk) > self.max_bytes:
            self.overflow = True
            self.body.clear()
        elif not self.overflow:
            self.body += chunk
        return b""

    async def finish(self) -> bytes:
        fmt = self.fmt
        if self.overflow:
            return self._unreadable(f"the answer is larger than {self.max_bytes} bytes")
        body = bytes(self.body)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return self._unreadable("the answer is not JSON", body)
        slots = fmt.answer_texts(payload)
        self.usage = fmt.answer_usage(payload)
        self.chars = sum(len(slot.text) for slot in slots)
        texts = [slot.text for slot in slots]
        started = time.perf_counter()
        verdict = await self.checker.check(self.plan, texts, ["answer"] * len(slots))
        self.on_verdict(verdict, (time.perf_counter() - started) * 1000, texts)
        outcome = verdict.outcome(fail_open=self.fail_open)
        if outcome == "fail":
            return fmt.blocked_answer(
                payload, "the answer was withheld: its guardrail check failed", "guardrail_error"
            )
        if outcome == "block":
            assert verdict.deciding is not None
            rule = verdict.deciding.rule
            message = rule.message or f"the answer was withheld by policy rule '{rule.name}'"
            return fmt.blocked_answer(payload, message, rule.name)
        if outcome == "redact":
            return fmt.redact_answer(payload, slots, verdict.redactions)
        return body

    def _unreadable(self, why: str, body: bytes = b"") -> bytes:
        if self.fail_open and not self.overflow:
            return body
        return self.fmt.blocked_answer(
            {}, f"the answer was withheld: {why}, so it could not be checked", "guardrail_error"
        )

    def result(self) -> tuple[Usage | None, int]:
        return self.usage, self.chars


class CheckedError:
    """A backend's error body for a tenant whose answers are checked: errors often repeat
    the request ("invalid content: <the prompt>"), so the body is checked as one text and
    replaced by an error in the tenant's format if a rule fires (any action but ``log``),
    or if the check fails and the tenant fails closed. Kept up to ``max_bytes``; a larger
    error body is replaced unread."""

    closed = False
    ended = False

    def __init__(
        self,
        fmt: WireFormat,
        checker: Checker,
        plan: PhasePlan,
        status: int,
        *,
        fail_open: bool,
        on_verdict: OnVerdict,
        max_bytes: int = 64 * 1024,
    ) -> None:
        self.fmt = fmt
        self.checker = checker
        self.plan = plan
        self.status = status
        self.fail_open = fail_open
        self.on_verdict = on_verdict
        self.max_bytes = max_bytes
        self.body = bytearray()
        self.overflow = False

    async def feed(self, chunk: bytes) -> bytes:
        if len(self.body) + len(chunk) > self.max_bytes:
            self.overflow = True
        elif not self.overflow:
            self.body += chunk
        return b""

    async def finish(self) -> bytes:
        body = bytes(self.body)
        if self.overflow:
            return self._withheld("it is too large to check")
        text = body.decode("utf-8", "replace")
        started = time.perf_counter()
        verdict = await self.checker.check(self.plan, [text], ["answer"])
        self.on_verdict(verdict, (time.perf_counter() - started) * 1000, [text])
        outcome = verdict.outcome(fail_open=self.fail_open)
        if outcome == "fail":
            return self._withheld("its check failed")
        if outcome != "pass":
            return self._withheld("it repeats content this tenant's policy does not allow")
        return body

    def _withheld(self, why: str) -> bytes:
        message = f"the backend answered {self.status}; its error was withheld: {why}"
        return self.fmt.error_body(self.status, message, "upstream_error_withheld")

    def result(self) -> tuple[Usage | None, int]:
        return None, 0


class TooLarge:
    """A whole answer to be checked that says (``content-length``) it is larger than
    ``server.max_response_bytes``: replaced, with status 502, by an error in the tenant's
    format, never held without bound nor released unchecked."""

    closed = False
    ended = False

    def __init__(self, fmt: WireFormat, size: int, max_bytes: int) -> None:
        self.fmt = fmt
        self.size = size
        self.max_bytes = max_bytes

    async def feed(self, chunk: bytes) -> bytes:
        return b""

    async def finish(self) -> bytes:
        message = (
            f"the backend's answer ({self.size} bytes) is larger than this gateway checks "
            f"(server.max_response_bytes: {self.max_bytes}), so it was not passed on"
        )
        return self.fmt.error_body(502, message, "response_too_large")

    def result(self) -> tuple[Usage | None, int]:
        return None, 0


class Unreadable:
    """An answer to be checked in an encoding CheckStream cannot decode: withheld (fail
    closed), replaced by the format's blocked answer naming the encoding."""

    closed = False
    ended = False

    def __init__(self, fmt: WireFormat, encoding: str) -> None:
        self.fmt = fmt
        self.encoding = encoding

    async def feed(self, chunk: bytes) -> bytes:
        return b""

    async def finish(self) -> bytes:
        message = (
            f"the answer was withheld: the backend encoded it with {self.encoding!r}, "
            "which CheckStream cannot check"
        )
        return self.fmt.blocked_answer({}, message, "guardrail_error")

    def result(self) -> tuple[Usage | None, int]:
        return None, 0


class Decoded:
    """An answer the backend compressed (gzip or deflate) although CheckStream asked for
    ``identity``: decoded before the inner handler reads it, so it is checked like any; the
    client gets it decoded (the exchange removes ``content-encoding``)."""

    def __init__(self, inner: AnswerHandler, encoding: str) -> None:
        self.inner = inner
        self.decoder = decoder(encoding)
        self.failed = False

    @property
    def closed(self) -> bool:
        return self.inner.closed

    @property
    def ended(self) -> bool:
        return self.inner.ended

    async def feed(self, chunk: bytes) -> bytes:
        return await self.inner.feed(self._decode(chunk))

    async def finish(self) -> bytes:
        tail = b"" if self.failed else self.decoder.flush()
        out = await self.inner.feed(tail) if tail else b""
        return out + await self.inner.finish()

    def _decode(self, chunk: bytes) -> bytes:
        if self.failed:
            return b""
        try:
            return self.decoder.decompress(chunk)
        except zlib.error:
            # A corrupt body reads as what decoded so far; a checked one is then judged
            # unreadable by its handler rather than passed.
            self.failed = True
            return b"\x00"

    def result(self) -> tuple[Usage | None, int]:
        return self.inner.result()


PASS_THROUGH = PassThrough()


def choose_handler(
    fmt: WireFormat,
    checker: Checker,
    rails: TenantGuardrails,
    *,
    content_type: str,
    checks: bool,
    counted: bool,
    drop_usage_chunk: bool,
    fail_open: bool,
    on_midstream: Callable[[Verdict, float, str], None],
    on_egress: OnVerdict,
    max_bytes: int = MAX_METERED_BODY,
) -> AnswerHandler:
    """One successful answer's handler: checked while it streams, checked whole, metered,
    or passed (``checks``: the endpoint's answer holds text and the tenant has rules for it;
    ``counted``: its usage is recorded)."""
    streamed = is_event_stream(content_type)
    if checks and streamed:
        guard = MidstreamGuard(
            fmt,
            checker,
            rails.midstream,
            window_tokens=rails.window_tokens,
            holdback_tokens=rails.holdback_tokens,
            drop_usage_chunk=drop_usage_chunk,
            fail_open=fail_open,
            on_verdict=on_midstream,
        )
        return CheckedStream(guard)
    if checks:
        # A whole answer is checked before any of it is released (egress).
        return CheckedBody(
            fmt,
            checker,
            rails.egress,
            fail_open=fail_open,
            on_verdict=on_egress,
            max_bytes=max_bytes,
        )
    if not counted:
        return PASS_THROUGH
    if streamed:
        return MeteredStream(fmt, drop_usage_chunk=drop_usage_chunk)
    return MeteredBody(fmt)


def is_event_stream(content_type: str) -> bool:
    """``text/event-stream`` in any case, with or without parameters (``; charset=utf-8``)."""
    return content_type.partition(";")[0].strip().lower() == "text/event-stream"


def decoded(
    handler: AnswerHandler, encoding: str, fmt: WireFormat, *, withhold: bool
) -> tuple[AnswerHandler, list[str]]:
    """``handler`` for an answer the backend compressed although CheckStream asked for
    ``identity``, and the response headers to remove: gzip and deflate are decoded; another
    encoding is withheld where answers are checked and the tenant fails closed (``withhold``),
    else passed as it came."""
    if encoding in DECODABLE:
        return Decoded(handler, encoding), ["content-encoding"]
    if withhold:
        return Unreadable(fmt, encoding), ["content-encoding"]
    return PASS_THROUGH, []


def oversized(
    handler: AnswerHandler, content_length: str, max_bytes: int
) -> tuple[AnswerHandler, list[tuple[str, str]]]:
    """``handler``, or for a whole answer to check that announces more than ``max_bytes``
    the ``TooLarge`` refusal and the response headers that make it a 502."""
    if not isinstance(handler, CheckedBody) or not content_length.isdigit():
        return handler, []
    if int(content_length) <= max_bytes:
        return handler, []
    refusal = TooLarge(handler.fmt, int(content_length), max_bytes)
    return refusal, [(":status", "502"), ("content-type", "application/json")]
