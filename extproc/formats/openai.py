"""OpenAI's HTTP API: error bodies, auth, and the texts guardrails check (chat completions,
completions, embeddings), whole or streamed."""

from __future__ import annotations

import json
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    strings_problem,
    token_count,
    with_source,
    with_values,
)
from checkstream.types import Span

_ROLE_SOURCES: dict[object, str] = {
    "system": "system",
    "developer": "system",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}

# OpenAI's `error.type` values for the statuses CheckStream itself answers with.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
}

# The fields every chunk of a stream repeats, which its ending must repeat too.
_HEAD = ("id", "object", "created", "model", "system_fingerprint")


@dataclass(frozen=True)
class OpenAIFormat:
    name: str = "openai"
    auth_header: str = "authorization"
    #: Its streams repeat their text in later events (``rewrite_repeats``).
    repeats_text: bool = False

    def error_body(self, status: int, message: str, code: str | None = None) -> bytes:
        kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        error = {"message": message, "type": kind, "param": None, "code": code}
        return json.dumps({"error": error}).encode()

    def auth_value(self, secret: str) -> str:
        return f"Bearer {secret}"

    def prompt_texts(self, payload: Any) -> list[TextSlot]:
        """The non-empty texts of a chat completions, completions or embeddings request.

        Chat: ``messages[].content`` of every role (system, developer, user, assistant,
        tool), as a string or as its ``text`` parts; image, audio, file and refusal parts
        are skipped. Assistant ``tool_calls`` (and legacy ``function_call``) arguments are
        checked as the assistant's words: a model can be steered through them, and PII in
        them reaches the backend like any text (a redaction inside a JSON string value
        keeps the arguments valid JSON). ``tools[].function.description`` is the
        operator's text. Completions: ``prompt`` (a string or a list of strings) and
        ``suffix``. Embeddings: ``input`` (a string or a list of strings). Token-id prompts
        and inputs (lists of integers) are skipped: they cannot be read without the model's
        tokenizer. Values of the wrong type are skipped.
        """
        if not isinstance(payload, dict):
            return []
        slots: list[TextSlot] = []
        messages = payload.get("messages")
        if isinstance(messages, list):
            for i, message in enumerate(messages):
                if isinstance(message, dict):
                    role = message.get("role")
                    # A role of the wrong type (a list: unhashable) reads as the user's.
                    source = _ROLE_SOURCES.get(role, "user") if isinstance(role, str) else "user"
                    found = _content(message.get("content"), ("messages", i, "content"))
                    found += _tool_arguments(message, ("messages", i))
                    slots += with_source(found, source)
        tools = payload.get("tools")
        if isinstance(tools, list):
            for i, tool in enumerate(tools):
                function = tool.get("function") if isinstance(tool, dict) else None
                if isinstance(function, dict):
                    path = ("tools", i, "function", "description")
                    slots += with_source(string_slot(function.get("description"), path), "system")
        for key in ("prompt", "suffix", "input"):
            slots += _strings(payload.get(key), (key,))
        return slots

    def request_problem(self, payload: Any) -> str | None:
        """Chat ``messages``, completions ``prompt``/``suffix``, embeddings ``input``."""
        if not isinstance(payload, dict):
            return "the request body must be a JSON object"
        problem = messages_problem(payload.get("messages"))
        for key in ("prompt", "suffix", "input"):
            problem = problem or strings_problem(payload.get(key), key)
        return problem

    def media_parts(self, payload: Any) -> list[str]:
        """Chat content parts other than ``text`` and ``refusal`` (``image_url``,
        ``input_audio``, ``file``)."""
        messages = payload.get("messages") if isinstance(payload, dict) else None
        if not isinstance(messages, list):
            return []
        return [
            str(part.get("type"))
            for message in messages
            if isinstance(message, dict) and isinstance(message.get("content"), list)
            for part in message["content"]
            if isinstance(part, dict) and part.get("type") not in ("text", "refusal")
        ]

    def redact_request(
        self, payload: Any, slots: Sequence[TextSlot], spans_per_slot: Sequence[Sequence[Span]]
    ) -> bytes:
        """The request body with the spans of each slot (from ``prompt_texts``) redacted."""
        return dump_json(with_values(payload, redactions(slots, spans_per_slot)))

    def answer_texts(self, payload: Any) -> list[TextSlot]:
        """The non-empty texts of a non-streamed chat completion or completion, every choice.

        Chat: each ``choices[].message.content`` string, its ``tool_calls`` (and legacy
        ``function_call``) arguments, and ``reasoning_content`` (vLLM, DeepSeek)
        (``refusal`` is OpenAI's own wording, not model output to check; audio answers are
        not covered). Completions: each ``choices[].text``.
        """
        if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
            return []
        slots: list[TextSlot] = []
        for i, choice in enumerate(payload["choices"]):
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            if isinstance(message, dict):
                path: JsonPath = ("choices", i, "message")
                slots += string_slot(message.get("content"), (*path, "content"))
                slots += string_slot(message.get("reasoning_content"), (*path, "reasoning_content"))
                slots += _tool_arguments(message, path)
            slots += string_slot(choice.get("text"), ("choices", i, "text"))
        return slots

    def redact_answer(
        self, payload: Any, slots: Sequence[TextSlot], spans_per_slot: Sequence[Sequence[Span]]
    ) -> bytes:
        """The answer body with the spans of each slot (from ``answer_texts``) redacted.

        A redacted choice loses its ``logprobs``: they list the answer token by token,
        redacted spans included.
        """
        texts = redactions(slots, spans_per_slot)
        # Every answer slot path starts with ("choices", i).
        no_logprobs = {
            (*path[:2], "logprobs"): None
            for path in texts
            if "logprobs" in payload["choices"][path[1]]
        }
        return dump_json(with_values(payload, {**texts, **no_logprobs}))

    def blocked_answer(self, payload: Any, message: str, rule: str) -> bytes:
        """The answer replaced after a block decision, as OpenAI reports filtered output.

        Every choice becomes ``message`` with ``finish_reason: "content_filter"``. Choices
        are rebuilt rather than edited, so nothing of the blocked answer survives in
        ``tool_calls``, ``audio``, ``logprobs``, ``annotations`` or fields of
        OpenAI-compatible servers (such as ``reasoning_content``). A ``text_completion``
        gets ``text`` choices, anything else chat ``message`` choices. The other top-level
        fields (``id``, ``model``, ``usage``...) are kept. A top-level ``checkstream`` object
        names the rule, since a header cannot always be added to an answer; the OpenAI
        SDKs ignore unknown fields.
        """
        body = dict(payload) if isinstance(payload, dict) else {}
        choices = body.get("choices")
        count = len(choices) if isinstance(choices, list) else 0
        if body.get("object") == "text_completion":
            body["choices"] = [
                {"index": i, "text": message, "logprobs": None, "finish_reason": "content_filter"}
                for i in range(count)
            ]
        else:
            body["choices"] = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": message, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "content_filter",
                }
                for i in range(count)
            ]
        body["checkstream"] = {"action": "blocked", "rule": rule}
        return dump_json(body)

    def policy_error_body(self, message: str, rule: str) -> bytes:
        """The 400 body for a request blocked by a policy, with the rule in ``checkstream``."""
        error = {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "content_policy_violation",
        }
        return dump_json({"error": error, "checkstream": {"action": "blocked", "rule": rule}})

    # Streamed answers. Every event of a guarded stream passes through these, so they look
    # for a key in the raw bytes before parsing any JSON (servers never \u-escape keys).

    def stream_delta(self, event: SseEvent) -> Delta | None:
        """The text a stream chunk adds, or None if it adds none.

        Chat: ``delta.content`` of the choice with ``index`` 0 (channel ``"content"``), its
        ``reasoning_content`` (``"reasoning"``), or the arguments of one of its
        ``tool_calls`` (``("tool", index)``; legacy ``function_call``: ``("tool", -1)``);
        completions: its ``text``. With ``n`` > 1 the other choices' chunks are interleaved
        in the same stream; streamed guarded requests with ``n`` > 1 are refused before they
        start. ``refusal`` deltas (OpenAI's own wording), role chunks, the usage chunk and
        ``[DONE]`` carry no text.
        """
        found = _stream_text(event)
        return None if found is None else found[2]

    def delta_text(self, event: SseEvent) -> str | None:
        """The text ``stream_delta`` finds, whatever its channel."""
        found = _stream_text(event)
        return None if found is None else found[2].text

    def rewrite_repeats(self, event: SseEvent, rendered: Mapping[Hashable, str]) -> SseEvent | None:
        """Always None: chat and completions streams never repeat their text."""
        return None

    def with_delta_text(self, event: SseEvent, text: str) -> SseEvent:
        """``event`` with the text ``delta_text`` finds replaced by ``text``.

        The choice loses its ``logprobs``, which spell out the replaced text token by token.
        ``ValueError`` if the event has no text.
        """
        found = _stream_text(event)
        if found is None:
            raise ValueError("the event carries no answer text")
        chunk, path, _ = found
        values: dict[JsonPath, object] = {path: text}
        if "logprobs" in chunk["choices"][path[1]]:
            values[(*path[:2], "logprobs")] = None
        return with_data(event, dump_json(with_values(chunk, values)).decode())

    def usage(self, event: SseEvent) -> Usage | None:
        """The token counts of a chunk with ``usage`` (sent last, before ``[DONE]``, when
        ``stream_options.include_usage`` is set)."""
        chunk = _usage_chunk(event)
        if chunk is None:
            return None
        usage = chunk["usage"]
        return Usage(
            token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))
        )

    def answer_usage(self, payload: Any) -> Usage | None:
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if not isinstance(usage, dict):
            return None
        return Usage(
            token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))
        )

    def max_answer_tokens(self, payload: Any) -> int | None:
        if not isinstance(payload, dict):
            return None
        # max_tokens is deprecated for chat in favour of max_completion_tokens; both are sent.
        counts = [token_count(payload.get(k)) for k in ("max_completion_tokens", "max_tokens")]
        return next((c for c in counts if c is not None), None)

    def without_usage(self, event: SseEvent) -> SseEvent | None:
        """``event`` as a client that never asked for usage sees it: None to drop it.

        Backends send the usage ``include_usage`` asks for in three shapes: a chunk with
        ``choices: []`` (OpenAI), a chunk whose only choice has an empty delta and no finish
        reason (LiteLLM), or ``usage`` on the last content chunk. The first two go; the third
        keeps its choices and loses only its ``usage``, so no content is ever dropped.
        """
        chunk = _usage_chunk(event)
        if chunk is None:
            return event
        choices = chunk.get("choices")
        if not isinstance(choices, list) or all(_empty(choice, "index") for choice in choices):
            return None
        return with_data(event, dump_json(_without_key(chunk, "usage")).decode())

    def ends_stream(self, event: SseEvent) -> bool:
        """``[DONE]`` (chat completions, completions), or the Responses API's last event."""
        if event.data == "[DONE]":
            return True
        return event.event in _RESPONSES_ENDINGS

    def ensure_stream_usage(self, payload: Any) -> Any | None:
        """A streamed chat completions or completions request with
        ``stream_options.include_usage`` set, since OpenAI streams token counts only when
        asked; None if the request is not one or already asks.

        The endpoint is told by the body (``messages`` or ``prompt``): the Responses API
        (``input``) streams its usage anyway and rejects unknown stream options. A client's
        ``include_usage: false`` is overridden as well; the extra chunk is then the one to
        drop (``without_usage``). Other stream options are kept.
        """
        if not isinstance(payload, dict) or payload.get("stream") is not True:
            return None
        if "messages" not in payload and "prompt" not in payload:
            return None
        options = payload.get("stream_options")
        if options is None:
            options = {}
        elif not isinstance(options, dict) or options.get("include_usage") is True:
            return None
        return {**payload, "stream_options": {**options, "include_usage": True}}

    def stream_tracker(self) -> OpenAIStreamTracker:
        return OpenAIStreamTracker()


class OpenAIStreamTracker:
    """The fields an early end of a chat completions or completions stream repeats."""

    __slots__ = ("_head",)

    def __init__(self) -> None:
        self._head: dict[str, Any] | None = None

    def observe(self, event: SseEvent) -> None:
        # Every chunk repeats the same id, object, created, model and fingerprint, so one
        # is parsed. Azure's first chunk (prompt filter results) has them empty: skipped.
        if self._head is not None:
            return
        chunk = json_data(event)
        if isinstance(chunk, dict) and chunk.get("id"):
            self._head = {key: chunk[key] for key in _HEAD if key in chunk}

    def ending(self, rule: str, reason: str) -> bytes:
        """A last chunk with ``finish_reason: "content_filter"`` for choice 0, then
        ``[DONE]``, as OpenAI ends a stream its own filter cut.

        The chunk's ``checkstream`` object (``action: "stop"``, ``rule``, ``reason``) names
        the rule because no header can be added once the stream has begun; the OpenAI SDKs
        ignore unknown fields. A completions stream gets a ``text_completion`` chunk; before
        any chunk was observed, a chat chunk with a placeholder id and an empty model.
        """
        head = self._head or {}
        legacy = head.get("object") == "text_completion"
        chunk: dict[str, Any] = {
            "id": head.get("id", "cmpl-checkstream" if legacy else "chatcmpl-checkstream"),
            "object": "text_completion" if legacy else "chat.completion.chunk",
            "created": head.get("created", int(time.time())),
            "model": head.get("model", ""),
        }
        if "system_fingerprint" in head:
            chunk["system_fingerprint"] = head["system_fingerprint"]
        body: dict[str, Any] = {"text": ""} if legacy else {"delta": {}}
        chunk["choices"] = [
            {"index": 0, **body, "logprobs": None, "finish_reason": "content_filter"}
        ]
        chunk["checkstream"] = {"action": "stop", "rule": rule, "reason": reason}
        return encode_event(dump_json(chunk).decode()) + encode_event("[DONE]")


def _content(content: object, path: JsonPath) -> list[TextSlot]:
    """A message's content: a string, or parts of which only ``text`` parts are text."""
    if not isinstance(content, list):
        return string_slot(content, path)
    slots: list[TextSlot] = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "text":
            slots += string_slot(part.get("text"), (*path, j, "text"))
    return slots


def _strings(value: object, path: JsonPath) -> list[TextSlot]:
    """A string, or the strings of a list (other items, such as token ids, skipped)."""
    if not isinstance(value, list):
        return string_slot(value, path)
    return [slot for i, item in enumerate(value) for slot in string_slot(item, (*path, i))]


def _tool_arguments(message: dict[str, Any], path: JsonPath) -> list[TextSlot]:
    """The arguments of a message's ``tool_calls`` and legacy ``function_call``."""
    slots: list[TextSlot] = []
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                where = (*path, "tool_calls", j, "function", "arguments")
                slots += string_slot(function.get("arguments"), where)
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        slots += string_slot(legacy.get("arguments"), (*path, "function_call", "arguments"))
    return slots


def _stream_text(event: SseEvent) -> tuple[dict[str, Any], JsonPath, Delta] | None:
    """The parsed chunk, path and delta of choice 0's non-empty text, if the event has one."""
    raw = event.raw
    if (
        b'"content"' not in raw
        and b'"text"' not in raw
        and b'"arguments"' not in raw
        and b'"reasoning_content"' not in raw
    ):
        return None
    chunk = json_data(event)
    if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
        return None
    for i, choice in enumerate(chunk["choices"]):
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            text = choice.get("text")
            if isinstance(text, str) and text:
                return chunk, ("choices", i, "text"), Delta("content", text)
            return None
        base: JsonPath = ("choices", i, "delta")
        for key, channel in (("content", "content"), ("reasoning_content", "reasoning")):
            text = delta.get(key)
            if isinstance(text, str) and text:
                return chunk, (*base, key), Delta(channel, text)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                args = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(args, str) and args:
                    index = call.get("index", j)
                    where = (*base, "tool_calls", j, "function", "arguments")
                    return chunk, where, Delta(("tool", index), args)
        legacy = delta.get("function_call")
        args = legacy.get("arguments") if isinstance(legacy, dict) else None
        if isinstance(args, str) and args:
            return chunk, (*base, "function_call", "arguments"), Delta(("tool", -1), args)
        return None
    return None


_RESPONSES_ENDINGS = frozenset({"response.completed", "response.failed", "response.incomplete"})


def _empty(value: object, *ignored: str) -> bool:
    """Whether ``value`` carries nothing: null, empty, or a mapping of such values (keys in
    ``ignored`` aside)."""
    if isinstance(value, dict):
        return all(_empty(v) for k, v in value.items() if k not in ignored)
    return value is None or value == "" or value == []


def _without_key(chunk: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in chunk.items() if k != key}


def _usage_chunk(event: SseEvent) -> dict[str, Any] | None:
    """The parsed chunk if it reports usage (with ``include_usage`` every other chunk has
    ``"usage": null``, hence the look for a count rather than the key)."""
    if b'"prompt_tokens"' not in event.raw:
        return None
    chunk = json_data(event)
    if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
        return chunk
    return None


FORMAT = OpenAIFormat()
