"""OpenAI's HTTP API: error bodies, auth, and the texts guardrails check (chat completions,
completions, embeddings)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from extproc.formats.texts import (
    JsonPath,
    TextSlot,
    dump_json,
    redactions,
    string_slot,
    with_values,
)
from extproc.hookspecs import Span

# OpenAI's `error.type` values for the statuses CheckStream itself answers with.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
}


@dataclass(frozen=True)
class OpenAIFormat:
    name: str = "openai"
    auth_header: str = "authorization"

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
        are skipped. Only human-readable content is taken: assistant ``tool_calls`` and
        ``function_call`` arguments are JSON the model wrote for a program, not prose, and
        rewriting them would break the tool call. Completions: ``prompt`` (a string or a list
        of strings) and ``suffix``. Embeddings: ``input`` (a string or a list of strings).
        Token-id prompts and inputs (lists of integers) are skipped: they cannot be read
        without the model's tokenizer. Values of the wrong type are skipped.
        """
        if not isinstance(payload, dict):
            return []
        slots: list[TextSlot] = []
        messages = payload.get("messages")
        if isinstance(messages, list):
            for i, message in enumerate(messages):
                if isinstance(message, dict):
                    slots += _content(message.get("content"), ("messages", i, "content"))
        for key in ("prompt", "suffix", "input"):
            slots += _strings(payload.get(key), (key,))
        return slots

    def redact_request(
        self, payload: Any, slots: Sequence[TextSlot], spans_per_slot: Sequence[Sequence[Span]]
    ) -> bytes:
        """The request body with the spans of each slot (from ``prompt_texts``) redacted."""
        return dump_json(with_values(payload, redactions(slots, spans_per_slot)))

    def answer_texts(self, payload: Any) -> list[TextSlot]:
        """The non-empty texts of a non-streamed chat completion or completion.

        Chat: each ``choices[].message.content`` string (``refusal`` is OpenAI's own
        wording, not model output to check; audio answers are not covered). Completions:
        each ``choices[].text``.
        """
        if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
            return []
        slots: list[TextSlot] = []
        for i, choice in enumerate(payload["choices"]):
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            if isinstance(message, dict):
                slots += string_slot(message.get("content"), ("choices", i, "message", "content"))
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
        no_logprobs = {(*path[:2], "logprobs"): None for path in texts}
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


FORMAT = OpenAIFormat()
