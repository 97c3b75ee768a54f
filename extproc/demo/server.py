"""The demo upstream's aiohttp application: routes, start and stop. Runs inside
``checkstream run --demo`` (the launcher's process), ``python -m checkstream.demo`` or a test."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from checkstream.demo import chat, completions, embeddings, messages, models, responses
from checkstream.demo.wire import DemoContext, ErrorFormat, json_http_errors, speaks

# Large enough for prompts carrying base64 images (aiohttp's default is 1 MiB).
_MAX_BODY_BYTES: Final = 32 * 1024 * 1024

_Endpoint = Callable[[DemoContext, web.Request], Awaitable[web.StreamResponse]]
_POSTS: Final[tuple[tuple[str, ErrorFormat, _Endpoint], ...]] = (
    ("/v1/chat/completions", "openai", chat.chat_completions),
    ("/v1/completions", "openai", completions.completions),
    ("/v1/responses", "openai", responses.responses),
    ("/v1/embeddings", "openai", embeddings.embeddings),
    ("/v1/messages", "anthropic", messages.messages),
    ("/v1/messages/count_tokens", "anthropic", messages.count_tokens),
)


@dataclass(frozen=True, slots=True)
class DemoUpstream:
    """A running demo upstream; ``port`` is the bound port (useful when started on port 0)."""

    runner: web.AppRunner
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


def create_app(chunk_delay_ms: float = 0.0) -> web.Application:
    """Build the demo upstream app; ``chunk_delay_ms`` is the default delay between events."""
    if not chunk_delay_ms >= 0:
        raise ValueError(f"chunk_delay_ms must be >= 0, got {chunk_delay_ms}")
    ctx = DemoContext(chunk_delay_ms / 1000)
    app = web.Application(client_max_size=_MAX_BODY_BYTES, middlewares=[json_http_errors])

    def bound(endpoint: _Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await endpoint(ctx, request)

        return handle

    app.add_routes([web.post(path, speaks(fmt, bound(fn))) for path, fmt, fn in _POSTS])
    app.add_routes(
        [web.get("/v1/models", models.list_models), web.get("/v1/models/{model}", models.get_model)]
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


async def serve_until_stopped(host: str, port: int, chunk_delay_ms: float) -> None:
    upstream = await start_demo_upstream(host, port, chunk_delay_ms)
    stopped = asyncio.Event()
    # Containers stop us with SIGTERM; exit cleanly rather than being killed mid-write.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    print(f"CheckStream demo upstream listening on http://{host}:{upstream.port}", flush=True)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await stopped.wait()
    finally:
        await upstream.close()
