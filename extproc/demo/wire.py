"""The demo upstream's HTTP plumbing shared by every API: request reading, JSON and SSE
writing, errors in each API's own shape. Runs in whichever process serves the demo upstream
(``checkstream run --demo``, ``python -m checkstream.demo``, tests)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aiohttp import web

DEFAULT_DELAY_MS: Final = 0.0
MAX_CHUNKS: Final = 2000

_SEPARATORS: Final = (",", ":")
# Placeholder spliced out of pre-encoded event envelopes; NULs never occur in real model names.
SLOT: Final = "\x00slot\x00"
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE: Final = b"data: [DONE]\n\n"

ErrorFormat = Literal["openai", "anthropic"]

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


class DemoError(Exception):
    """Aborts a handler with an HTTP error rendered in the endpoint's own format."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class DemoRequest:
    body: dict[str, Any]
    #: Text pieces asked for with ``x-demo-chunks``; None: the whole answer.
    chunks: int | None
    delay_s: float


@dataclass
class DemoContext:
    """What every handler shares: the default delay between events and the id counter."""

    default_delay_s: float
    # Sequential ids keep runs reproducible; uniqueness within one process is enough.
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):024d}"

    async def read(self, request: web.Request) -> DemoRequest:
        # Checked before the body so error pass-through can be tested with any payload.
        raise_requested_error(request)

        chunks = _int_header(request, "x-demo-chunks")
        if chunks is not None and chunks < 0:
            raise DemoError(400, f"header x-demo-chunks must be >= 0, got {chunks}")

        delay_s = self.default_delay_s
        raw_delay = request.headers.get("x-demo-delay-ms")
        if raw_delay is not None:
            bad_delay = DemoError(400, f"header x-demo-delay-ms must be >= 0, got {raw_delay!r}")
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
            raise DemoError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise DemoError(400, "request body must be a JSON object")
        return DemoRequest(body, None if chunks is None else min(chunks, MAX_CHUNKS), delay_s)


def raise_requested_error(request: web.Request) -> None:
    """Answer with the error ``x-demo-status`` asks for, if it asks."""
    status = _int_header(request, "x-demo-status")
    if status is not None:
        if not 400 <= status <= 599:
            raise DemoError(400, f"header x-demo-status must be 4xx or 5xx, got {status}")
        raise DemoError(status, f"demo upstream error requested via x-demo-status: {status}")


def _int_header(request: web.Request, name: str) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DemoError(400, f"header {name} must be an integer, got {raw!r}") from None


def require(body: dict[str, Any], name: str, kind: type, kind_name: str) -> Any:
    value = body.get(name)
    # bool is an int subclass, but `max_tokens: true` is still malformed.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DemoError(400, f"field {name!r} is required and must be {kind_name}")
    return value


def require_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[Any] = require(body, "messages", list, "a list of messages")
    if not all(isinstance(message, dict) for message in messages):
        raise DemoError(400, "field 'messages' must be a list of objects")
    return messages


def wants_stream(body: dict[str, Any]) -> bool:
    return body.get("stream") is True


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=_SEPARATORS).encode()


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json")


def sse(obj: Any) -> bytes:
    """An unnamed SSE event (OpenAI chat and completions)."""
    return b"data: " + dumps(obj) + b"\n\n"


def named_sse(event: str, obj: Any) -> bytes:
    """A named SSE event (Anthropic messages, OpenAI Responses)."""
    return b"event: " + event.encode() + b"\ndata: " + dumps(obj) + b"\n\n"


def template(prefix: bytes, envelope: dict[str, Any], suffix: bytes) -> tuple[bytes, bytes]:
    """Split an encoded event around ``SLOT`` so per-piece events are two concatenations."""
    head, _, tail = dumps(envelope).rpartition(dumps(SLOT))
    return prefix + head, tail + suffix


def encode_pieces(pieces: list[str], head: bytes, tail: bytes) -> list[bytes]:
    # Pieces repeat (long answers cycle), so each distinct piece is JSON-encoded once.
    cache: dict[str, bytes] = {}
    events = []
    for piece in pieces:
        encoded = cache.get(piece)
        if encoded is None:
            encoded = cache[piece] = dumps(piece)
        events.append(head + encoded + tail)
    return events


async def stream(request: web.Request, events: list[bytes], delay_s: float) -> web.StreamResponse:
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    try:
        await resp.prepare(request)
        for i, event in enumerate(events):
            if delay_s and i:
                await asyncio.sleep(delay_s)
            await resp.write(event)
        await resp.write_eof()
    except ConnectionResetError:
        # Clients (and benchmarks) hang up mid-stream on purpose; that is not a server fault.
        pass
    return resp


def error_body(fmt: ErrorFormat, status: int, message: str) -> dict[str, Any]:
    if fmt == "anthropic":
        error_type = _ANTHROPIC_ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": error_type, "message": message}}
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": error_type, "param": None, "code": None}}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def speaks(fmt: ErrorFormat, handler: Handler) -> Handler:
    """``handler`` with its DemoErrors answered in ``fmt``'s error shape."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except DemoError as err:
            return json_response(error_body(fmt, err.status, err.message), err.status)

    return wrapped


def format_of(request: web.Request) -> ErrorFormat:
    # Anthropic's SDK always sends anthropic-version; OpenAI's never does.
    return "anthropic" if "anthropic-version" in request.headers else "openai"


@web.middleware
async def json_http_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths and wrong methods answer JSON in the caller's API shape, not plain text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{request.method} {request.path}: {exc.reason}"
        if exc.status == 404:
            message = f"the demo upstream does not serve {request.method} {request.path}"
        body = error_body(format_of(request), exc.status, message)
        # Keep Allow on a 405: clients use it.
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.Response(
            body=dumps(body), status=exc.status, content_type="application/json", headers=headers
        )
