"""OpenAI legacy Completions (``POST /v1/completions``) for the demo upstream."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from checkstream.demo.answer import answer_pieces, word_count
from checkstream.demo.chat import include_usage, openai_usage
from checkstream.demo.wire import (
    DONE,
    SLOT,
    DemoContext,
    DemoError,
    encode_pieces,
    json_response,
    require,
    sse,
    stream,
    template,
    wants_stream,
)


async def completions(ctx: DemoContext, request: web.Request) -> web.StreamResponse:
    req = await ctx.read(request)
    prompt = req.body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    else:
        raise DemoError(400, "field 'prompt' is required and must be a string or list")
    model: str = require(req.body, "model", str, "a string")
    pieces = answer_pieces(prompts[-1] if prompts else "", req.chunks)
    usage = openai_usage(sum(map(word_count, prompts)), len(pieces))
    common = {
        "id": ctx.next_id("cmpl-demo"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }

    def choice(text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}

    if not wants_stream(req.body):
        return json_response(
            {**common, "choices": [choice("".join(pieces), "stop")], "usage": usage}
        )

    head, tail = template(b"data: ", {**common, "choices": [choice(SLOT, None)]}, b"\n\n")
    events = encode_pieces(pieces, head, tail)
    events.append(sse({**common, "choices": [choice("", "stop")]}))
    if include_usage(req.body):
        events.append(sse({**common, "choices": [], "usage": usage}))
    events.append(DONE)
    return await stream(request, events, req.delay_s)
