"""Model listing (``GET /v1/models``, ``GET /v1/models/{id}``) for the demo upstream, in
OpenAI's shape, or Anthropic's when the caller sends ``anthropic-version`` as its SDK does."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from checkstream.demo.wire import (
    DemoError,
    error_body,
    format_of,
    json_response,
    raise_requested_error,
)

DEMO_MODELS: Final = ("checkstream-demo", "checkstream-demo-mini")
# 2026-01-01T00:00:00Z: a fixed date keeps answers reproducible.
_CREATED: Final = 1767225600


def _openai_model(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": _CREATED, "owned_by": "checkstream"}


def _anthropic_model(model: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model,
        "display_name": model.replace("-", " ").title(),
        "created_at": "2026-01-01T00:00:00Z",
    }


async def list_models(request: web.Request) -> web.StreamResponse:
    try:
        raise_requested_error(request)
    except DemoError as err:
        return json_response(error_body(format_of(request), err.status, err.message), err.status)
    if format_of(request) == "anthropic":
        return json_response(
            {
                "data": [_anthropic_model(m) for m in DEMO_MODELS],
                "has_more": False,
                "first_id": DEMO_MODELS[0],
                "last_id": DEMO_MODELS[-1],
            }
        )
    return json_response({"object": "list", "data": [_openai_model(m) for m in DEMO_MODELS]})


async def get_model(request: web.Request) -> web.StreamResponse:
    model = request.match_info["model"]
    fmt = format_of(request)
    try:
        raise_requested_error(request)
    except DemoError as err:
        return json_response(error_body(fmt, err.status, err.message), err.status)
    if model not in DEMO_MODELS:
        message = f"the model '{model}' does not exist (the demo serves {', '.join(DEMO_MODELS)})"
        return json_response(error_body(fmt, 404, message), 404)
    return json_response(_anthropic_model(model) if fmt == "anthropic" else _openai_model(model))
