"""Anthropic's Messages API: error bodies, auth, and the texts guardrails check."""

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


@dataclass(frozen=True)
class AnthropicFormat:
    name: str = "anthropic"
    auth_header: str = "x-api-key"

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
        ``text`` blocks, ``tool_result`` blocks (their content a string or text blocks) and
        plain-text ``document`` blocks (``source.type: "text"``). Images, tool inputs and
        ``thinking`` blocks are skipped: thinking is signed by Anthropic, so it could not be
        rewritten anyway. Values of the wrong type are skipped.
        """
        if not isinstance(payload, dict):
            return []
        slots = _content(payload.get("system"), ("system",))
        messages = payload.get("messages")
        if isinstance(messages, list):
            for i, message in enumerate(messages):
                if isinstance(message, dict):
                    slots += _content(message.get("content"), ("messages", i, "content"))
        return slots

    def redact_request(
        self, payload: Any, slots: Sequence[TextSlot], spans_per_slot: Sequence[Sequence[Span]]
    ) -> bytes:
        """The request body with the spans of each slot (from ``prompt_texts``) redacted."""
        return dump_json(with_values(payload, redactions(slots, spans_per_slot)))

    def answer_texts(self, payload: Any) -> list[TextSlot]:
        """The non-empty ``text`` blocks of a non-streamed ``message``."""
        if not isinstance(payload, dict) or not isinstance(payload.get("content"), list):
            return []
        return [
            slot
            for i, block in enumerate(payload["content"])
            if isinstance(block, dict) and block.get("type") == "text"
            for slot in string_slot(block.get("text"), ("content", i, "text"))
        ]

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
            slots += _content(block.get("content"), (*path, j, "content"))
        elif kind == "document":
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") == "text":
                slots += string_slot(source.get("data"), (*path, j, "source", "data"))
    return slots


FORMAT = AnthropicFormat()
