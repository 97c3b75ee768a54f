"""Token counts of answers that pass through unguarded, for usage, limits and budgets.

Answers with midstream or egress rules are measured by the step that checks them; these
meters serve every other answer. They never change what the client receives, except that a
stream meter removes the usage chunk CheckStream asked an OpenAI backend for when the client
did not ask for it itself.

When the backend reports no usage, counts are estimated from the text at
``CHARS_PER_TOKEN`` (4, OpenAI's rule of thumb for English) and marked as estimated.
"""

from __future__ import annotations

import json

from checkstream.formats import WireFormat
from checkstream.formats.sse import SseDecoder, SseEvent
from checkstream.formats.texts import Usage

CHARS_PER_TOKEN = 4
# A non-streamed answer is kept to read its usage at the end; beyond this it is not parsed
# (its tokens are then estimated), so a huge answer cannot grow extproc's memory unbounded.
MAX_METERED_BODY = 16 * 1024 * 1024


def estimate_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def merge_usage(known: Usage | None, new: Usage) -> Usage:
    """Later reports supersede earlier ones field by field (Anthropic reports input tokens
    at the start of a stream and output tokens at its end)."""
    if known is None:
        return new
    return Usage(
        new.input_tokens if new.input_tokens is not None else known.input_tokens,
        new.output_tokens if new.output_tokens is not None else known.output_tokens,
    )


class StreamMeter:
    """Reads usage and answer length from an SSE answer as it passes."""

    __slots__ = ("answer_chars", "decoder", "drop_usage_chunk", "ended", "fmt", "usage")

    def __init__(self, fmt: WireFormat, *, drop_usage_chunk: bool) -> None:
        self.fmt = fmt
        self.drop_usage_chunk = drop_usage_chunk
        self.decoder = SseDecoder()
        self.usage: Usage | None = None
        self.answer_chars = 0
        #: The answer's last event has passed: the client can have read all of it.
        self.ended = False

    def feed(self, chunk: bytes) -> bytes:
        """What to send on for ``chunk``: the chunk itself unless an event must go."""
        return self._take(self.decoder.feed(chunk), chunk)

    def finish(self) -> bytes:
        return self._take(self.decoder.finish(), b"")

    def _take(self, events: list[SseEvent], chunk: bytes) -> bytes:
        fmt = self.fmt
        out = bytearray() if self.drop_usage_chunk else None
        for event in events:
            usage = fmt.usage(event)
            if usage is not None:
                self.usage = merge_usage(self.usage, usage)
            text = fmt.delta_text(event)
            if text:
                self.answer_chars += len(text)
            elif fmt.ends_stream(event):
                self.ended = True
            if out is not None:
                kept = fmt.without_usage(event) if usage is not None else event
                if kept is not None:
                    out += kept.raw
        # Without a chunk to drop, the bytes go on exactly as they came (an incomplete event
        # tail included), so pass-through stays byte-identical and lags nothing.
        return chunk if out is None else bytes(out)


class BodyMeter:
    """Reads usage and answer length from a whole (non-streamed) JSON answer."""

    __slots__ = ("body", "fmt", "overflow")

    def __init__(self, fmt: WireFormat) -> None:
        self.fmt = fmt
        self.body = bytearray()
        self.overflow = False

    def feed(self, chunk: bytes) -> None:
        if self.overflow:
            return
        if len(self.body) + len(chunk) > MAX_METERED_BODY:
            self.overflow = True
            self.body.clear()
            return
        self.body += chunk

    def result(self) -> tuple[Usage | None, int]:
        """The answer's reported usage and its text length in characters."""
        if self.overflow or not self.body:
            return None, 0
        try:
            payload = json.loads(self.body)
        except (ValueError, RecursionError):  # the backend's bytes: never raise
            return None, 0
        chars = sum(len(slot.text) for slot in self.fmt.answer_texts(payload))
        return self.fmt.answer_usage(payload), chars
