"""Midstream guardrails: check a streamed answer while it flows, before the client sees it.

Per stream, a ``MidstreamGuard`` takes the response body as Envoy delivers it (network reads,
not events), re-frames it into SSE events, and holds back every event carrying text until
that text has been checked. Checks run the tenant's midstream classifiers over a sliding
window of the answer (the last ``window_tokens``) whenever about half of ``holdback_tokens``
of new text has arrived, or a sentence has ended. Released text always trails the checked
text by up to half the holdback (less at a sentence end), so a phrase that straddles two
checks is still seen whole before its start is released; the client lags the upstream by at
most ``holdback_tokens``.

Tokens are estimated as 4 characters each (OpenAI's rule of thumb for English) until a
tokenizer is wired in; only the window and holdback sizes depend on it.

Actions: ``log`` releases; ``redact`` rewrites the held-back events so the original text is
never released; ``block``/``stop`` drops what is held and ends the stream at once with the
format's well-formed ending, which names the rule (a header cannot be added once streaming
began). A failed or timed-out check follows the tenant's fail mode: closed ends the stream
the same way (rule ``guardrail_error``), open releases the text unchecked.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from extproc.formats import WireFormat
from extproc.formats.sse import SseDecoder, SseEvent
from extproc.formats.texts import Usage
from extproc.guardrails import PhasePlan
from extproc.hookspecs import Span
from extproc.metering import CHARS_PER_TOKEN, merge_usage
from extproc.pipeline import Checker, Verdict

_ANSWER = ("answer",)
# Latin and CJK full stops, question and exclamation marks, and line breaks.
_SENTENCE_ENDS = frozenset(".!?\n\u3002\uff01\uff1f")


@dataclass(slots=True)
class _Held:
    event: SseEvent
    start: int  # answer-text offsets of the event's text; start == end for non-text events
    end: int


@dataclass(frozen=True)
class Release:
    body: bytes
    #: True when the client's response must end now (the stream was stopped).
    end: bool = False


class MidstreamGuard:
    def __init__(
        self,
        fmt: WireFormat,
        checker: Checker,
        plan: PhasePlan,
        *,
        window_tokens: int,
        holdback_tokens: int,
        drop_usage_chunk: bool,
        fail_open: bool,
        on_verdict: Callable[[Verdict, float, str], None],
    ) -> None:
        self.fmt = fmt
        self.checker = checker
        self.plan = plan
        self.window_chars = window_tokens * CHARS_PER_TOKEN
        self.step_chars = max(1, holdback_tokens * CHARS_PER_TOKEN // 2)
        self.drop_usage_chunk = drop_usage_chunk
        self.fail_open = fail_open
        self.on_verdict = on_verdict
        self.decoder = SseDecoder()
        self.tracker = fmt.stream_tracker()
        self.text = ""
        self.held: deque[_Held] = deque()
        self.checked = 0  # answer text up to here has passed a check
        self.released = 0  # answer text up to here has been sent to the client
        self.redactions: list[Span] = []  # in answer offsets, never before `released`
        self.stopped = False
        self.firing: frozenset[str] = frozenset()  # rules the last check triggered
        self.usage: Usage | None = None
        #: The answer's last event has been released to the client.
        self.ended = False

    async def feed(self, chunk: bytes) -> Release:
        """Take one body chunk; return what may be sent to the client now."""
        if self.stopped:
            return Release(b"")
        sentence_ended = self._take(self.decoder.feed(chunk))
        unchecked = len(self.text) - self.checked
        if unchecked and (unchecked >= self.step_chars or sentence_ended):
            stop = await self._check()
            if stop is not None:
                return stop
        return Release(self._release(final=False))

    async def finish(self) -> Release:
        """End of the upstream's stream: check and release whatever is still held."""
        if self.stopped:
            return Release(b"", end=True)
        self._take(self.decoder.finish())
        if len(self.text) > self.checked:
            stop = await self._check()
            if stop is not None:
                return stop
        return Release(self._release(final=True), end=True)

    def _take(self, events: list[SseEvent]) -> bool:
        """Hold the new events; True if the new text ends a sentence."""
        fmt = self.fmt
        ended = False
        for event in events:
            usage = fmt.usage(event)
            if usage is not None:
                self.usage = merge_usage(self.usage, usage)
                if self.drop_usage_chunk:
                    # Asked for by CheckStream, not by the client.
                    kept = fmt.without_usage(event)
                    if kept is None:
                        continue
                    event = kept
            start = len(self.text)
            delta = fmt.delta_text(event)
            if delta:
                self.text += delta
                ended = ended or any(c in _SENTENCE_ENDS for c in delta)
            self.held.append(_Held(event, start, len(self.text)))
        return ended

    async def _check(self) -> Release | None:
        """Check the window ending at the newest text; a Release only if the stream ends."""
        end = len(self.text)
        start = min(self.checked, max(0, end - self.window_chars))
        started = time.perf_counter()
        window = self.text[start:end]
        verdict = await self.checker.check(self.plan, [window], _ANSWER)
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.on_verdict(self._news(verdict, self.checked - start), elapsed_ms, window)
        if verdict.failure is not None:
            if self.fail_open:
                self.checked = end
                return None
            return self._stop("guardrail_error", "the guardrail check failed")
        if verdict.action in ("block", "stop"):
            deciding = verdict.deciding
            rule = deciding.rule.name if deciding else "unknown"
            return self._stop(rule, f"stopped by policy rule '{rule}'")
        if verdict.action == "redact":
            for span in verdict.redactions[0]:
                # Text already released cannot be recalled; keep the held part of the span.
                s, e = max(start + span.start, self.released), start + span.end
                if s < e:
                    self.redactions.append(Span(s, e, span.label))
        self.checked = end
        return None

    def _news(self, verdict: Verdict, seen: int) -> Verdict:
        """``verdict`` with only the triggers this check found first.

        Windows overlap (each reaches back over text already checked), so one phrase can
        trigger a rule in several checks; it must be counted, logged and audited once. A
        rule that also fired on the previous check is old news, unless its redaction spans
        reach past the text checked before (``seen`` characters into the window).
        """
        fired = frozenset(t.rule.name for t in verdict.triggers)
        previous, self.firing = self.firing, fired
        if not previous & fired:
            return verdict
        new_spans = bool(verdict.redactions) and any(
            span.end > seen for span in verdict.redactions[0]
        )
        fresh = tuple(
            t
            for t in verdict.triggers
            if t.rule.name not in previous or (t.rule.action == "redact" and new_spans)
        )
        return replace(verdict, triggers=fresh)

    def _stop(self, rule: str, reason: str) -> Release:
        self.stopped = True
        self.held.clear()
        return Release(self.tracker.ending(rule, reason), end=True)

    def _release(self, *, final: bool) -> bytes:
        if final:
            boundary = len(self.text)
        elif self.text[max(0, self.checked - 8) : self.checked].rstrip()[-1:] in _SENTENCE_ENDS:
            # A checked sentence is released whole: sentences are where phrases end.
            boundary = self.checked
        else:
            boundary = max(self.released, self.checked - self.step_chars)
        out = bytearray()
        held = self.held
        while held and held[0].end <= boundary:
            item = held.popleft()
            event = item.event
            if item.end > item.start and self.redactions:
                rendered = self._render(item)
                if rendered is not None:
                    event = self.fmt.with_delta_text(event, rendered)
            self.tracker.observe(event)
            if item.end == item.start and self.fmt.ends_stream(event):
                self.ended = True
            out += event.raw
            self.released = max(self.released, item.end)
        return bytes(out)

    def _render(self, item: _Held) -> str | None:
        """The event's text with redactions applied, or None if none touch it.

        A span's placeholder goes into the event where the span starts; the rest of the
        span's characters are removed from whichever events hold them.
        """
        a, b = item.start, item.end
        touching = sorted(
            (s for s in self.redactions if s.start < b and s.end > a), key=lambda s: s.start
        )
        if not touching:
            return None
        merged: list[Span] = []
        for span in touching:
            if merged and span.start < merged[-1].end:
                last = merged[-1]
                merged[-1] = Span(last.start, max(last.end, span.end), last.label)
            else:
                merged.append(span)
        pieces = []
        cursor = a
        for span in merged:
            pieces.append(self.text[cursor : max(span.start, a)])
            if span.start >= a:
                pieces.append(f"[REDACTED:{span.label}]")
            cursor = min(span.end, b)
        pieces.append(self.text[cursor:b])
        return "".join(pieces)
