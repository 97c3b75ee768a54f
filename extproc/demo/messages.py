"""Anthropic Messages (``POST /v1/messages``) and token counting
(``POST /v1/messages/count_tokens``) for the demo upstream."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from checkstream.demo.answer import answer_pieces, content_text, last_user_text, word_count
from checkstream.demo.wire import (
    DemoContext,
    encode_pieces,
    json_response,
    named_sse,
    require,
    require_messages,
    stream,
    wants_stream,
)

_DELTA_HEAD: Final = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":'
)
_DELTA_TAIL: Final = b"}}\n\n"
_BLOCK_START: Final = (
    b"event: content_block_start\ndata: "
    b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
)
_PING: Final = b'event: ping\ndata: {"type":"ping"}\n\n'
_BLOCK_STOP: Final = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def _input_tokens(body: dict[str, Any], messages: list[dict[str, Any]]) -> int:
    # The system prompt does not shape the answer but is billed as input, as upstream does.
    return word_count(content_text(body.get("system"))) + sum(
        word_count(content_text(m.get("content"))) for m in messages
    )


async def messages(ctx: DemoContext, request: web.Request) -> web.StreamResponse:
    req = await ctx.read(request)
    turns = require_messages(req.body)
    model: str = require(req.body, "model", str, "a string")
    require(req.body, "max_tokens", int, "an integer")
    pieces = answer_pieces(last_user_text(turns), req.chunks)
    input_tokens = _input_tokens(req.body, turns)
    message_id = ctx.next_id("msg_demo")
    if not wants_stream(req.body):
        return json_response(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": "".join(pieces)}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": len(pieces)},
            }
        )

    start = {
        "type": "message_start",
        "message": {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        },
    }
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": len(pieces)},
    }
    events = [
        named_sse("message_start", start),
        _BLOCK_START,
        _PING,
        *encode_pieces(pieces, _DELTA_HEAD, _DELTA_TAIL),
        _BLOCK_STOP,
        named_sse("message_delta", delta),
        _MESSAGE_STOP,
    ]
    return await stream(request, events, req.delay_s)


async def count_tokens(ctx: DemoContext, request: web.Request) -> web.StreamResponse:
    req = await ctx.read(request)
    turns = require_messages(req.body)
    require(req.body, "model", str, "a string")
    return json_response({"input_tokens": _input_tokens(req.body, turns)})
