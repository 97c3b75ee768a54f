"""Format-independent pieces of text extraction and redaction.

The format modules find the texts of a body (they alone know its shape) and hand them out
as ``TextSlot``s; this module rewrites the texts and the body without knowing either format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from checkstream.types import Span

JsonPath = tuple[str | int, ...]
"""Keys and list indices from the root of a parsed JSON body down to one value."""


@dataclass(frozen=True)
class TextSlot:
    """A text of a body and where it sits, so that it can be replaced later.

    ``path`` leads from the root of the parsed body to ``text``, e.g.
    ``("messages", 2, "content", 0, "text")``. ``source`` says whose words these are (one
    of ``SOURCES``), so a classifier can read only the ones it is meant for.
    """

    path: JsonPath
    text: str
    source: str = "user"


#: Whose words a text holds: the operator's instructions (system/developer), the end user's,
#: earlier model turns, tool or document content, or the answer being checked.
SOURCES = frozenset({"system", "user", "assistant", "tool", "answer"})


def with_source(slots: list[TextSlot], source: str) -> list[TextSlot]:
    """``slots`` attributed to ``source``, except those already given a source of their own
    (a tool result inside a user message stays ``tool``)."""
    return [replace(slot, source=source) if slot.source == "user" else slot for slot in slots]


def string_slot(value: object, path: JsonPath) -> list[TextSlot]:
    """``[TextSlot(path, value)]`` if ``value`` is a non-empty string, else ``[]``.

    Anything else is malformed or not text; an empty string has nothing to check.
    """
    return [TextSlot(path, value)] if isinstance(value, str) and value else []


_PLACEHOLDER = re.compile(r"\[REDACTED:[A-Z0-9_]{1,40}\]")


def mask_placeholders(text: str) -> str:
    """``text`` with every ``[REDACTED:<LABEL>]`` CheckStream wrote turned into spaces of the
    same length: a conversation carries earlier redacted turns, and the gateway's own
    placeholder must never raise a classifier's score; offsets stay valid."""
    if "[REDACTED:" not in text:
        return text
    return _PLACEHOLDER.sub(lambda found: " " * len(found.group()), text)


def readable(text: str) -> str:
    """``text`` with lone surrogates (valid JSON escapes such as ``"\\ud800"``, but no
    character) replaced one for one by U+FFFD, so classifiers can take it; offsets stay
    valid."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def apply_redactions(text: str, spans: Iterable[Span]) -> str:
    """``text`` with every span replaced by ``[REDACTED:<LABEL>]``.

    Offsets are code points (Python ``str`` indices), not bytes or UTF-16 units. Spans may
    come in any order and may overlap or nest: overlapping spans become one replacement
    carrying the label of the span that starts first (of spans starting at the same offset,
    the one listed first). Spans are clipped to the text; empty ones replace nothing.
    """
    clipped = [(max(span.start, 0), min(span.end, len(text)), span.label) for span in spans]
    # sorted() is stable, which makes the first listed of equal starts win.
    ordered = sorted((item for item in clipped if item[0] < item[1]), key=lambda item: item[0])
    merged: list[tuple[int, int, str]] = []
    for start, end, label in ordered:
        if merged and start < merged[-1][1]:
            first_start, first_end, first_label = merged[-1]
            merged[-1] = (first_start, max(first_end, end), first_label)
        else:
            merged.append((start, end, label))
    # Built left to right from slices of the original text, so every offset refers to the
    # unmodified text and no replacement shifts another.
    pieces: list[str] = []
    cursor = 0
    for start, end, label in merged:
        pieces.append(text[cursor:start])
        pieces.append(f"[REDACTED:{label}]")
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


def redactions(
    slots: Sequence[TextSlot], spans_per_slot: Sequence[Sequence[Span]]
) -> dict[JsonPath, str]:
    """The new text of every slot that has spans, by path (for ``with_values``).

    ``spans_per_slot[i]`` belongs to ``slots[i]``; a length mismatch raises ``ValueError``.
    """
    return {
        slot.path: apply_redactions(slot.text, spans)
        for slot, spans in zip(slots, spans_per_slot, strict=True)
        if spans
    }


def with_values(payload: Any, values: Mapping[JsonPath, object]) -> Any:
    """A copy of ``payload`` with the value at each path replaced.

    Only the dicts and lists on the way to a replaced value are copied; the caller's
    payload is never modified, and untouched subtrees are shared with it.
    """
    result = payload
    for path, value in values.items():
        result = _set(result, path, value)
    return result


def _set(node: Any, path: JsonPath, value: object) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy: Any = list(node) if isinstance(node, list) else dict(node)
    copy[head] = _set(node[head], rest, value)
    return copy


def dump_json(payload: Any) -> bytes:
    """``payload`` as the compact UTF-8 JSON body CheckStream sends on.

    A lone surrogate (``"\\ud800"`` is valid JSON, but no UTF-8) is written back as the
    escape it arrived as: the whole body is then ASCII JSON, which means the same.
    """
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(payload, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Delta:
    """The text one stream event adds, and the channel it adds it to.

    A stream may write several texts side by side (an answer and a tool call's arguments, or
    several output items); ``channel`` names which one, so that text an event repeats later
    (the Responses API's ``*.done`` events) can be rewritten from that channel's text.
    """

    channel: Hashable
    text: str


def json_string_leaves(value: object, path: JsonPath, source: str) -> list[TextSlot]:
    """Every non-empty string inside a JSON value (a tool's input object), as slots, so each
    can be checked and redacted in place without breaking the value's structure."""
    if isinstance(value, str):
        return [TextSlot(path, value, source)] if value else []
    if isinstance(value, dict):
        return [
            slot
            for key, item in value.items()
            for slot in json_string_leaves(item, (*path, key), source)
        ]
    if isinstance(value, list):
        return [
            slot
            for i, item in enumerate(value)
            for slot in json_string_leaves(item, (*path, i), source)
        ]
    return []


@dataclass(frozen=True)
class Usage:
    """Token counts an answer reports; None when the answer (or event) does not say.

    ``input_tokens`` counts every prompt token the model read, cached or not, so that both
    formats mean the same: OpenAI's ``prompt_tokens`` already includes cached tokens, while
    Anthropic's total is ``input_tokens`` plus its two ``cache_*_input_tokens``.
    """

    input_tokens: int | None
    output_tokens: int | None


def token_count(value: object) -> int | None:
    """``value`` if it is a token count (a non-negative int), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def messages_problem(messages: object, where: str = "messages") -> str | None:
    """What is wrong with a list of chat messages' shape, or None: a list of objects whose
    ``role`` is a string and whose ``content`` is a string, a list of objects, or null."""
    if messages is None:
        return None
    if not isinstance(messages, list):
        return f"'{where}' must be a list of messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"'{where}[{i}]' must be an object"
        role = message.get("role")
        if role is not None and not isinstance(role, str):
            return f"'{where}[{i}].role' must be a string"
        problem = content_problem(message.get("content"), f"{where}[{i}].content")
        if problem is not None:
            return problem
    return None


def content_problem(content: object, where: str) -> str | None:
    """A content field: a string, a list of part objects, or null."""
    if content is None or isinstance(content, str):
        return None
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        return f"'{where}' must be a string or a list of content parts"
    return None


def strings_problem(value: object, where: str) -> str | None:
    """A field that is a string or a list (of strings or token ids)."""
    if value is None or isinstance(value, str | list):
        return None
    return f"'{where}' must be a string or a list"
