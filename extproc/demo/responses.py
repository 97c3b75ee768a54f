"""OpenAI Responses (``POST /v1/responses``) for the demo upstream: one assistant message,
whole or streamed with the event sequence OpenAI sends (created, in_progress,
output_item.added, content_part.added, output_text.delta..., output_text.done,
content_part.done, output_item.done, completed)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from checkstream.demo.answer import answer_pieces, content_text, word_count
from checkstream.demo.wire import (
    DemoContext,
    DemoError,
    json_response,
    named_sse,
    require,
    stream,
    wants_stream,
)


def _input_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """``input`` as a list of message items (a bare string is one user message)."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if isinstance(raw, list) and all(isinstance(item, dict) for item in raw):
        # Tool calls and their outputs carry no prompt text the demo answers to.
        return [item for item in raw if item.get("type", "message") == "message"]
    raise DemoError(400, "field 'input' is required and must be a string or a list of items")


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _response(
    body: dict[str, Any],
    response_id: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"],
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


async def responses(ctx: DemoContext, request: web.Request) -> web.StreamResponse:
    req = await ctx.read(request)
    body = req.body
    require(body, "model", str, "a string")
    turns = _input_messages(body)
    users = [t for t in turns if t.get("role") == "user"]
    prompt = content_text(users[-1].get("content")) if users else ""
    pieces = answer_pieces(prompt, req.chunks)
    text = "".join(pieces)
    input_tokens = word_count(content_text(body.get("instructions"))) + sum(
        word_count(content_text(t.get("content"))) for t in turns
    )
    usage = _usage(input_tokens, len(pieces))
    response_id = ctx.next_id("resp_demo")
    item_id = ctx.next_id("msg_demo")
    created_at = int(time.time())
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    if not wants_stream(body):
        return json_response(_response(body, response_id, created_at, "completed", [item], usage))

    events: list[bytes] = []

    def emit(kind: str, fields: dict[str, Any]) -> None:
        events.append(named_sse(kind, {"type": kind, "sequence_number": len(events), **fields}))

    pending = _response(body, response_id, created_at, "in_progress", [], None)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    emit("response.created", {"response": pending})
    emit("response.in_progress", {"response": pending})
    emit(
        "response.output_item.added",
        {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
    )
    emit("response.content_part.added", {**where, "part": {**part, "text": ""}})
    for piece in pieces:
        emit("response.output_text.delta", {**where, "delta": piece, "logprobs": []})
    emit("response.output_text.done", {**where, "text": text, "logprobs": []})
    emit("response.content_part.done", {**where, "part": part})
    emit("response.output_item.done", {"output_index": 0, "item": item})
    done = _response(body, response_id, created_at, "completed", [item], usage)
    emit("response.completed", {"response": done})
    return await stream(request, events, req.delay_s)
