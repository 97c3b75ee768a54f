"""OpenAI Embeddings (``POST /v1/embeddings``) for the demo upstream: deterministic unit
vectors derived from each input's hash, as floats or base64 (the SDK's default)."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from typing import Any, Final

from aiohttp import web

from checkstream.demo.answer import word_count
from checkstream.demo.wire import DemoContext, DemoError, json_response, require

DEFAULT_DIMENSIONS: Final = 8
_MAX_DIMENSIONS: Final = 4096


def embed(text: str, dimensions: int) -> list[float]:
    """A unit vector that depends only on ``text``: equal texts embed equally."""
    raw = b""
    counter = 0
    while len(raw) < dimensions * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    # Map each 32-bit word to [-1, 1), then normalise as real embeddings are.
    values = [
        (word / 2**31) - 1.0 for word in struct.unpack(f"<{dimensions}I", raw[: dimensions * 4])
    ]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _inputs(body: dict[str, Any]) -> list[str]:
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        return raw
    if isinstance(raw, list) and raw and all(isinstance(item, int) for item in raw):
        return [" ".join(map(str, raw))]  # one input given as token ids
    if (
        isinstance(raw, list)
        and raw
        and all(isinstance(item, list) and all(isinstance(t, int) for t in item) for item in raw)
    ):
        return [" ".join(map(str, item)) for item in raw]
    raise DemoError(
        400, "field 'input' is required and must be a string, a list of strings or token ids"
    )


async def embeddings(ctx: DemoContext, request: web.Request) -> web.StreamResponse:
    req = await ctx.read(request)
    model: str = require(req.body, "model", str, "a string")
    inputs = _inputs(req.body)
    dimensions = req.body.get("dimensions", DEFAULT_DIMENSIONS)
    if not isinstance(dimensions, int) or isinstance(dimensions, bool):
        raise DemoError(400, "field 'dimensions' must be an integer")
    if not 1 <= dimensions <= _MAX_DIMENSIONS:
        raise DemoError(400, f"field 'dimensions' must be between 1 and {_MAX_DIMENSIONS}")
    encoding = req.body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise DemoError(400, "field 'encoding_format' must be 'float' or 'base64'")
    data = []
    for index, text in enumerate(inputs):
        vector = embed(text, dimensions)
        value: list[float] | str = vector
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": value})
    tokens = sum(word_count(text) for text in inputs)
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
