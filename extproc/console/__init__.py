"""The operator console: ``/ui/`` on the admin server (launcher, or a worker serving
``--admin``). ``add_console`` registers its routes on the admin app and runs its collector
while the app runs; ``views.py`` has the pages and the access rules."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web

from checkstream.console.collector import Collector
from checkstream.console.sessions import Session
from checkstream.console.source import ConsoleSource
from checkstream.console.views import PREFIX, Console, Handler, SignedIn, same_origin, see_other

__all__ = ["CONSOLE_KEY", "ROUTE_PREFIX", "ConsoleSource", "add_console"]

#: Route names start with this; the admin guard leaves their access to the console.
ROUTE_PREFIX: Final = "console."
CONSOLE_KEY: web.AppKey[Console] = web.AppKey("console")


def add_console(app: web.Application, source: ConsoleSource, token: str | None) -> None:
    collector = Collector(source)
    console = Console(source, token, collector)
    app[CONSOLE_KEY] = console

    def enabled(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if token is None:
                return console.page(request, "disabled.html", 403)
            return await handler(request)

        return guarded

    def signed_in(handler: SignedIn, *, post: bool = False) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            session = console.session_of(request)
            if session is None:
                if post:
                    return console.message(request, 403, "Refused", "Sign in first.")
                return see_other(PREFIX + "sign-in")
            if post:
                form = await request.post()
                csrf = form.get("csrf")
                if not (same_origin(request) and isinstance(csrf, str) and session.csrf_ok(csrf)):
                    return console.message(
                        request, 403, "Refused", "Missing or wrong CSRF token: reload the page."
                    )
            return await handler(request, session)

        return guarded

    def sign_in_post(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not same_origin(request):
                return console.message(request, 403, "Refused", "Cross-origin sign-in.")
            return await handler(request)

        return guarded

    def route(method: str, path: str, handler: Handler, name: str) -> None:
        app.router.add_route(method, PREFIX.rstrip("/") + path, enabled(handler),
                             name=ROUTE_PREFIX + name)  # fmt: skip

    async def to_slash(request: web.Request) -> web.StreamResponse:
        return see_other(PREFIX)

    def tenant_action(suspended: bool) -> SignedIn:
        async def act(request: web.Request, session: Session) -> web.StreamResponse:
            return await console.set_suspended(request, session, suspended)

        return act

    route("GET", "", to_slash, "root")
    route("GET", "/", signed_in(console.overview), "overview")
    route("GET", "/sign-in", console.sign_in_form, "sign_in_form")
    route("POST", "/sign-in", sign_in_post(console.sign_in), "sign_in")
    route("POST", "/sign-out", signed_in(console.sign_out, post=True), "sign_out")
    route("GET", "/tenants/{tenant}", signed_in(console.tenant), "tenant")
    route("POST", "/tenants/{tenant}/suspend", signed_in(tenant_action(True), post=True),
          "suspend")  # fmt: skip
    route("POST", "/tenants/{tenant}/resume", signed_in(tenant_action(False), post=True),
          "resume")  # fmt: skip
    route("GET", "/tenants/{tenant}/usage.csv", signed_in(console.usage_csv), "usage_csv")
    route("GET", "/static/{name}", console.static_file, "static")

    if token is not None:
        app.cleanup_ctx.append(_running(collector))


def _running(collector: Collector) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(collector.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await collector.aclose()

    return run
