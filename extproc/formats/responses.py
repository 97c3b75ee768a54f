"""OpenAI's Responses API (``/v1/responses``): the texts guardrails check, whole or streamed.

Errors, auth and everything else about the wire are OpenAI's, so this format extends the
chat one and supplies what differs: where the texts sit (``instructions`` and ``input`` in
all its shapes; ``output`` items), the stream's typed events, and how a stopped stream ends.

A Responses stream repeats its text: ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done`` and the final
``response.completed`` carry the whole text again. When midstream redaction changed a
channel's text, ``rewrite_repeats`` puts the redacted text into those events as well, so no
copy of the original reaches the client.
"""

from __future__ import annotations

import re
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from checkstream.formats.openai import FORMAT as _OPENAI
from checkstream.formats.sse import SseEvent, encode_event, json_data, with_data
from checkstream.formats.texts import (
    Delta,
    JsonPath,
    TextSlot,
    Usage,
    dump_json,
    messages_problem,
    redactions,
    string_slot,
    token_count,
    with_source,
    with_values,
)
from checkstream.types import Span

_ROLE_SOURCES: dict[object, str] = {
    "system": "system",
    "developer": "system",
    "assistant": "assistant",
}
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')
# Events that carry a whole response object, the last of a stream.
_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


@dataclass(frozen=True)
class ResponsesFormat:
    name: str = "openai"
    auth_header: str = "authorization"
    #: Its streams repeat their text in later events (``rewrite_repeats``).
    repeats_text: bool = True

    def error_body(self, status: int, message: str, code: str | None = None) -> bytes:
        return _OPENAI.error_body(status, message, code)

    def auth_value(self, secret: str) -> str:
        return _OPENAI.auth_value(secret)

    def policy_error_body(self, message: str, rule: str) -> bytes:
        return _OPENAI.policy_error_body(message, rule)

    def redact_request(
        self, payload: Any, slots: Sequence[TextSlot], spans_per_slot: Sequence[Sequence[Span]]
    ) -> bytes:
        return dump_json(with_values(payload, redactions(slots, spans_per_slot)))

    def prompt_texts(self, payload: Any) -> list[TextSlot]:
        """``instructions``, ``input`` (a string, or items: messages with string or
        ``input_text``/``output_text`` parts, ``function_call`` arguments,
        ``function_call_output`` output) and the tools' descriptions."""
        if not isinstance(payload, dict):
            return []
        slots = with_source(string_slot(payload.get("instructions"), ("instructions",)), "system")
        items = payload.get("input")
        if not isinstance(items, list):
            slots += string_slot(items, ("input",))
        else:
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    slots += _input_item(item, ("input", i))
        tools = payload.get("tools")
        if isinstance(tools, list):
            for i, tool in enumerate(tools):
                if isinstance(tool, dict):
                    found = string_slot(tool.get("description"), ("tools", i, "description"))
                    slots += with_source(found, "system")
        return slots

    def request_problem(self, payload: Any) -> str | None:
        """``input`` (a string or a list of item objects) and ``instructions``."""
        if not isinstance(payload, dict):
            return "the request body must be a JSON object"
        items = payload.get("input")
        if isinstance(items, list):
            if not all(isinstance(item, dict) for item in items):
                return "'input' must be a string or a list of items"
            return messages_problem([i for i in items if "role" in i], "input")
        if items is not None and not isinstance(items, str):
            return "'input' must be a string or a list of items"
        instructions = payload.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            return "'instructions' must be a string"
        return None

    def media_parts(self, payload: Any) -> list[str]:
        """Input parts other than text (``input_image``, ``input_file``, ``input_audio``)."""
        items = payload.get("input") if isinstance(payload, dict) else None
        if not isinstance(items, list):
            return []
        return [
            str(part.get("type"))
            for item in items
            if isinstance(item, dict) and isinstance(item.get("content"), list)
            for part in item["content"]
            if isinstance(part, dict) and part.get("type") not in _TEXT_PARTS | {"refusal"}
        ]

    def answer_texts(self, payload: Any) -> list[TextSlot]:
        """Every ``output_text`` part of the ``message`` items of ``output``, and every
        ``function_call``'s arguments."""
        if not isinstance(payload, dict) or not isinstance(payload.get("output"), list):
            return []
        slots: list[TextSlot] = []
        for i, item in enumerate(payload["output"]):
            if isinstance(item, dict):
                slots += _output_item(item, ("output", i))
        return slots

    def redact_answer(
        self, payload: Any, slots: Sequence[TextSlot], spans_per_slot: Sequence[Sequence[Span]]
    ) -> bytes:
        return dump_json(with_values(payload, redactions(slots, spans_per_slot)))

    def blocked_answer(self, payload: Any, message: str, rule: str) -> bytes:
        """The response with one message item holding ``message``, ``status: "incomplete"``
        and ``incomplete_details.reason: "content_filter"``; nothing of the blocked output
        (text, tool calls, reasoning) survives. Other fields (``id``, ``model``, ``usage``)
        are kept."""
        body = dict(payload) if isinstance(payload, dict) else {}
        body["output"] = [_message_item(message)]
        body["status"] = "incomplete"
        body["incomplete_details"] = {"reason": "content_filter"}
        body.pop("output_text", None)
        body["checkstream"] = {"action": "blocked", "rule": rule}
        return dump_json(body)

    # Streamed answers.

    def stream_delta(self, event: SseEvent) -> Delta | None:
        """``response.output_text.delta`` (channel ``("text", output_index,
        content_index)``) or ``response.function_call_arguments.delta`` (``("args",
        output_index)``); refusals are OpenAI's wording and reasoning is not the answer."""
        found = _stream_delta(event)
        return None if found is None else found[1]

    def delta_text(self, event: SseEvent) -> str | None:
        found = _stream_delta(event)
        return None if found is None else found[1].text

    def with_delta_text(self, event: SseEvent, text: str) -> SseEvent:
        found = _stream_delta(event)
        if found is None:
            raise ValueError("the event carries no answer text")
        return with_data(event, dump_json({**found[0], "delta": text}).decode())

    def rewrite_repeats(self, event: SseEvent, rendered: Mapping[Hashable, str]) -> SseEvent | None:
        """The event with every repeated text of a channel in ``rendered`` replaced by that
        channel's released (redacted) text; None if it repeats none of them."""
        raw = event.raw
        if not rendered or (b'.done"' not in raw and b'"response.' not in raw):
            return None
        payload = json_data(event)
        if not isinstance(payload, dict):
            return None
        kind = payload.get("type")
        out = payload.get("output_index")
        part = payload.get("content_index")
        values: dict[JsonPath, object] = {}
        if kind == "response.output_text.done" and ("text", out, part) in rendered:
            values[("text",)] = rendered["text", out, part]
        elif kind == "response.function_call_arguments.done" and ("args", out) in rendered:
            values[("arguments",)] = rendered["args", out]
        elif kind == "response.content_part.done" and ("text", out, part) in rendered:
            values[("part", "text")] = rendered["text", out, part]
        elif kind == "response.output_item.done":
            values = _item_repeats(payload.get("item"), out, ("item",), rendered)
        elif kind in _FINAL:
            response = payload.get("response")
            output = response.get("output") if isinstance(response, dict) else None
            if isinstance(output, list):
                for i, item in enumerate(output):
                    values.update(_item_repeats(item, i, ("response", "output", i), rendered))
        if not values:
            return None
        return with_data(event, dump_json(with_values(payload, values)).decode())

    def usage(self, event: SseEvent) -> Usage | None:
        """The token counts of the final event's ``response.usage``."""
        if b'"input_tokens"' not in event.raw:
            return None
        payload = json_data(event)
        response = payload.get("response") if isinstance(payload, dict) else None
        return self.answer_usage(response)

    def answer_usage(self, payload: Any) -> Usage | None:
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if not isinstance(usage, dict):
            return None
        return Usage(
            token_count(usage.get("input_tokens")), token_count(usage.get("output_tokens"))
        )

    def max_answer_tokens(self, payload: Any) -> int | None:
        return token_count(payload.get("max_output_tokens")) if isinstance(payload, dict) else None

    def without_usage(self, event: SseEvent) -> SseEvent | None:
        """``event`` unchanged: Responses streams report usage unasked, in events the client
        expects."""
        return event

    def ends_stream(self, event: SseEvent) -> bool:
        """The final event: ``response.completed``, ``response.incomplete`` or
        ``response.failed``. Told by the ``event:`` name the API sends with every event; only
        a server that leaves names out has its events' JSON read for the type."""
        if event.event is not None:
            return event.event in _FINAL
        return b'"response.' in event.raw and _event_type(event) in _FINAL

    def ensure_stream_usage(self, payload: Any) -> Any | None:
        """Always None: Responses streams report usage in their final event unasked."""
        return None

    def stream_tracker(self) -> ResponsesStreamTracker:
        return ResponsesStreamTracker()


class ResponsesStreamTracker:
    """What an early end of a Responses stream repeats: the response object and the next
    sequence number."""

    __slots__ = ("_next", "_response")

    def __init__(self) -> None:
        self._response: dict[str, Any] | None = None
        self._next = 0

    def observe(self, event: SseEvent) -> None:
        raw = event.raw
        found = _SEQUENCE.search(raw)
        if found is not None:
            self._next = int(found.group(1)) + 1
        if self._response is None and b'"response.created"' in raw:
            payload = json_data(event)
            response = payload.get("response") if isinstance(payload, dict) else None
            if isinstance(response, dict):
                self._response = response

    def ending(self, rule: str, reason: str) -> bytes:
        """A ``response.incomplete`` event, as the API ends a response its own filter cut:
        the response object from ``response.created`` with ``status: "incomplete"`` and
        ``incomplete_details.reason: "content_filter"``, and a ``checkstream`` object naming
        the rule (the SDKs ignore unknown fields)."""
        response: dict[str, Any] = dict(self._response or {})
        response.setdefault("id", "resp_checkstream")
        response.setdefault("object", "response")
        response.setdefault("created_at", int(time.time()))
        response.setdefault("model", "")
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "content_filter"}
        response["output"] = []
        event = {
            "type": "response.incomplete",
            "sequence_number": self._next,
            "response": response,
            "checkstream": {"action": "stop", "rule": rule, "reason": reason},
        }
        return encode_event(dump_json(event).decode(), "response.incomplete")


def _input_item(item: dict[str, Any], path: JsonPath) -> list[TextSlot]:
    kind = item.get("type")
    if kind == "function_call":
        return with_source(string_slot(item.get("arguments"), (*path, "arguments")), "assistant")
    if kind == "function_call_output":
        return with_source(_parts(item.get("output"), (*path, "output")), "tool")
    if "role" in item and kind in (None, "message"):
        source = _ROLE_SOURCES.get(item.get("role"), "user")
        return with_source(_parts(item.get("content"), (*path, "content")), source)
    return []


def _output_item(item: dict[str, Any], path: JsonPath) -> list[TextSlot]:
    kind = item.get("type")
    if kind == "function_call":
        return string_slot(item.get("arguments"), (*path, "arguments"))
    if kind == "message":
        return _parts(item.get("content"), (*path, "content"))
    return []


def _parts(content: object, path: JsonPath) -> list[TextSlot]:
    """A string, or the text of a list's text parts (images and files skipped)."""
    if not isinstance(content, list):
        return string_slot(content, path)
    return [
        slot
        for j, part in enumerate(content)
        if isinstance(part, dict) and part.get("type") in _TEXT_PARTS
        for slot in string_slot(part.get("text"), (*path, j, "text"))
    ]


def _item_repeats(
    item: object, out: object, path: JsonPath, rendered: Mapping[Hashable, str]
) -> dict[JsonPath, object]:
    """Paths inside an output item that repeat a rendered channel, with their new text."""
    if not isinstance(item, dict):
        return {}
    if item.get("type") == "function_call" and ("args", out) in rendered:
        return {(*path, "arguments"): rendered["args", out]}
    content = item.get("content")
    if item.get("type") != "message" or not isinstance(content, list):
        return {}
    return {
        (*path, "content", j, "text"): rendered["text", out, j]
        for j, part in enumerate(content)
        if isinstance(part, dict) and ("text", out, j) in rendered
    }


def _event_type(event: SseEvent) -> object:
    payload = json_data(event)
    return payload.get("type") if isinstance(payload, dict) else None


def _message_item(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": "msg_checkstream",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _stream_delta(event: SseEvent) -> tuple[dict[str, Any], Delta] | None:
    raw = event.raw
    if b'_text.delta"' not in raw and b'arguments.delta"' not in raw:
        return None
    payload = json_data(event)
    if not isinstance(payload, dict):
        return None
    text = payload.get("delta")
    if not isinstance(text, str) or not text:
        return None
    kind = payload.get("type")
    out = payload.get("output_index")
    if kind == "response.output_text.delta":
        return payload, Delta(("text", out, payload.get("content_index")), text)
    if kind == "response.function_call_arguments.delta":
        return payload, Delta(("args", out), text)
    return None


FORMAT = ResponsesFormat()
