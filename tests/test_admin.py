"""The admin server over real HTTP on 127.0.0.1, with a fake gateway behind it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from checkstream.accounting.suspensions import SuspensionOutcome
from checkstream.ops.admin import (
    ADMIN_TOKEN_ENV,
    ReloadOutcome,
    admin_token_from_env,
    start_admin,
)
from tests.support import free_port

TOKEN = "s3cret-admin-token"
AUTH = {"x-checkstream-admin-token": TOKEN}


RELOADED = ReloadOutcome(True, "v2", None)


class BackendFailure(Exception):
    pass


@dataclass
class FakeGateway:
    """The launcher's side of the admin API, with knobs for each outcome."""

    is_ready: bool = True
    is_live: bool = True
    reload_outcome: ReloadOutcome = RELOADED
    tenants: set[str] = field(default_factory=lambda: {"acme"})
    suspended: set[str] = field(default_factory=set)
    fail: bool = False
    refusal: SuspensionOutcome | None = None
    tenant_info_calls: list[tuple[dict[str, str], str]] = field(default_factory=list)

    def _maybe_fail(self) -> None:
        if self.fail:
            raise BackendFailure("db password is hunter2")

    def live(self) -> bool:
        return self.is_live

    def ready(self) -> bool:
        self._maybe_fail()
        return self.is_ready

    def metrics(self) -> tuple[bytes, str]:
        self._maybe_fail()
        return b"checkstream_requests_total 3.0\n", "text/plain; version=0.0.4; charset=utf-8"

    async def reload(self) -> ReloadOutcome:
        self._maybe_fail()
        return self.reload_outcome

    async def set_suspended(self, tenant: str, suspended: bool) -> SuspensionOutcome:
        self._maybe_fail()
        if self.refusal is not None:
            return self.refusal
        if tenant not in self.tenants:
            return SuspensionOutcome(404, f"unknown tenant: {tenant}")
        if suspended:
            self.suspended.add(tenant)
        else:
            self.suspended.discard(tenant)
        return SuspensionOutcome(200)

    async def status(self) -> dict[str, Any]:
        self._maybe_fail()
        return {"status": "ready", "config_version": "v1", "workers": []}

    async def tenant_info(
        self, headers: Mapping[str, str], path_qs: str
    ) -> tuple[int, dict[str, str], bytes]:
        self._maybe_fail()
        self.tenant_info_calls.append(({k.lower(): v for k, v in headers.items()}, path_qs))
        reply = {
            "content-type": "application/json",
            "x-checkstream-tenant": "acme",
            # Framing of the proxied answer: the admin server must frame the body itself.
            "content-length": "999",
            "transfer-encoding": "chunked",
        }
        return 200, reply, b'{"tenant": "acme"}'


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Call = Callable[..., Awaitable[Answer]]


async def serve(
    backend: FakeGateway, token: str | None
) -> tuple[Callable[[], Awaitable[None]], Call, aiohttp.ClientSession]:
    port = free_port()
    stop = await start_admin(backend, "127.0.0.1", port, token)
    session = aiohttp.ClientSession()

    async def call(method: str, path: str, headers: dict[str, str] | None = None) -> Answer:
        url = f"http://127.0.0.1:{port}{path}"
        async with session.request(method, url, headers=headers) as response:
            return Answer(response.status, response.headers, await response.read())

    return stop, call, session


@pytest.fixture
def backend() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
async def admin(backend: FakeGateway) -> AsyncIterator[Call]:
    stop, call, session = await serve(backend, TOKEN)
    yield call
    await session.close()
    await stop()


@pytest.fixture
async def admin_without_token(backend: FakeGateway) -> AsyncIterator[Call]:
    stop, call, session = await serve(backend, None)
    yield call
    await session.close()
    await stop()


async def test_healthz_answers_ok(admin: Call) -> None:
    answer = await admin("GET", "/healthz")
    assert (answer.status, answer.json()) == (200, {"status": "ok"})
    assert answer.headers["content-type"].startswith("application/json")


async def test_healthz_answers_503_once_draining(admin: Call, backend: FakeGateway) -> None:
    backend.is_live = False
    answer = await admin("GET", "/healthz")
    assert (answer.status, answer.json()) == (503, {"status": "draining"})


async def test_readyz_follows_the_gateway(admin: Call, backend: FakeGateway) -> None:
    answer = await admin("GET", "/readyz")
    assert (answer.status, answer.json()) == (200, {"status": "ready"})

    backend.is_ready = False
    answer = await admin("GET", "/readyz")
    assert (answer.status, answer.json()) == (503, {"status": "not ready"})


async def test_metrics_passes_the_exposition_through(admin_without_token: Call) -> None:
    answer = await admin_without_token("GET", "/metrics")
    assert answer.status == 200
    assert answer.body == b"checkstream_requests_total 3.0\n"
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


async def test_tenant_info_is_proxied_without_admin_token(
    admin_without_token: Call, backend: FakeGateway
) -> None:
    answer = await admin_without_token(
        "GET", "/admin/tenant-info?verbose=1", {"x-tenant-id": "acme", "authorization": "Bearer k"}
    )

    assert answer.status == 200
    assert answer.json() == {"tenant": "acme"}
    assert answer.headers["x-checkstream-tenant"] == "acme"
    assert answer.headers["content-length"] == str(len(b'{"tenant": "acme"}'))
    assert "transfer-encoding" not in answer.headers
    [(headers, path_qs)] = backend.tenant_info_calls
    assert path_qs == "/admin/tenant-info?verbose=1"
    assert headers["x-tenant-id"] == "acme"
    assert headers["authorization"] == "Bearer k"


async def test_reload_reports_the_new_version(admin: Call) -> None:
    answer = await admin("POST", "/admin/reload", AUTH)
    assert (answer.status, answer.json()) == (200, {"status": "reloaded", "version": "v2"})


async def test_refused_reload_names_the_error_and_the_version_still_serving(
    admin: Call, backend: FakeGateway
) -> None:
    error = "checkstream.yaml:12: tenants.configs.acme.rate_limit: expected a positive integer"
    backend.reload_outcome = ReloadOutcome(False, "v1", error)

    answer = await admin("POST", "/admin/reload", AUTH)

    assert answer.status == 400
    assert answer.json() == {"status": "refused", "error": error, "version": "v1"}


async def test_suspend_and_resume_a_tenant(admin: Call, backend: FakeGateway) -> None:
    answer = await admin("POST", "/admin/tenants/acme/suspend", AUTH)
    assert (answer.status, answer.json()) == (200, {"tenant": "acme", "suspended": True})
    assert backend.suspended == {"acme"}

    answer = await admin("POST", "/admin/tenants/acme/resume", AUTH)
    assert (answer.status, answer.json()) == (200, {"tenant": "acme", "suspended": False})
    assert backend.suspended == set()


@pytest.mark.parametrize(
    "refusal",
    [
        SuspensionOutcome(409, "checkstream.yaml:7: tenants.configs.acme.suspended: the config"),
        SuspensionOutcome(503, "suspensions are kept in Redis (limits.url), which cannot be"),
    ],
)
async def test_a_refused_suspension_keeps_its_status_and_says_why(
    admin: Call, backend: FakeGateway, refusal: SuspensionOutcome
) -> None:
    backend.refusal = refusal
    answer = await admin("POST", "/admin/tenants/acme/resume", AUTH)
    assert (answer.status, answer.json()) == (refusal.status, {"error": refusal.error})


async def test_status_needs_the_token_and_answers_the_backends_status(admin: Call) -> None:
    assert (await admin("GET", "/admin/status")).status == 401
    answer = await admin("GET", "/admin/status", AUTH)
    assert (answer.status, answer.json()["config_version"]) == (200, "v1")


async def test_suspending_an_unknown_tenant_is_404(admin: Call) -> None:
    for action in ("suspend", "resume"):
        answer = await admin("POST", f"/admin/tenants/nobody/{action}", AUTH)
        assert answer.status == 404
        assert "unknown tenant" in answer.json()["error"]


@pytest.mark.parametrize(
    "path", ["/admin/reload", "/admin/tenants/acme/suspend", "/admin/tenants/acme/resume"]
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-checkstream-admin-token": ""},
        {"x-checkstream-admin-token": "not-the-token"},
        {"x-checkstream-admin-token": TOKEN + "x"},
        {"x-checkstream-admin-token": TOKEN[:-1]},
        {"x-checkstream-admin-token": TOKEN.upper()},
    ],
)
async def test_guarded_endpoints_refuse_a_missing_or_wrong_token(
    admin: Call, backend: FakeGateway, path: str, headers: dict[str, str]
) -> None:
    answer = await admin("POST", path, headers)

    assert answer.status == 401
    assert "x-checkstream-admin-token" in answer.json()["error"]
    assert TOKEN.encode() not in answer.body
    sent = headers.get("x-checkstream-admin-token")
    assert not sent or sent.encode() not in answer.body
    assert backend.suspended == set()


async def test_a_non_ascii_token_is_refused_not_crashed(admin: Call) -> None:
    answer = await admin("POST", "/admin/reload", {"x-checkstream-admin-token": "tökén☃"})
    assert answer.status == 401


@pytest.mark.parametrize(
    "path", ["/admin/reload", "/admin/tenants/acme/suspend", "/admin/tenants/acme/resume"]
)
async def test_guarded_endpoints_are_off_without_a_configured_token(
    admin_without_token: Call, backend: FakeGateway, path: str
) -> None:
    for headers in ({}, {"x-checkstream-admin-token": ""}, AUTH):
        answer = await admin_without_token("POST", path, headers)
        assert answer.status == 403
        assert answer.json() == {
            "error": "admin endpoints are disabled: set CHECKSTREAM_ADMIN_TOKEN"
        }
    assert backend.suspended == set()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/reload"),
        ("POST", "/healthz"),
        ("DELETE", "/metrics"),
        ("GET", "/admin/tenants/acme/suspend"),
        ("POST", "/admin/tenant-info"),
    ],
)
async def test_wrong_method_is_405_json(admin: Call, method: str, path: str) -> None:
    answer = await admin(method, path)
    assert answer.status == 405
    assert answer.json() == {"error": "method not allowed"}
    assert "allow" in answer.headers


@pytest.mark.parametrize(
    "path", ["/", "/nope", "/admin", "/admin/nope", "/admin/tenants/acme", "/healthz/x"]
)
async def test_unknown_path_is_404_json(admin: Call, path: str) -> None:
    for headers in ({}, AUTH):
        answer = await admin("GET", path, headers)
        assert answer.status == 404
        assert answer.json() == {"error": "not found"}


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/readyz", {}),
        ("GET", "/metrics", {}),
        ("GET", "/admin/tenant-info", {}),
        ("POST", "/admin/reload", AUTH),
        ("POST", "/admin/tenants/acme/suspend", AUTH),
    ],
)
async def test_backend_failure_is_a_bare_500_and_logged(
    admin: Call,
    backend: FakeGateway,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    headers: dict[str, str],
) -> None:
    backend.fail = True

    with caplog.at_level(logging.ERROR, logger="checkstream.admin"):
        answer = await admin(method, path, headers)

    assert answer.status == 500
    assert answer.json() == {"error": "internal error"}
    assert b"Traceback" not in answer.body
    assert b"hunter2" not in answer.body
    assert b"BackendFailure" not in answer.body
    [record] = [r for r in caplog.records if r.name == "checkstream.admin"]
    assert record.exc_info is not None and record.exc_info[0] is BackendFailure


async def test_healthz_stays_up_when_the_backend_fails(admin: Call, backend: FakeGateway) -> None:
    backend.fail = True
    answer = await admin("GET", "/healthz")
    assert answer.status == 200


async def test_stop_closes_the_port(backend: FakeGateway) -> None:
    stop, call, session = await serve(backend, TOKEN)
    assert (await call("GET", "/healthz")).status == 200

    await stop()

    with pytest.raises(aiohttp.ClientConnectionError):
        await call("GET", "/healthz")
    await session.close()


def test_admin_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert admin_token_from_env() is None
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "")
    assert admin_token_from_env() is None
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    assert admin_token_from_env() == TOKEN
