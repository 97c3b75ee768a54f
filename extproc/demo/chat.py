"""OpenAI Chat Completions (``POST /v1/chat/completions``) for the demo upstream."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from checkstream.demo.answer import answer_pieces, content_text, last_user_text, word_count
from checkstream.demo.wire import (
    DONE,
    SLOT,
    DemoContext,
    encode_pieces,
    json_response,
    require,
    require_messages,
    sse,
    stream,
    template,
    wants_stream,
)


def openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def chat_completions(ctx: DemoContext, request: web.Request) -> web.StreamResponse:
    req = await ctx.read(request)
    messages = require_messages(req.body)
    model: str = require(req.body, "model", str, "a string")
    pieces = answer_pieces(last_user_text(messages), req.chunks)
    prompt_tokens = sum(word_count(content_text(m.get("content"))) for m in messages)
    usage = openai_usage(prompt_tokens, len(pieces))
    common = {
        "id": ctx.next_id("chatcmpl-demo"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
    }
    if not wants_stream(req.body):
        message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return json_response({**common, "choices": [choice], "usage": usage})

    chunk = {**common, "object": "chat.completion.chunk"}

    def event(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**chunk, "choices": [choice]}

    head, tail = template(b"data: ", event({"content": SLOT}, None), b"\n\n")
    events = [sse(event({"role": "assistant", "content": ""}, None))]
    events += encode_pieces(pieces, head, tail)
    events.append(sse(event({}, "stop")))
    if include_usage(req.body):
        events.append(sse({**chunk, "choices": [], "usage": usage}))
    events.append(DONE)
    return await stream(request, events, req.delay_s)
