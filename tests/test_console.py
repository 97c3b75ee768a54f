"""The operator console over real HTTP on 127.0.0.1: the admin server with a gateway stand-in
that holds a real loaded config, real metrics, a real SQLite ledger, real audit trails and
the real suspension rules (``record_suspension``). The browser tests (test_e2e_console.py)
drive the real gateway."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric

from checkstream.accounting.suspensions import SuspensionOutcome, record_suspension
from checkstream.audit.trail import AuditLog, resolve_audit_dirs
from checkstream.config.model import LoadedConfig, load_config
from checkstream.console import CONSOLE_KEY
from checkstream.console.collector import Collector
from checkstream.console.sessions import SessionStore, SignInThrottle
from checkstream.console.source import ConsoleSource
from checkstream.console.views import SESSION_COOKIE, SIGNIN_COOKIE
from checkstream.ledger.usage import UsageLedger, UsageRecord, resolve_usage_path
from checkstream.limits.base import Limiter
from checkstream.limits.memory import MemoryLimiter
from checkstream.ops.admin import build_admin_app
from checkstream.ops.metrics import LATENCY_BUCKETS_MS
from tests.console_gateway import (
    ADMIN_TOKEN,
    SECRET_HEADER_VALUE,
    UPSTREAM_SECRET,
    console_config,
)
from tests.support import free_port

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class StandInGateway:
    """Implements ConsoleSource over real parts; only the worker processes are missing."""

    loaded: LoadedConfig
    suspensions: set[str] = field(default_factory=set)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    limiter: Limiter = field(default_factory=MemoryLimiter)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "checkstream_requests_total", "", ["tenant", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "checkstream_latency_ms",
            "",
            ["tenant", "phase"],
            buckets=LATENCY_BUCKETS_MS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "checkstream_tokens_total", "", ["tenant", "model", "direction"], registry=self.registry
        )

    def console_config(self) -> LoadedConfig:
        return self.loaded

    def local_suspensions(self) -> frozenset[str]:
        return frozenset(self.suspensions)

    def metric_families(self) -> list[Metric]:
        return list(self.registry.collect())

    def own_limiter(self) -> Limiter | None:
        return self.limiter

    async def set_suspended(self, tenant: str, suspended: bool) -> SuspensionOutcome:
        return await record_suspension(self.loaded, tenant, suspended, self.suspensions)

    async def status(self) -> dict[str, Any]:
        return {"status": "ready", "config_version": "v-test", "replica": "test-replica"}

    # admin.AdminBackend, unused by these tests
    def ready(self) -> bool:
        return True

    def metrics(self) -> tuple[bytes, str]:
        return b"", "text/plain"

    async def reload(self) -> Any:
        raise NotImplementedError

    async def tenant_info(self, headers: Any, path_qs: str) -> Any:
        raise NotImplementedError


def _loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: int = 0) -> LoadedConfig:
    monkeypatch.setenv("CONSOLE_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
    return load_config(console_config(tmp_path, free_port(), extra_tenants=extra))


@dataclass
class Console:
    url: str
    gateway: StandInGateway
    http: aiohttp.ClientSession
    app: web.Application

    async def get(self, path: str, **kw: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.get(self.url + path, allow_redirects=False, **kw) as r:
            return r.status, await r.text(), r

    async def post(
        self, path: str, data: dict[str, str], **kw: Any
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.post(self.url + path, data=data, allow_redirects=False, **kw) as r:
            return r.status, await r.text(), r

    async def sign_in(self, token: str = ADMIN_TOKEN) -> aiohttp.ClientResponse:
        _, page, _ = await self.get("/ui/sign-in")
        csrf = CSRF.search(page)
        assert csrf is not None
        _, _, response = await self.post("/ui/sign-in", {"csrf": csrf.group(1), "token": token})
        return response

    async def csrf(self, path: str = "/ui/") -> str:
        _, page, _ = await self.get(path)
        found = CSRF.search(page)
        assert found is not None, page[:500]
        return found.group(1)


Start = Callable[..., Awaitable[Console]]


@pytest.fixture
async def start_console() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(gateway: StandInGateway, token: str | None = ADMIN_TOKEN) -> Console:
        port = free_port()
        app = build_admin_app(gateway, token)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        # unsafe: keep cookies for an IP address host (127.0.0.1)
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        sessions.append(http)
        return Console(f"http://127.0.0.1:{port}", gateway, http, app)

    yield start
    for http in sessions:
        await http.close()
    for runner in runners:
        await runner.cleanup()


def test_the_admin_app_offers_the_console_to_a_console_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(StandInGateway(_loaded(tmp_path, monkeypatch)), ConsoleSource)


async def test_without_the_admin_token_the_console_is_disabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    console = await start_console(StandInGateway(_loaded(tmp_path, monkeypatch)), token=None)
    for path in ("/ui/", "/ui/sign-in", "/ui/tenants/acme-corp"):
        status, body, _ = await console.get(path)
        assert status == 403, path
        assert "CHECKSTREAM_ADMIN_TOKEN" in body
    status, _, _ = await console.post("/ui/sign-in", {"csrf": "x", "token": ADMIN_TOKEN})
    assert status == 403


async def test_signed_out_pages_redirect_to_sign_in_and_posts_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    gateway = StandInGateway(_loaded(tmp_path, monkeypatch))
    console = await start_console(gateway)
    for path in ("/ui/", "/ui/tenants/acme-corp", "/ui/tenants/acme-corp/usage.csv"):
        status, _, response = await console.get(path)
        assert status == 303, path
        assert response.headers["Location"] == "/ui/sign-in"
    status, _, _ = await console.post("/ui/tenants/globex/suspend", {"csrf": "anything"})
    assert status == 403
    assert gateway.suspensions == set()


async def test_sign_in_sets_a_strict_http_only_expiring_cookie(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    console = await start_console(StandInGateway(_loaded(tmp_path, monkeypatch)))
    response = await console.sign_in()
    assert response.status == 303
    assert response.headers["Location"] == "/ui/"
    cookie = response.cookies[SESSION_COOKIE]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/ui/"
    assert int(cookie["max-age"]) == int(SessionStore().ttl_s)
    assert not cookie["secure"]  # plain HTTP here
    status, body, _ = await console.get("/ui/")
    assert status == 200
    assert "acme-corp" in body


async def test_behind_tls_the_cookie_is_secure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    console = await start_console(StandInGateway(_loaded(tmp_path, monkeypatch)))
    tls = {"X-Forwarded-Proto": "https"}
    _, page, form = await console.get("/ui/sign-in", headers=tls)
    csrf = CSRF.search(page)
    assert csrf is not None
    signin_cookie = form.cookies[SIGNIN_COOKIE]
    assert signin_cookie["secure"] is True
    # The client's jar keeps Secure cookies for https only: send it by hand over loopback.
    _, _, response = await console.post(
        "/ui/sign-in",
        {"csrf": csrf.group(1), "token": ADMIN_TOKEN},
        headers={**tls, "Cookie": f"{SIGNIN_COOKIE}={signin_cookie.value}"},
    )
    assert response.status == 303
    assert response.cookies[SESSION_COOKIE]["secure"] is True


async def test_every_page_has_a_strict_csp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    console = await start_console(StandInGateway(_loaded(tmp_path, monkeypatch)))
    _, _, signin = await console.get("/ui/sign-in")
    await console.sign_in()
    for response in [signin] + [
        (await console.get(path))[2]
        for path in ("/ui/", "/ui/tenants/acme-corp", "/ui/tenants/acme-corp/usage.csv")
    ]:
        csp = response.headers["Content-Security-Policy"]
        assert csp.startswith("default-src 'self'")
        assert "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    _, body, _ = await console.get("/ui/")
    # Nothing from elsewhere, nothing inline that the CSP would block.
    assert "http://" not in body and "https://" not in body
    assert "<style" not in body and " style=" not in body and "<script>" not in body


async def test_wrong_tokens_are_refused_then_throttled(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    start_console: Start,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "checkstream.console")
    console = await start_console(StandInGateway(_loaded(tmp_path, monkeypatch)))
    limit = SignInThrottle().per_client
    for _ in range(limit):
        response = await console.sign_in("not-the-token")
        assert response.status == 401
        assert SESSION_COOKIE not in response.cookies
    # Now even the right token waits: a guesser cannot tell a hit from a throttled miss.
    response = await console.sign_in(ADMIN_TOKEN)
    assert response.status == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert SESSION_COOKIE not in response.cookies
    # Logged, without the tokens tried.
    assert caplog.text.count("console_sign_in_refused") == limit
    assert "console_sign_in_throttled" in caplog.text
    assert "not-the-token" not in caplog.text and ADMIN_TOKEN not in caplog.text


def test_the_throttle_forgets_after_its_window() -> None:
    throttle = SignInThrottle(per_client=2, total=3, window_s=60)
    throttle.failed("a", 0)
    throttle.failed("a", 10)
    assert throttle.retry_after("a", 11) == pytest.approx(49)
    assert throttle.retry_after("b", 11) is None
    throttle.failed("b", 12)  # three in all: everyone waits
    assert throttle.retry_after("c", 13) == pytest.approx(47)
    assert throttle.retry_after("a", 61) is None


def test_sessions_expire_and_end() -> None:
    store = SessionStore(ttl_s=100, limit=2)
    first = store.create(0)
    assert store.get(first.id, 99) == first
    assert store.get(first.id, 100) is None
    second, third, fourth = store.create(0), store.create(1), store.create(2)
    assert store.get(second.id, 3) is None  # evicted: at most `limit` sessions
    store.end(third.id)
    assert store.get(third.id, 3) is None
    assert store.get(fourth.id, 3) == fourth
    assert not fourth.csrf_ok(None) and not fourth.csrf_ok("x") and fourth.csrf_ok(fourth.csrf)


async def test_a_sign_in_without_its_form_token_or_from_elsewhere_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    console = await start_console(StandInGateway(_loaded(tmp_path, monkeypatch)))
    status, _, response = await console.post("/ui/sign-in", {"token": ADMIN_TOKEN})
    assert status == 403 and SESSION_COOKIE not in response.cookies
    csrf = await console.csrf("/ui/sign-in")
    status, _, response = await console.post(
        "/ui/sign-in",
        {"csrf": csrf, "token": ADMIN_TOKEN},
        headers={"Origin": "http://evil.example"},
    )
    assert status == 403 and SESSION_COOKIE not in response.cookies


async def test_suspend_and_resume_need_the_session_csrf_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    gateway = StandInGateway(_loaded(tmp_path, monkeypatch))
    console = await start_console(gateway)
    await console.sign_in()
    status, _, _ = await console.post("/ui/tenants/globex/suspend", {"csrf": "forged"})
    assert status == 403
    status, _, _ = await console.post("/ui/tenants/globex/suspend", {})
    assert status == 403
    csrf = await console.csrf("/ui/tenants/globex")
    status, _, _ = await console.post(
        "/ui/tenants/globex/suspend", {"csrf": csrf}, headers={"Origin": "http://evil.example"}
    )
    assert status == 403
    assert gateway.suspensions == set()

    status, _, response = await console.post("/ui/tenants/globex/suspend", {"csrf": csrf})
    assert status == 303
    assert response.headers["Location"] == "/ui/tenants/globex?done=suspended"
    assert gateway.suspensions == {"globex"}
    _, page, _ = await console.get("/ui/tenants/globex")
    assert "suspended (admin)" in page and 'id="resume"' in page
    status, _, _ = await console.post("/ui/tenants/globex/resume", {"csrf": csrf})
    assert status == 303
    assert gateway.suspensions == set()


async def test_a_config_suspension_cannot_be_lifted_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    gateway = StandInGateway(_loaded(tmp_path, monkeypatch))
    console = await start_console(gateway)
    await console.sign_in()
    csrf = await console.csrf("/ui/tenants/frozen")
    _, page, _ = await console.get("/ui/tenants/frozen")
    assert 'id="resume"' not in page and 'id="suspend"' not in page
    status, page, _ = await console.post("/ui/tenants/frozen/resume", {"csrf": csrf})
    assert status == 409
    assert "suspended" in page and "set it to false there and reload" in page
    status, _, _ = await console.post("/ui/tenants/nobody/suspend", {"csrf": csrf})
    assert status == 404


async def test_sign_out_ends_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    console = await start_console(StandInGateway(_loaded(tmp_path, monkeypatch)))
    await console.sign_in()
    session = next(c.value for c in console.http.cookie_jar if c.key == SESSION_COOKIE)
    csrf = await console.csrf()
    status, _, response = await console.post("/ui/sign-out", {"csrf": csrf})
    assert status == 303 and response.headers["Location"] == "/ui/sign-in"
    status, _, _ = await console.get("/ui/")
    assert status == 303
    # The old cookie, replayed, is dead on the server too.
    replay = {"Cookie": f"{SESSION_COOKIE}={session}"}
    async with (
        aiohttp.ClientSession() as other,
        other.get(console.url + "/ui/", headers=replay, allow_redirects=False) as r,
    ):
        assert r.status == 303


async def test_the_overview_lists_all_1000_tenants(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    loaded = _loaded(tmp_path, monkeypatch, extra=1000)
    console = await start_console(StandInGateway(loaded))
    await console.sign_in()
    status, body, _ = await console.get("/ui/")
    assert status == 200
    listed = re.findall(r'<tr data-tenant="([^"]+)"', body)
    assert sorted(listed) == sorted(loaded.model.tenants.configs)
    assert len(listed) == 1006
    _, body, _ = await console.get("/ui/?sort=tenant&order=desc&q=tenant-09")
    listed = re.findall(r'<tr data-tenant="([^"]+)"', body)
    assert listed == [f"tenant-{i:04d}" for i in range(999, 899, -1)]


def _record(tenant: str, model: str, tokens: tuple[int, int], cost: float, at: float) -> Any:
    request_id = f"r-{tenant}-{at}-{model}"
    return UsageRecord(at, request_id, tenant, model, *tokens, False, 200, 5.0, cost)


async def test_the_overview_shows_traffic_health_spend_headroom_and_triggers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    loaded = _loaded(tmp_path, monkeypatch)
    gateway = StandInGateway(loaded)
    now = time.time()
    ledger = UsageLedger.open(resolve_usage_path(loaded))
    await ledger.record(_record("acme-corp", "gpt-4o-mini", (1000, 3000), 2.5, now))
    await ledger.record(_record("acme-corp", "gpt-4o", (500, 500), 1.5, now))
    await ledger.record(_record("globex", "gpt-4o-mini", (10, 10), 0.001, now - 40 * 86400))
    await ledger.aclose()
    audit = AuditLog({t: d for t, (d, _) in resolve_audit_dirs(loaded).items()})
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    trigger = {"time": iso, "type": "trigger", "tenant": "acme-corp", "phase": "ingress",
               "rule": "no_falcon", "action": "block", "classifier": "kw_falcon",
               "score": 1.0, "regulation": "EU AI Act Art. 12", "request_id": "req-1",
               "excerpt": "PROMPT TEXT MUST NOT SHOW"}  # fmt: skip
    await audit.append("acme-corp", [trigger, {**trigger, "request_id": "req-2"}])
    await audit.aclose()
    console = await start_console(gateway)
    collector = _collector(console)
    await collector.first(10)  # the baseline sample, before the traffic below
    # Traffic: globex has 5xx answers and slow checks; acme-corp is fine.
    for _ in range(40):
        gateway.requests.labels("acme-corp", "200").inc()
        gateway.latency.labels("acme-corp", "ingress").observe(2.0)
        gateway.latency.labels("acme-corp", "total").observe(40.0)
    for status in ("200",) * 8 + ("502",) * 2:
        gateway.requests.labels("globex", status).inc()
        gateway.latency.labels("globex", "ingress").observe(20.0)
    for _ in range(100):
        gateway.requests.labels("initech", "200").inc()
        gateway.latency.labels("initech", "ingress").observe(400.0)
    await console.sign_in()
    await collector.refresh()  # a second sample: the window now holds the traffic above
    _, body, _ = await console.get("/ui/")
    rows = _rows(body)
    assert rows["acme-corp"]["health"] == "healthy"
    assert rows["globex"]["health"] == "critical"  # 20% errors
    assert rows["initech"]["health"] == "degraded"  # check p95 400 ms
    assert rows["hooli"]["health"] == "idle"
    assert rows["globex"]["errors"] == "20%"
    assert rows["acme-corp"]["spend"] == "$4.00"
    assert rows["acme-corp"]["tokens"] == "5.0k"
    assert rows["globex"]["spend"] == "$0.00"  # last month's row is not this month's
    assert rows["acme-corp"]["budget"].startswith("80%")  # $4 of $5
    assert rows["acme-corp"]["triggers"] == "2"
    assert rows["globex"]["triggers"] == "—"  # no audit trail
    assert rows["frozen"]["status"] == "suspended (config)"
    assert rows["globex"]["headroom"] == "100% requests/min"  # the limiter's: nothing taken
    assert "5 healthy" not in body and "1 critical" in body

    _, page, _ = await console.get("/ui/tenants/acme-corp")
    assert "no_falcon" in page and "EU AI Act Art. 12" in page and "req-2" in page
    assert "PROMPT TEXT MUST NOT SHOW" not in page  # include_content is off
    assert "<svg" in page and "gpt-4o-mini" in page
    assert UPSTREAM_SECRET not in page and SECRET_HEADER_VALUE not in page
    assert "CONSOLE_TEST_UPSTREAM_KEY" in page and "x-team-secret" in page

    status, csv, response = await console.get("/ui/tenants/acme-corp/usage.csv")
    assert status == 200 and response.headers["Content-Type"].startswith("text/csv")
    lines = csv.splitlines()
    assert lines[0].startswith("tenant,model,requests,input_tokens,output_tokens")
    assert sorted(line.split(",")[1] for line in lines[1:]) == ["gpt-4o", "gpt-4o-mini"]
    status, _, _ = await console.get("/ui/tenants/acme-corp/usage.csv?period=2026-13")
    assert status == 400


async def test_a_tenant_with_audit_excerpts_shows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_console: Start
) -> None:
    config = console_config(tmp_path, free_port())
    config.write_text(config.read_text().replace("include_content: false", "include_content: true"))
    monkeypatch.setenv("CONSOLE_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
    loaded = load_config(config)
    audit = AuditLog({t: d for t, (d, _) in resolve_audit_dirs(loaded).items()})
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    await audit.append("acme-corp", [{"time": iso, "type": "trigger", "rule": "no_falcon",
                                      "excerpt": "about [REDACTED] falcon"}])  # fmt: skip
    await audit.aclose()
    console = await start_console(StandInGateway(loaded))
    await console.sign_in()
    _, page, _ = await console.get("/ui/tenants/acme-corp")
    assert "about [REDACTED] falcon" in page


def _collector(console: Console) -> Collector:
    """The running console's collector (to take a sample now instead of in 10 s)."""
    return console.app[CONSOLE_KEY].collector


_CELL = re.compile(r"<td[^>]*>(.*?)</td>", re.S)
_TAG = re.compile(r"<[^>]+>")
_COLUMNS = ("tenant", "status", "health", "rpm", "errors", "p95", "tokens", "spend", "budget",
            "headroom", "triggers", "version")  # fmt: skip


def _rows(body: str) -> dict[str, dict[str, str]]:
    rows = {}
    for match in re.finditer(r'<tr data-tenant="([^"]+)">(.*?)</tr>', body, re.S):
        cells = [" ".join(_TAG.sub(" ", c).split()) for c in _CELL.findall(match.group(2))]
        rows[match.group(1)] = dict(zip(_COLUMNS, cells, strict=True))
    return rows
