"""Anthropic's Messages API: error bodies, auth, and the texts guardrails check, whole or
streamed."""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from checkstream.formats.sse import SseEvent, encode_event, json_data, with_data
from checkstream.formats.texts import (
    Delta,
    JsonPath,
    TextSlot,
    Usage,
    content_problem,
    dump_json,
    json_string_leaves,
    messages_problem,
    redactions,
    string_slot,
    token_count,
    with_source,
    with_values,
)
from checkstream.types import Span

# https://docs.anthropic.com/en/api/errors: the error type is named by the status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}

# The stream events that open or close the message or a block, or carry the output count.
_STRUCTURE = frozenset(
    ("message_start", "content_block_start", "content_block_stop", "message_delta")
)


@dataclass(frozen=True)
class AnthropicFormat:
    name: str = "anthropic"
    auth_header: str = "x-api-key"
    #: Its streams repeat their text in later events (``rewrite_repeats``).
    repeats_text: bool = False

    def error_body(self, status: int, message: str, code: str | None = None) -> bytes:
        kind = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        error: dict[str, str] = {"type": kind, "message": message}
        if code is not None:
            error["code"] = code
        return json.dumps({"type": "error", "error": error}).encode()

    def auth_value(self, secret: str) -> str:
        return secret

    def prompt_texts(self, payload: Any) -> list[TextSlot]:
        """The non-empty texts of a Messages request.

        ``system`` and every ``messages[].content``, each a string or a list of blocks:
        ``text`` blocks, ``tool_result`` blocks (their content a string or text blocks),
        ``document`` blocks with plain text (``source.type: "text"``) or text blocks
        (``source.type: "content"``), ``search_result`` blocks, and every string inside a
        ``tool_use`` block's ``input`` (checked and redacted in place, so the input stays a
        valid object). Images and ``thinking`` blocks are skipped: thinking is signed by
        Anthropic, so it could not be rewritten anyway. Values of the wrong type are skipped.
        """
        if not isinstance(payload, dict):
            return []
        slots = with_source(_content(payload.get("system"), ("system",)), "system")
        messages = payload.get("messages")
        if isinstance(messages, list):
            for i, message in enumerate(messages):
                if isinstance(message, dict):
                    found = _content(message.get("content"), ("messages", i, "content"))
                    if message.get("role") == "assistant":
                        found = with_source(found, "assistant")
                    slots += found
        return slots

    def request_problem(self, payload: Any) -> str | None:
        """``messages`` and ``system``."""
        if not isinstance(payload, dict):
            return "the request body must be a JSON object"
        return messages_problem(payload.get("messages")) or content_problem(
            payload.get("system"), "system"
        )

    def media_parts(self, payload: Any) -> list[str]:
        """Images, and documents that are not text (a PDF), in messages and tool results."""
        messages = payload.get("messages") if isinstance(payload, dict) else None
        if not isinstance(messages, list):
            return []
        found: list[str] = []
        for message in messages:
            if isinstance(message, dict):
                _media(message.get("content"), found)
        return found

    def redact_request(
        self, payload: Any, slots: Sequence[TextSlot], spans_per_slot: Sequence[Sequence[Span]]
    ) -> bytes:
        """The request body with the spans of each slot (from ``prompt_texts``) redacted."""
        return dump_json(with_values(payload, redactions(slots, spans_per_slot)))

    def answer_texts(self, payload: Any) -> list[TextSlot]:
        """The non-empty ``text`` blocks of a non-streamed ``message``, and every string in
        its ``tool_use`` blocks' ``input``."""
        if not isinstance(payload, dict) or not isinstance(payload.get("content"), list):
            return []
        slots: list[TextSlot] = []
        for i, block in enumerate(payload["content"]):
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                slots += string_slot(block.get("text"), ("content", i, "text"))
            elif block.get("type") == "tool_use":
                slots += json_string_leaves(block.get("input"), ("content", i, "input"), "user")
        return slots

    def redact_answer(
        self, payload: Any, slots: Sequence[TextSlot], spans_per_slot: Sequence[Sequence[Span]]
    ) -> bytes:
        """The answer body with the spans of each slot (from ``answer_texts``) redacted."""
        return dump_json(with_values(payload, redactions(slots, spans_per_slot)))

    def blocked_answer(self, payload: Any, message: str, rule: str) -> bytes:
        """The answer replaced after a block decision, as Anthropic reports refused output.

        ``content`` becomes one text block holding ``message``, ``stop_reason`` is
        ``"refusal"`` and ``stop_sequence`` null; ``stop_details`` is dropped, since it
        described the upstream's own stop. The other fields (``id``, ``model``,
        ``usage``...) are kept. A top-level ``checkstream`` object names the rule, since a
        header cannot always be added to an answer; the Anthropic SDKs ignore unknown fields.
        """
        body = dict(payload) if isinstance(payload, dict) else {}
        body.pop("stop_details", None)
        body["content"] = [{"type": "text", "text": message}]
        body["stop_reason"] = "refusal"
        body["stop_sequence"] = None
        body["checkstream"] = {"action": "blocked", "rule": rule}
        return dump_json(body)

    def policy_error_body(self, message: str, rule: str) -> bytes:
        """The 400 body for a request blocked by a policy, with the rule in ``checkstream``."""
        error = {"type": "invalid_request_error", "message": message}
        return dump_json(
            {"type": "error", "error": error, "checkstream": {"action": "blocked", "rule": rule}}
        )

    # Streamed answers. Every event of a guarded stream passes through these, so they look
    # for a value in the raw bytes before parsing any JSON.

    def stream_delta(self, event: SseEvent) -> Delta | None:
        """The text of a ``content_block_delta`` with a ``text_delta`` or a tool's
        ``input_json_delta`` (channel: the block's index), or None.

        Thinking (signed by Anthropic, so it could not be rewritten), citations, pings and
        every other event carry no text.
        """
        found = _stream_text(event)
        return None if found is None else found[2]

    def delta_text(self, event: SseEvent) -> str | None:
        """The text ``stream_delta`` finds, whatever its channel."""
        found = _stream_text(event)
        return None if found is None else found[2].text

    def with_delta_text(self, event: SseEvent, text: str) -> SseEvent:
        """``event`` with its delta's text replaced; ``ValueError`` if it has none."""
        found = _stream_text(event)
        if found is None:
            raise ValueError("the event carries no answer text")
        payload = with_values(found[0], {("delta", found[1]): text})
        return with_data(event, dump_json(payload).decode())

    def rewrite_repeats(self, event: SseEvent, rendered: Mapping[Hashable, str]) -> SseEvent | None:
        """Always None: Messages streams never repeat their text."""
        return None

    def usage(self, event: SseEvent) -> Usage | None:
        """The token counts of ``message_start`` (its ``message.usage``) or ``message_delta``.

        The counts are cumulative, each event's superseding the last; ``message_delta`` may
        lack the input counts (None then). ``message_start``'s output count is a placeholder
        (usually 1), so it is reported as unknown: a stream cut before its ``message_delta``
        then has its output estimated rather than billed as one token. See ``Usage`` for how
        input tokens add up.
        """
        if b'"usage"' not in event.raw:
            return None
        payload = json_data(event)
        if not isinstance(payload, dict):
            return None
        kind = payload.get("type")
        if kind == "message_start":
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
        elif kind == "message_delta":
            usage = payload.get("usage")
        else:
            return None
        if not isinstance(usage, dict):
            return None
        output = token_count(usage.get("output_tokens")) if kind == "message_delta" else None
        return Usage(_input_tokens(usage), output)

    def answer_usage(self, payload: Any) -> Usage | None:
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if not isinstance(usage, dict):
            return None
        return Usage(_input_tokens(usage), token_count(usage.get("output_tokens")))

    def max_answer_tokens(self, payload: Any) -> int | None:
        return token_count(payload.get("max_tokens")) if isinstance(payload, dict) else None

    def without_usage(self, event: SseEvent) -> SseEvent:
        """Always ``event``: Anthropic streams usage unasked, in events the client expects."""
        return event

    def ends_stream(self, event: SseEvent) -> bool:
        """``message_stop``, named by the event line or, from servers that omit it, the data."""
        if event.event is not None:
            return event.event == "message_stop"
        return event.data is not None and '"message_stop"' in event.data

    def ensure_stream_usage(self, payload: Any) -> Any | None:
        """Always None: Anthropic streams always report usage."""
        return None

    def stream_tracker(self) -> AnthropicStreamTracker:
        return AnthropicStreamTracker()


class AnthropicStreamTracker:
    """What an early end of a Messages stream must close: the message and its open blocks."""

    __slots__ = ("_open", "_output_tokens", "_started")

    def __init__(self) -> None:
        self._started = False
        self._open: set[int] = set()  # content blocks started and not yet stopped
        self._output_tokens = 0

    def observe(self, event: SseEvent) -> None:
        # Told by the `event:` name, as the Anthropic SDKs do, so that the bulk of the
        # stream (text deltas) is never parsed here.
        kind = event.event
        if kind not in _STRUCTURE:
            return
        payload = json_data(event)
        if not isinstance(payload, dict):
            return
        if kind == "message_start":
            self._started = True
            message = payload.get("message")
            self._note_output(message.get("usage") if isinstance(message, dict) else None)
        elif kind == "message_delta":
            self._note_output(payload.get("usage"))
        elif isinstance(index := payload.get("index"), int):
            if kind == "content_block_start":
                self._open.add(index)
            else:
                self._open.discard(index)

    def _note_output(self, usage: object) -> None:
        count = token_count(usage.get("output_tokens")) if isinstance(usage, dict) else None
        if count is not None:
            self._output_tokens = count

    def ending(self, rule: str, reason: str) -> bytes:
        """``content_block_stop`` for every open block, a ``message_delta`` with
        ``stop_reason: "refusal"``, then ``message_stop``, as Anthropic ends a refused answer.

        The ``message_delta`` carries a ``checkstream`` object (``action: "stop"``, ``rule``,
        ``reason``) because no header can be added once the stream has begun; the Anthropic
        SDKs ignore unknown fields. Its ``output_tokens`` is the last count the stream
        reported, usually ``message_start``'s small initial one, since Anthropic sends the
        real count only at the end. A stream stopped before its ``message_start`` gets a
        minimal one first, so that the client sees a well-formed message.
        """
        events: list[tuple[str, dict[str, Any]]] = []
        if not self._started:
            message: dict[str, Any] = {
                "id": "msg_checkstream",
                "type": "message",
                "role": "assistant",
                "model": "",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
            events.append(("message_start", {"type": "message_start", "message": message}))
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": index})
            for index in sorted(self._open)
        ]
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "refusal", "stop_sequence": None},
                    "usage": {"output_tokens": self._output_tokens},
                    "checkstream": {"action": "stop", "rule": rule, "reason": reason},
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return b"".join(encode_event(dump_json(data).decode(), kind) for kind, data in events)


def _content(content: object, path: JsonPath) -> list[TextSlot]:
    """``system``, a message's or a tool result's content: a string or a list of blocks."""
    if not isinstance(content, list):
        return string_slot(content, path)
    slots: list[TextSlot] = []
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            slots += string_slot(block.get("text"), (*path, j, "text"))
        elif kind == "tool_result":
            slots += with_source(_content(block.get("content"), (*path, j, "content")), "tool")
        elif kind == "document":
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") == "text":
                data = string_slot(source.get("data"), (*path, j, "source", "data"))
                slots += with_source(data, "tool")
            elif isinstance(source, dict) and source.get("type") == "content":
                inner = _content(source.get("content"), (*path, j, "source", "content"))
                slots += with_source(inner, "tool")
        elif kind == "search_result":
            inner = _content(block.get("content"), (*path, j, "content"))
            slots += with_source(inner, "tool")
        elif kind == "tool_use":
            slots += json_string_leaves(block.get("input"), (*path, j, "input"), "user")
    return slots


_DELTA_FIELDS = {"text_delta": "text", "input_json_delta": "partial_json"}


def _media(content: object, found: list[str]) -> None:
    if not isinstance(content, list):
        return
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        source = block.get("source")
        if kind == "image":
            found.append("image")
        elif kind == "document" and not (
            isinstance(source, dict) and source.get("type") in ("text", "content")
        ):
            found.append("document")
        elif kind == "tool_result":
            _media(block.get("content"), found)


def _stream_text(event: SseEvent) -> tuple[dict[str, Any], str, Delta] | None:
    """The parsed event, the delta's text field and the delta, if it has non-empty text."""
    raw = event.raw
    if b"text_delta" not in raw and b"input_json_delta" not in raw:
        return None
    payload = json_data(event)
    if not isinstance(payload, dict) or payload.get("type") != "content_block_delta":
        return None
    delta = payload.get("delta")
    if not isinstance(delta, dict):
        return None
    field = _DELTA_FIELDS.get(str(delta.get("type")))
    if field is None:
        return None
    text = delta.get(field)
    if not isinstance(text, str) or not text:
        return None
    return payload, field, Delta(payload.get("index", 0), text)


def _input_tokens(usage: dict[str, Any]) -> int | None:
    """All prompt tokens of a usage object: uncached plus cache writes and reads."""
    counts = [
        token_count(usage.get(key))
        for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    ]
    if counts[0] is None:
        return None
    return sum(count for count in counts if count is not None)


FORMAT = AnthropicFormat()
