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
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

from checkstream.accounting.metering import CHARS_PER_TOKEN, merge_usage
from checkstream.formats import WireFormat
from checkstream.formats.sse import SseDecoder, SseEvent, json_data
from checkstream.formats.texts import Usage
from checkstream.policy.guardrails import PhasePlan
from checkstream.policy.pipeline import Checker, Verdict
from checkstream.types import Span

_ANSWER = ("answer",)
# Latin and CJK full stops, question and exclamation marks, and line breaks.
_SENTENCE_ENDS = frozenset(".!?\n\u3002\uff01\uff1f")
_SPACED_ENDS = tuple(f"{end} " for end in ".!?\u3002\uff01\uff1f")
_DIGITS = frozenset("0123456789")
# The longest number or code written in groups (an IBAN: 34 characters and 8 spaces).
_MAX_GROUPED = 42
# Python's parser gives up at about 1,000 levels or 4,300 digits: shorter data parses.
_UNREADABLE_MIN_CHARS = 1000
# A PEM block longer than this is no key: it stops widening the checks.
_MAX_BLOCK_CHARS = 64 * 1024
# Text no longer needed is dropped from the buffer in pieces at least this large.
_TRIM_CHARS = 4096


@dataclass(slots=True)
class _Held:
    event: SseEvent
    start: int  # answer-text offsets of the event's text; start == end for non-text events
    end: int
    channel: Hashable = None


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
        # The answer's text from offset `base` on; what comes before is no longer needed.
        self.buf = ""
        self.base = 0
        self.size = 0  # the answer's whole length so far
        self.held: deque[_Held] = deque()
        self.checked = 0  # answer text up to here has passed a check
        self.released = 0  # answer text up to here has been sent to the client
        self.redactions: list[Span] = []  # in answer offsets, never before `released`
        self.stopped = False
        self.firing: frozenset[str] = frozenset()  # rules the last check triggered
        self.usage: Usage | None = None
        # Each channel's text as released, kept to rewrite events that repeat it.
        self.sent: dict[Hashable, list[str]] = {}
        self.redacted: set[Hashable] = set()
        #: The answer's last event has been released to the client.
        self.ended = False
        #: The upstream sent its stream's last event ([DONE], message_stop, ...).
        self.last_seen = False
        #: An event came that looks like JSON but cannot be read (so cannot be checked).
        self.unreadable = False
        #: Where an unfinished PEM block (``-----BEGIN ...``) starts: every check reaches back
        #: to it, so its later lines are still recognised once the window moved past BEGIN.
        self.open_block: int | None = None
        self._boundary_for = -1  # the `checked` the cached boundary was computed for
        self._boundary_at = 0
        # Only formats whose streams repeat their text need each channel's released text.
        self.keeps_sent = fmt.repeats_text

    @property
    def answer_chars(self) -> int:
        return self.size

    async def feed(self, chunk: bytes) -> Release:
        """Take one body chunk; return what may be sent to the client now."""
        if self.stopped:
            return Release(b"")
        sentence_ended = self._take(self.decoder.feed(chunk))
        if self.unreadable and not self.fail_open:
            return self._stop("guardrail_error", "the answer could not be read, so not checked")
        if self.last_seen:
            # The stream's last event has arrived: no text can follow, nothing is held back.
            if self.size > self.checked or self._pending_spans:
                stop = await self._check(final=True)
                if stop is not None:
                    return stop
            return Release(self._release(final=True))
        unchecked = self.size - self.checked
        if unchecked and (unchecked >= self.step_chars or sentence_ended):
            stop = await self._check(final=False)
            if stop is not None:
                return stop
        return Release(self._release(final=False))

    async def finish(self) -> Release:
        """End of the upstream's stream: check and release whatever is still held."""
        if self.stopped:
            return Release(b"", end=True)
        self._take(self.decoder.finish())
        if self.unreadable and not self.fail_open:
            return self._stop("guardrail_error", "the answer could not be read, so not checked")
        if self.size > self.checked or self._pending_spans:
            stop = await self._check(final=True)
            if stop is not None:
                return stop
        return Release(self._release(final=True), end=True)

    @property
    def _pending_spans(self) -> bool:
        # A check ended at the newest text and may have left a span to take at the end.
        return self.checked == self.size and self.size > self.released

    def _take(self, events: list[SseEvent]) -> bool:
        """Hold the new events; True if the new text ends a sentence."""
        fmt = self.fmt
        ended = False
        pieces: list[str] = []
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
            start = self.size
            delta = fmt.stream_delta(event)
            if delta is None:
                if _unreadable(event):
                    # JSON no parser takes (absurd nesting, a 5,000-digit number): it may
                    # hold text nobody checked. The check's failure decides (fail mode).
                    self.unreadable = True
                self.held.append(_Held(event, start, start))
                self.last_seen = self.last_seen or fmt.ends_stream(event)
                continue
            text = delta.text
            pieces.append(text)
            self.size += len(text)
            ended = ended or _ends_sentence(text)
            self.held.append(_Held(event, start, self.size, delta.channel))
        if pieces:
            added = "".join(pieces)
            self.buf += added
            if self.open_block is None and "-----BEGIN" in self.buf[-len(added) - 10 :]:
                at = self.buf.rfind("-----BEGIN")
                self.open_block = self.base + at
        return ended

    def _text(self, start: int, end: int) -> str:
        base = self.base
        return self.buf[max(0, start - base) : max(0, end - base)]

    async def _check(self, *, final: bool) -> Release | None:
        """Check the window ending at the newest text; a Release only if the stream ends."""
        end = self.size
        start = max(self.base, min(self.checked, end - self.window_chars))
        block = self.open_block
        if block is not None:
            start = max(self.base, min(start, block))
            if "-----END" in self._text(block, end) or end - block > _MAX_BLOCK_CHARS:
                self.open_block = None  # this check sees it whole (or it was no PEM block)
        started = time.perf_counter()
        window = self._text(start, end)
        verdict = await self.checker.check(self.plan, [window], _ANSWER)
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.on_verdict(self._news(verdict, self.checked - start), elapsed_ms, window)
        outcome = verdict.outcome(fail_open=self.fail_open)
        if outcome == "fail":
            return self._stop("guardrail_error", "the guardrail check failed")
        if outcome == "block":
            deciding = verdict.deciding
            rule = deciding.rule.name if deciding else "unknown"
            return self._stop(rule, f"stopped by policy rule '{rule}'")
        if outcome == "redact":
            for span in verdict.redactions[0]:
                if span.end >= len(window) and not final:
                    # It reaches the newest text and may grow with the next (an address
                    # whose domain is still arriving): the next check takes it whole. The
                    # run it sits in is held until then.
                    continue
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

    def _boundary(self) -> int:
        """How far the answer's text may be released now (see the module's docstring).

        It moves only when a check does, so it is computed once per check."""
        if self._boundary_for == self.checked:
            return max(self._boundary_at, self.released)
        self._boundary_for = self.checked
        self._boundary_at = self._compute_boundary()
        return max(self._boundary_at, self.released)

    def _compute_boundary(self) -> int:
        checked = self.checked
        tail = self._text(max(self.base, self.released, checked - self.window_chars), checked)
        offset = checked - len(tail)
        boundary = max(self.released, checked - self.step_chars)
        cut = _sentence_cut(tail)
        if cut is not None:
            # A checked sentence is released whole: sentences are where phrases end.
            boundary = max(boundary, offset + cut)
        run = offset + _open_run(tail)
        # A run longer than half the window (a base64 blob) is no entity a pattern matches
        # whole; holding it would stall the stream.
        if checked - run < self.window_chars // 2:
            boundary = min(boundary, run)
        return max(boundary, self.released)

    def _release(self, *, final: bool) -> bytes:
        boundary = self.size if final else self._boundary()
        out = bytearray()
        held = self.held
        fmt = self.fmt
        while held and held[0].end <= boundary:
            item = held.popleft()
            event = item.event
            if item.end > item.start:
                text = self._render(item) if self.redactions else None
                if text is not None:
                    event = fmt.with_delta_text(event, text)
                    self.redacted.add(item.channel)
                if self.keeps_sent:
                    self.sent.setdefault(item.channel, []).append(
                        text if text is not None else self._text(item.start, item.end)
                    )
                self.released = max(self.released, item.end)
            elif self.redacted and self.keeps_sent:
                rendered = {ch: "".join(self.sent[ch]) for ch in self.redacted}
                event = fmt.rewrite_repeats(event, rendered) or event
            self.tracker.observe(event)
            if item.end == item.start and self.fmt.ends_stream(event):
                self.ended = True
            out += event.raw
        self._trim()
        return bytes(out)

    def _trim(self) -> None:
        """Drop text no check or release can need again: before the window and the held."""
        keep = min(self.released, self.size - self.window_chars)
        if self.open_block is not None:
            keep = min(keep, self.open_block)
        if keep - self.base >= max(_TRIM_CHARS, len(self.buf) // 2):
            self.buf = self.buf[keep - self.base :]
            self.base = keep
            self.redactions = [s for s in self.redactions if s.end > keep]

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
            pieces.append(self._text(cursor, max(span.start, a)))
            if span.start >= a:
                pieces.append(f"[REDACTED:{span.label}]")
            cursor = min(span.end, b)
        pieces.append(self._text(cursor, b))
        return "".join(pieces)


def _unreadable(event: SseEvent) -> bool:
    """JSON that no parser takes (too deep, a number too long): such data is kilobytes long,
    so short events, the bulk of a stream, are not parsed again here."""
    data = event.data
    if data is None or len(data) < _UNREADABLE_MIN_CHARS or data[:1] not in ("{", "["):
        return False
    return json_data(event) is None


def _ends_sentence(text: str) -> bool:
    return not _SENTENCE_ENDS.isdisjoint(text)


def _sentence_cut(text: str) -> int | None:
    """The offset just past the last sentence end in ``text`` that is followed by white
    space (a ``.`` inside an address or a number ends no sentence), or None."""
    found = max(text.rfind("\n"), *(text.rfind(end) for end in _SPACED_ENDS))
    return None if found < 0 else found + (1 if text[found] == "\n" else 2)


def _open_run(text: str) -> int:
    """Where the run at the end of ``text`` starts that the next text may continue: the last
    word when no space follows it yet, extended back over groups joined by single spaces
    while either side has a digit (``4111 1111 11``, ``+44 20 7946``,
    ``GB82 WEST 1234``)."""
    i = len(text)
    if i > 1 and text[i - 1] == " " and text[i - 2].isalnum():
        i -= 1  # "4111 " may go on with the next group
    elif i and text[i - 1].isspace():
        return i
    j = _word_start(text, i)
    while j >= 2 and text[j - 1] == " " and text[j - 2].isalnum():
        k = _word_start(text, j - 1)
        grouped = _has_digit(text[j:i]) or _has_digit(text[k : j - 1])
        if not grouped or j - 1 - k > 8 or len(text) - k > _MAX_GROUPED:
            break
        i, j = j - 1, k
    return j


def _word_start(text: str, end: int) -> int:
    start = end
    while start and not text[start - 1].isspace():
        start -= 1
    return start


def _has_digit(word: str) -> bool:
    return not _DIGITS.isdisjoint(word)
