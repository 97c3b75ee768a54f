"""The admin HTTP server, run by the launcher on ``server.admin_port``.

Open to anyone who can reach the port: ``GET /healthz`` (503 once the gateway drains),
``GET /readyz``, ``GET /metrics``
and ``GET /admin/tenant-info`` (it resolves the caller's own tenant, exactly as traffic is
resolved). Every other ``/admin/*`` endpoint changes the gateway and needs the header
``x-checkstream-admin-token`` equal to ``$CHECKSTREAM_ADMIN_TOKEN``:

- variable unset or empty: 403, the endpoints are off;
- header missing or wrong: 401 (the body never repeats what was sent or expected);
- ``POST /admin/reload``: 200 ``{"status": "reloaded", "version"}``, or 400
  ``{"status": "refused", "error", "version"}`` with the version still serving;
- ``POST /admin/tenants/{tenant}/suspend`` and ``/resume``: 200
  ``{"tenant", "suspended"}``, 404 for an unknown tenant, 409 to resume a tenant whose
  config says ``suspended: true`` (only the config can lift that), 503 when the store the
  suspensions live in (Redis) cannot be reached, nothing changed;
- ``GET /admin/status``: ``{"status", "config_version", "replica", "workers"}``, what
  ``checkstream fleet status`` compares across replicas.

The operator console (``/ui/``, ``console/``) is added when the backend can feed it; it
signs operators in with the same token and checks its own sessions.

Unknown paths answer 404 and wrong methods 405 before the token is looked at: the
endpoint list is public, only acting on it is not. Every answer is JSON (except
``/metrics`` and the proxied tenant-info), and a failure inside the backend is logged and
answered as a bare 500, never as a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from checkstream.accounting.suspensions import SuspensionOutcome
from checkstream.console import ROUTE_PREFIX as CONSOLE_ROUTES
from checkstream.console import ConsoleSource, add_console
from checkstream.ops import logs

log = logs.get("checkstream.admin")

ADMIN_TOKEN_ENV = "CHECKSTREAM_ADMIN_TOKEN"
TOKEN_HEADER = "x-checkstream-admin-token"

# Routes served without the admin token, by route name.
_OPEN_ROUTES = frozenset({"healthz", "readyz", "metrics", "tenant_info"})
# aiohttp frames the proxied body itself; copying the upstream's framing would contradict it.
_FRAMING_HEADERS = frozenset(
    {"connection", "content-length", "keep-alive", "transfer-encoding", "upgrade"}
)


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    version: str | None  # config version hash in force after the call
    error: str | None  # the validation error (file:line: key: message lines) when refused


class AdminBackend(Protocol):
    """What the admin server asks of the gateway; the launcher implements it."""

    def live(self) -> bool:
        """The gateway is not draining (a load balancer must stop sending it traffic)."""
        ...

    def ready(self) -> bool:
        """Envoy and all workers are serving and the gateway is not draining."""
        ...

    def metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition body and its content type."""
        ...

    async def reload(self) -> ReloadOutcome:
        """Reload the configuration files, keeping the old configuration if they are invalid."""
        ...

    async def set_suspended(self, tenant: str, suspended: bool) -> SuspensionOutcome:
        """Suspend or resume a tenant; a refusal changes nothing anywhere."""
        ...

    async def status(self) -> dict[str, Any]:
        """Health and config version of this gateway and each of its workers (JSON-able)."""
        ...

    async def tenant_info(
        self, headers: Mapping[str, str], path_qs: str
    ) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of the tenant-info answer for a caller with these headers."""
        ...


_BACKEND_KEY: web.AppKey[AdminBackend] = web.AppKey("backend")
_TOKEN_DIGEST_KEY: web.AppKey[bytes | None] = web.AppKey("token_digest")


def admin_token_from_env() -> str | None:
    """The admin token, or None when unset: an empty value must not become a valid token."""
    return os.environ.get(ADMIN_TOKEN_ENV) or None


def _digest(value: str) -> bytes:
    # Equal-length digests so compare_digest's time does not reveal the token's length;
    # surrogateescape because aiohttp decodes header bytes that way.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Routing errors and token checks as JSON; backend failures as a bare 500."""
    routing_error = request.match_info.http_exception
    if routing_error is not None:
        response = _error(routing_error.status, routing_error.reason.lower())
        if "Allow" in routing_error.headers:
            response.headers["Allow"] = routing_error.headers["Allow"]
        return response
    name = request.match_info.route.name or ""
    # The console checks its own sessions (and the token's presence) under /ui/.
    if name not in _OPEN_ROUTES and not name.startswith(CONSOLE_ROUTES):
        token_digest = request.app[_TOKEN_DIGEST_KEY]
        if token_digest is None:
            return _error(403, f"admin endpoints are disabled: set {ADMIN_TOKEN_ENV}")
        given = request.headers.get(TOKEN_HEADER)
        if given is None or not hmac.compare_digest(_digest(given), token_digest):
            return _error(401, f"missing or wrong {TOKEN_HEADER} header")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return _error(exc.status, exc.reason.lower())
    except Exception:
        log.exception("admin_failed", method=request.method, path=request.path)
        return _error(500, "internal error")


def _backend(request: web.Request) -> AdminBackend:
    return request.app[_BACKEND_KEY]


async def _healthz(request: web.Request) -> web.Response:
    if _backend(request).live():
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "draining"}, status=503)


async def _readyz(request: web.Request) -> web.Response:
    if _backend(request).ready():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = _backend(request).metrics()
    # Set as a raw header: content_type= would reject the charset parameter.
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _tenant_info(request: web.Request) -> web.Response:
    status, headers, body = await _backend(request).tenant_info(request.headers, request.path_qs)
    kept = {name: value for name, value in headers.items() if name.lower() not in _FRAMING_HEADERS}
    return web.Response(status=status, headers=kept, body=body)


async def _reload(request: web.Request) -> web.Response:
    outcome = await _backend(request).reload()
    if outcome.ok:
        return web.json_response({"status": "reloaded", "version": outcome.version})
    return web.json_response(
        {"status": "refused", "error": outcome.error, "version": outcome.version}, status=400
    )


async def _set_suspended(request: web.Request, suspended: bool) -> web.Response:
    tenant = request.match_info["tenant"]
    outcome = await _backend(request).set_suspended(tenant, suspended)
    if outcome.status != 200:
        return _error(outcome.status, outcome.error or "refused")
    return web.json_response({"tenant": tenant, "suspended": suspended})


async def _status(request: web.Request) -> web.Response:
    return web.json_response(await _backend(request).status())


async def _suspend(request: web.Request) -> web.Response:
    return await _set_suspended(request, True)


async def _resume(request: web.Request) -> web.Response:
    return await _set_suspended(request, False)


def build_admin_app(backend: AdminBackend, token: str | None) -> web.Application:
    """The admin application; ``token`` None turns the token-guarded endpoints off."""
    app = web.Application(middlewares=[_guard])
    app[_BACKEND_KEY] = backend
    # Only the digest is kept: comparing needs nothing else.
    app[_TOKEN_DIGEST_KEY] = None if token is None else _digest(token)
    app.router.add_get("/healthz", _healthz, name="healthz")
    app.router.add_get("/readyz", _readyz, name="readyz")
    app.router.add_get("/metrics", _metrics, name="metrics")
    app.router.add_get("/admin/tenant-info", _tenant_info, name="tenant_info")
    app.router.add_post("/admin/reload", _reload, name="reload")
    app.router.add_get("/admin/status", _status, name="status")
    app.router.add_post("/admin/tenants/{tenant}/suspend", _suspend, name="suspend")
    app.router.add_post("/admin/tenants/{tenant}/resume", _resume, name="resume")
    if isinstance(backend, ConsoleSource):
        add_console(app, backend, token)
    return app


async def start_admin(
    backend: AdminBackend, host: str, port: int, token: str | None
) -> Callable[[], Awaitable[None]]:
    """Serve the admin app on host:port; returns the coroutine function that stops it."""
    # No access log: Prometheus scrapes /metrics every few seconds; the backend logs changes.
    # A short shutdown: a scrape or reload in flight must not hold the gateway's exit.
    runner = web.AppRunner(build_admin_app(backend, token), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner.cleanup
