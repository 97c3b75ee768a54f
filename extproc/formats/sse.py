"""Server-sent events (the framing of every streamed LLM answer), independent of the format.

``SseDecoder`` cuts a byte stream, as it arrives in network reads, into events that keep
their exact bytes, so an event that passes unchanged is re-emitted byte for byte. Parsing
follows the WHATWG event-stream rules: lines end in CRLF, LF or CR, a blank line ends an
event, lines starting with ``:`` are comments and a leading UTF-8 BOM is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_BOM = b"\xef\xbb\xbf"
_CR = 13
_LF = 10


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One event of a stream.

    ``raw`` is the event's bytes exactly as received, terminating blank line included (and
    the stream's BOM, for its first event). ``data`` is the event's data lines joined with
    ``"\\n"``, None when it has none (a comment or keep-alive). Fields other than ``event``
    and ``data`` (``id``, ``retry``, unknown ones) are only kept in ``raw``.
    """

    raw: bytes
    event: str | None
    data: str | None


class SseDecoder:
    """Cuts one stream into events: ``feed`` each network read, then ``finish`` once."""

    __slots__ = ("_pending", "_skip")

    def __init__(self) -> None:
        # Bytes of the incomplete event, kept as received: joining them on every read would
        # copy a large event (such as a base64 image) over and over.
        self._pending: list[bytes] = []
        # Bytes of BOM before the first line of the event in `_pending` (only the stream's
        # first event has any); None until the stream's first line shows whether it has one.
        self._skip: int | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events ``chunk`` completes, in order; the rest waits for the next chunk."""
        pending = self._pending
        if b"\n" not in chunk and b"\r" not in chunk and not (pending and pending[-1][-1] == _CR):
            # No line ends here, so no event can: the common case while a long line arrives.
            if chunk:
                pending.append(chunk)
            return []
        if not pending:
            return self._cut(chunk, 0, final=False)
        buf = b"".join([*pending, chunk])
        # The pending bytes hold no complete event. A blank line can only be completed by the
        # new bytes, with at most the two bytes before them.
        return self._cut(buf, max(0, len(buf) - len(chunk) - 2), final=False)

    def finish(self) -> list[SseEvent]:
        """At the end of the stream: the events still held, the last one possibly unterminated.

        An unterminated remainder becomes an event of its own (parsed as if it ended there)
        so that no byte is lost. The decoder is then ready for a new stream.
        """
        buf = b"".join(self._pending)
        events = self._cut(buf, 0, final=True) if buf else []
        self._skip = None
        return events

    def _cut(self, buf: bytes, scan: int, *, final: bool) -> list[SseEvent]:
        """Split the complete events off ``buf``, searching for new blank lines from ``scan``
        (``final``: the stream ends with ``buf``, so its remainder is an event too).

        A blank line starts where a line ends and another line ending follows at once. Those
        are exactly the places after the byte pairs LF LF, LF CR and CR CR (CR LF is one
        line ending), or at an event's very start. Each pair is found with ``bytes.find``
        and its position reused until the cut passes it, so every byte is scanned once.
        """
        skip = self._skip
        if skip is None:
            # Unless the stream ends with it, ``buf`` ends a line: it is no BOM cut short.
            skip = len(_BOM) if buf.startswith(_BOM) else 0
        size = len(buf)
        find = buf.find
        lf_lf = find(b"\n\n", scan)
        # Most streams have no CR at all: then the two pairs with one are not looked for.
        has_cr = find(b"\r", scan) >= 0
        lf_cr = find(b"\n\r", scan) if has_cr else -1
        cr_cr = find(b"\r\r", scan) if has_cr else -1
        events: list[SseEvent] = []
        start = 0
        while start < size:
            first = start + skip
            if first < size and buf[first] in (_LF, _CR):
                blank = first
            else:
                if 0 <= lf_lf < start:
                    lf_lf = find(b"\n\n", start)
                blank = lf_lf
                if has_cr:
                    if 0 <= lf_cr < start:
                        lf_cr = find(b"\n\r", start)
                    if 0 <= cr_cr < start:
                        cr_cr = find(b"\r\r", start)
                    for pos in (lf_cr, cr_cr):
                        if pos >= 0 and (pos < blank or blank < 0):
                            blank = pos
                if blank < 0:
                    break
                blank += 1
            if buf[blank] == _LF:
                end = blank + 1
            elif blank + 1 < size:
                end = blank + 2 if buf[blank + 1] == _LF else blank + 1
            elif final:
                end = size
            else:
                # A CR as the last byte may be the first half of a CRLF: waiting for the next
                # byte keeps the cut, and so every event's raw, the same for any split.
                break
            events.append(_parse(buf[start:end], skip))
            skip = 0
            start = end
        if final and start < size:
            events.append(_parse(buf[start:], skip))
            start = size
        self._skip = skip
        self._pending = [buf[start:]] if start < size else []
        return events


def _parse(raw: bytes, skip: int) -> SseEvent:
    """The fields of one event's bytes (of which the first ``skip`` are a BOM)."""
    text = (raw[skip:] if skip else raw).decode(errors="replace")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    event: str | None = None
    data: list[str] = []
    for line in text.split("\n"):
        if not line or line[0] == ":":
            continue
        field, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
    return SseEvent(raw, event, "\n".join(data) if data else None)


def json_data(event: SseEvent) -> Any:
    """The event's data parsed as JSON; None if it has no data or the data is not JSON
    (such as OpenAI's ``[DONE]``) or too deeply nested or large to read (the backend's
    input: it must never raise)."""
    if event.data is None:
        return None
    try:
        return json.loads(event.data)
    except (ValueError, RecursionError):  # ValueError: also a 5,000-digit integer
        return None


def encode_event(data: str, event: str | None = None) -> bytes:
    """The bytes of an event CheckStream writes itself, with LF line endings.

    Line breaks in ``data`` (CRLF, CR or LF) become separate data lines, which a reader
    joins back with LF. ``event`` must be a single line (``ValueError`` otherwise): a line
    break in it would start a field or an event of its own.
    """
    if event is not None and ("\n" in event or "\r" in event):
        raise ValueError(f"an SSE event name must be one line: {event!r}")
    lines = [] if event is None else [f"event: {event}"]
    lines += [f"data: {line}" for line in _lines(data)]
    return ("\n".join(lines) + "\n\n").encode()


def with_data(event: SseEvent, data: str) -> SseEvent:
    """``event`` with its data replaced by ``data``.

    The new data lines take the place of the first old one; every other line (``event``,
    ``id``, comments...) is kept, and the event's line ending (that of its first line) is
    used throughout. ``ValueError`` if the event has no data to replace.
    """
    if event.data is None:
        raise ValueError("the event has no data to replace")
    raw = event.raw
    bom = _BOM if raw.startswith(_BOM) else b""
    first_cr = raw.find(b"\r")
    if first_cr < 0 or 0 <= raw.find(b"\n") < first_cr:
        eol = b"\n"
    else:
        eol = b"\r\n" if raw[first_cr + 1 : first_cr + 2] == b"\n" else b"\r"
    lines = raw[len(bom) :].replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    new: list[bytes] | None = [b"data: " + line.encode() for line in _lines(data)]
    kept: list[bytes] = []
    for line in lines:
        if line != b"data" and not line.startswith(b"data:"):
            kept.append(line)
        elif new is not None:
            kept += new
            new = None
    return _parse(bom + eol.join(kept), len(bom))


def _lines(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
