"""Built-in demo upstream: a fake OpenAI / Anthropic HTTP API.

It lets people try the CheckStream gateway without an API key, and gives tests and
benchmarks a deterministic backend whose latency is under our control. It serves:

- ``POST /v1/chat/completions`` (OpenAI chat, streamed or not)
- ``POST /v1/completions`` (OpenAI legacy completions, streamed or not)
- ``POST /v1/messages`` (Anthropic Messages, streamed or not)
- ``GET /v1/models`` (OpenAI-style model list)

The answer is derived from the last user message, so a test can predict it exactly.
Per-request behaviour is steered with headers:

- ``x-demo-chunks``: number of text pieces (stream events carrying text), default 12,
  capped at 2000; each piece is one word plus a space.
- ``x-demo-delay-ms``: delay between stream events, overriding the server default.
- ``x-demo-status``: a 4xx/5xx status to answer with, using the endpoint's error format.

Run standalone with
``python -m extproc.demo_upstream --host 127.0.0.1 --port 9001 --chunk-delay-ms 20``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

DEFAULT_CHUNKS: Final = 12
MAX_CHUNKS: Final = 2000
DEMO_MODELS: Final = ("checkstream-demo", "checkstream-demo-mini")

# Large enough for prompts carrying base64 images (aiohttp's default is 1 MiB).
_MAX_BODY_BYTES: Final = 32 * 1024 * 1024
_PROMPT_ECHO_CHARS: Final = 200
_INTRO: Final = "This is the CheckStream demo upstream."
_PADDING: Final = (
    "It answers one word at a time so the gateway can be tried and measured without any API key."
)

_SEPARATORS: Final = (",", ":")
# Placeholder spliced out of pre-encoded event envelopes; NULs never occur in real model names.
_SLOT: Final = "\x00slot\x00"
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE: Final = b"data: [DONE]\n\n"

_ANTHROPIC_DELTA_HEAD: Final = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":'
)
_ANTHROPIC_DELTA_TAIL: Final = b"}}\n\n"
_ANTHROPIC_BLOCK_START: Final = (
    b"event: content_block_start\ndata: "
    b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
)
_ANTHROPIC_PING: Final = b'event: ping\ndata: {"type":"ping"}\n\n'
_ANTHROPIC_BLOCK_STOP: Final = (
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
)
_ANTHROPIC_MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

_ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class _ErrorReply(Exception):
    """Aborts a handler with an HTTP error rendered in the endpoint's own format."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class _DemoRequest:
    body: dict[str, Any]
    chunks: int
    delay_s: float


@dataclass(frozen=True, slots=True)
class DemoUpstream:
    """A running demo upstream; ``port`` is the bound port (useful when started on port 0)."""

    runner: web.AppRunner
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


def answer_pieces(prompt: str, chunks: int = DEFAULT_CHUNKS) -> list[str]:
    """The text pieces the demo upstream answers ``prompt`` with, in stream order."""
    # rstrip: the cut may land just after a space, which would split the final "." off.
    echo = " ".join(prompt.split())[:_PROMPT_ECHO_CHARS].rstrip()
    said = f"You said: {echo}." if echo else "You said nothing."
    words = f"{_INTRO} {said} {_PADDING}".split()
    pieces = [words[i % len(words)] + " " for i in range(chunks)]
    if pieces:
        # No dangling space at the very end of the answer.
        pieces[-1] = pieces[-1][:-1]
    return pieces


def _word_count(text: str) -> int:
    # Whitespace-split words stand in for tokens: this is a demo, not a tokenizer.
    return len(text.split())


def _content_text(content: Any) -> str:
    """Text of an OpenAI/Anthropic message content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=_SEPARATORS).encode()


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj), status=status, content_type="application/json")


def _template(prefix: bytes, envelope: dict[str, Any], suffix: bytes) -> tuple[bytes, bytes]:
    """Split an encoded event around ``_SLOT`` so per-piece events are two concatenations."""
    head, _, tail = _dumps(envelope).rpartition(_dumps(_SLOT))
    return prefix + head, tail + suffix


def _encode_pieces(pieces: list[str], head: bytes, tail: bytes) -> list[bytes]:
    # Pieces repeat (the answer cycles), so each distinct piece is JSON-encoded once.
    cache: dict[str, bytes] = {}
    events = []
    for piece in pieces:
        encoded = cache.get(piece)
        if encoded is None:
            encoded = cache[piece] = _dumps(piece)
        events.append(head + encoded + tail)
    return events


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _anthropic_sse(event: str, obj: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


def _openai_error(err: _ErrorReply) -> web.Response:
    error_type = "server_error" if err.status >= 500 else "invalid_request_error"
    body = {"error": {"message": err.message, "type": error_type, "param": None, "code": None}}
    return _json_response(body, err.status)


def _anthropic_error(err: _ErrorReply) -> web.Response:
    error_type = _ANTHROPIC_ERROR_TYPES.get(
        err.status, "api_error" if err.status >= 500 else "invalid_request_error"
    )
    body = {"type": "error", "error": {"type": error_type, "message": err.message}}
    return _json_response(body, err.status)


def _int_header(request: web.Request, name: str) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise _ErrorReply(400, f"header {name} must be an integer, got {raw!r}") from None


def _require(body: dict[str, Any], field: str, kind: type, kind_name: str) -> Any:
    value = body.get(field)
    # bool is an int subclass, but `max_tokens: true` is still malformed.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _ErrorReply(400, f"field {field!r} is required and must be {kind_name}")
    return value


def _require_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[Any] = _require(body, "messages", list, "a list of messages")
    if not all(isinstance(message, dict) for message in messages):
        raise _ErrorReply(400, "field 'messages' must be a list of objects")
    return messages


async def _stream(request: web.Request, events: list[bytes], delay_s: float) -> web.StreamResponse:
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    try:
        for i, event in enumerate(events):
            if delay_s and i:
                await asyncio.sleep(delay_s)
            await resp.write(event)
        await resp.write_eof()
    except ConnectionResetError:
        # Clients (and benchmarks) hang up mid-stream on purpose; that is not a server fault.
        pass
    return resp


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _rendering_errors(render: Callable[[_ErrorReply], web.Response], handler: _Handler) -> _Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except _ErrorReply as err:
            return render(err)

    return wrapped


class _Handlers:
    def __init__(self, chunk_delay_ms: float) -> None:
        self._default_delay_s = chunk_delay_ms / 1000
        # Sequential ids keep runs reproducible; uniqueness within one process is enough.
        self._ids = itertools.count(1)

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):024d}"

    async def _read(self, request: web.Request) -> _DemoRequest:
        # Checked before the body so error pass-through can be tested with any payload.
        status = _int_header(request, "x-demo-status")
        if status is not None:
            if not 400 <= status <= 599:
                raise _ErrorReply(400, f"header x-demo-status must be 4xx or 5xx, got {status}")
            raise _ErrorReply(status, f"demo upstream error requested via x-demo-status: {status}")

        chunks = _int_header(request, "x-demo-chunks")
        if chunks is None:
            chunks = DEFAULT_CHUNKS
        elif chunks < 0:
            raise _ErrorReply(400, f"header x-demo-chunks must be >= 0, got {chunks}")

        delay_s = self._default_delay_s
        raw_delay = request.headers.get("x-demo-delay-ms")
        if raw_delay is not None:
            bad_delay = _ErrorReply(400, f"header x-demo-delay-ms must be >= 0, got {raw_delay!r}")
            try:
                delay_ms = float(raw_delay)
            except ValueError:
                raise bad_delay from None
            # The chained comparison also rejects NaN.
            if not 0 <= delay_ms < math.inf:
                raise bad_delay
            delay_s = delay_ms / 1000

        try:
            body = json.loads(await request.read())
        except ValueError:
            raise _ErrorReply(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _ErrorReply(400, "request body must be a JSON object")
        return _DemoRequest(body, min(chunks, MAX_CHUNKS), delay_s)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = await self._read(request)
        messages = _require_messages(req.body)
        model: str = _require(req.body, "model", str, "a string")
        pieces = answer_pieces(_last_user_text(messages), req.chunks)
        prompt_tokens = sum(_word_count(_content_text(m.get("content"))) for m in messages)
        usage = _openai_usage(prompt_tokens, len(pieces))
        common = {
            "id": self._next_id("chatcmpl-demo"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
        }
        if req.body.get("stream") is not True:
            message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            return _json_response({**common, "choices": [choice], "usage": usage})

        chunk = {**common, "object": "chat.completion.chunk"}

        def event(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**chunk, "choices": [choice]}

        head, tail = _template(b"data: ", event({"content": _SLOT}, None), b"\n\n")
        events = [_sse(event({"role": "assistant", "content": ""}, None))]
        events += _encode_pieces(pieces, head, tail)
        events.append(_sse(event({}, "stop")))
        if _include_usage(req.body):
            events.append(_sse({**chunk, "choices": [], "usage": usage}))
        events.append(_DONE)
        return await _stream(request, events, req.delay_s)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = await self._read(request)
        prompt = req.body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            raise _ErrorReply(400, "field 'prompt' is required and must be a string or list")
        model: str = _require(req.body, "model", str, "a string")
        pieces = answer_pieces(prompts[-1] if prompts else "", req.chunks)
        usage = _openai_usage(sum(map(_word_count, prompts)), len(pieces))
        common = {
            "id": self._next_id("cmpl-demo"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }

        def choice(text: str, finish_reason: str | None) -> dict[str, Any]:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}

        if req.body.get("stream") is not True:
            return _json_response(
                {**common, "choices": [choice("".join(pieces), "stop")], "usage": usage}
            )

        head, tail = _template(b"data: ", {**common, "choices": [choice(_SLOT, None)]}, b"\n\n")
        events = _encode_pieces(pieces, head, tail)
        events.append(_sse({**common, "choices": [choice("", "stop")]}))
        if _include_usage(req.body):
            events.append(_sse({**common, "choices": [], "usage": usage}))
        events.append(_DONE)
        return await _stream(request, events, req.delay_s)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        req = await self._read(request)
        messages = _require_messages(req.body)
        model: str = _require(req.body, "model", str, "a string")
        _require(req.body, "max_tokens", int, "an integer")
        pieces = answer_pieces(_last_user_text(messages), req.chunks)
        # The system prompt does not shape the answer but is billed as input, as upstream does.
        input_tokens = _word_count(_content_text(req.body.get("system"))) + sum(
            _word_count(_content_text(m.get("content"))) for m in messages
        )
        message_id = self._next_id("msg_demo")
        if req.body.get("stream") is not True:
            return _json_response(
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
            _anthropic_sse("message_start", start),
            _ANTHROPIC_BLOCK_START,
            _ANTHROPIC_PING,
            *_encode_pieces(pieces, _ANTHROPIC_DELTA_HEAD, _ANTHROPIC_DELTA_TAIL),
            _ANTHROPIC_BLOCK_STOP,
            _anthropic_sse("message_delta", delta),
            _ANTHROPIC_MESSAGE_STOP,
        ]
        return await _stream(request, events, req.delay_s)


def _openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


_MODELS_BODY: Final = _dumps(
    {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "checkstream"}
            for model in DEMO_MODELS
        ],
    }
)


async def _models(request: web.Request) -> web.Response:
    return web.Response(body=_MODELS_BODY, content_type="application/json")


def create_app(chunk_delay_ms: float = 0.0) -> web.Application:
    """Build the demo upstream app; ``chunk_delay_ms`` is the default delay between events."""
    if not chunk_delay_ms >= 0:
        raise ValueError(f"chunk_delay_ms must be >= 0, got {chunk_delay_ms}")
    handlers = _Handlers(chunk_delay_ms)
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    app.add_routes(
        [
            web.post(
                "/v1/chat/completions",
                _rendering_errors(_openai_error, handlers.chat_completions),
            ),
            web.post("/v1/completions", _rendering_errors(_openai_error, handlers.completions)),
            web.post("/v1/messages", _rendering_errors(_anthropic_error, handlers.messages)),
            web.get("/v1/models", _models),
        ]
    )
    return app


async def start_demo_upstream(host: str, port: int, chunk_delay_ms: float = 0.0) -> DemoUpstream:
    """Serve the demo upstream on ``host:port`` (port 0 picks a free port)."""
    # No access log: the benchmark uses this server as its zero-overhead baseline.
    runner = web.AppRunner(create_app(chunk_delay_ms), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port: int = runner.addresses[0][1]
    return DemoUpstream(runner, bound_port)


async def _serve(host: str, port: int, chunk_delay_ms: float) -> None:
    upstream = await start_demo_upstream(host, port, chunk_delay_ms)
    stopped = asyncio.Event()
    # Containers stop us with SIGTERM; exit cleanly rather than being killed mid-write.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    print(f"CheckStream demo upstream listening on http://{host}:{upstream.port}", flush=True)
    try:
        await stopped.wait()
    finally:
        await upstream.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.demo_upstream",
        description="Fake OpenAI/Anthropic API for trying CheckStream without an API key.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=0.0, help="delay between stream events"
    )
    args = parser.parse_args(argv)
    # Ctrl-C is the normal way to stop it when run by hand.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.chunk_delay_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
