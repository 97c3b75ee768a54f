"""The console's pages and actions (aiohttp handlers), served under ``/ui/``.

Run by the admin server. Every answer carries a strict CSP (``default-src 'self'``), no
caching and no framing. Access:

- ``CHECKSTREAM_ADMIN_TOKEN`` unset: every page answers 403, like the admin API;
- signed out: pages redirect to the sign-in form; any POST but sign-in answers 403;
- sign-in exchanges the admin token for a session cookie (``HttpOnly``, ``SameSite=Strict``,
  ``Secure`` when the request came over TLS, ``Max-Age`` = the session's life); wrong tokens
  are throttled per client address and in total (429 with ``Retry-After``);
- every POST carries the session's CSRF token (sign-in: a double-submit cookie) and, when
  the browser sends ``Origin``, must come from this console's own origin.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import jinja2
from aiohttp import web
from markupsafe import Markup

from checkstream.accounting.suspensions import SuspensionStoreUnavailable
from checkstream.config.model import LoadedConfig, TenantConfig
from checkstream.console.charts import DayTokens, ModelTokens, compact, usage_by_day, usage_by_model
from checkstream.console.collector import Collector
from checkstream.console.overview import (
    SORT_KEYS,
    TenantVersions,
    build_rows,
    sort_rows,
    totals,
)
from checkstream.console.sessions import Session, SessionStore, SignInThrottle
from checkstream.console.source import ConsoleSource
from checkstream.console.usage_source import usage_source
from checkstream.ledger.usage import UsageError, check_period, period_of, render
from checkstream.ops import logs

log = logs.get("checkstream.console")

PREFIX: Final = "/ui/"
SESSION_COOKIE: Final = "checkstream_console"
SIGNIN_COOKIE: Final = "checkstream_console_signin"
CHART_DAYS: Final = 30
# Long enough for the first refresh on a big ledger, short enough that a page never hangs.
_FIRST_REFRESH_WAIT_S: Final = 2.0
_CSP: Final = (
    "default-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: with it browsers send "Origin: null" on form posts, which same_origin
    # must refuse.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_STATIC_TYPES: Final = {".css": "text/css", ".js": "text/javascript"}
COLUMNS: Final = (
    ("tenant", "Tenant"),
    ("status", "Status"),
    ("health", "Health"),
    ("rpm", "Req/min"),
    ("errors", "Errors"),
    ("p95", "p95"),
    ("tokens", "Tokens today"),
    ("spend", "Spend (month)"),
    ("budget", "Budget"),
    ("headroom", "Rate-limit headroom"),
    ("triggers", "Triggers 24 h"),
    ("version", "Config"),
)


def _number(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _percent(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.1f}%" if value < 0.1 else f"{value * 100:.0f}%"


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 1000:
        return f"{value / 1000:.1f} s"
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def _usd(value: float | None) -> str:
    if value is None:
        return "—"
    # A cent hides a busy day of a cheap model: small amounts keep four decimals.
    return f"${value:.4f}" if 0 < value < 0.01 else f"${value:,.2f}"


_LIMIT_NAMES: Final = {
    "requests_per_minute": "requests/min",
    "tokens_per_minute": "tokens/min",
    "max_concurrent_requests": "concurrent",
}


def _limit(name: str) -> str:
    return _LIMIT_NAMES.get(name, name)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("checkstream.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        number=_number, percent=_percent, ms=_ms, usd=_usd, compact=compact, limit=_limit
    )
    return env


@dataclass
class Console:
    source: ConsoleSource
    token: str | None
    collector: Collector
    sessions: SessionStore = field(default_factory=SessionStore)
    throttle: SignInThrottle = field(default_factory=SignInThrottle)
    clock: Callable[[], float] = time.time
    versions: TenantVersions = field(default_factory=TenantVersions)
    templates: jinja2.Environment = field(default_factory=_environment)
    static: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        folder = resources.files("checkstream.console") / "static"
        for entry in folder.iterdir():
            if Path(entry.name).suffix in _STATIC_TYPES:
                self.static[entry.name] = entry.read_bytes()
        self._static_tag = secrets.token_hex(4)  # a new URL per start: no stale cached CSS

    # -- plumbing ----------------------------------------------------------------------------
    def page(
        self, request: web.Request, name: str, status: int = 200, **values: Any
    ) -> web.Response:
        session = values.pop("session", None)
        body = self.templates.get_template(name).render(
            base=PREFIX,
            static=lambda f: f"{PREFIX}static/{f}?v={self._static_tag}",
            session=session,
            replica=values.pop("replica", ""),
            config_version=values.pop("config_version", ""),
            problems=values.pop("problems", ()),
            **values,
        )
        return _secured(web.Response(text=body, status=status, content_type="text/html"))

    def message(self, request: web.Request, status: int, heading: str, text: str) -> web.Response:
        return self.page(request, "message.html", status, heading=heading, message=text)

    def session_of(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE), self.clock())

    async def _status(self) -> tuple[str, str]:
        status = await self.source.status()
        return str(status.get("replica", "")), str(status.get("config_version", ""))

    # -- pages -------------------------------------------------------------------------------
    async def sign_in_form(self, request: web.Request) -> web.StreamResponse:
        if self.session_of(request) is not None:
            return see_other(PREFIX)
        return self._sign_in_page(request, None, 200)

    def _sign_in_page(self, request: web.Request, error: str | None, status: int) -> web.Response:
        csrf = secrets.token_urlsafe(32)
        response = self.page(request, "signin.html", status, csrf=csrf, error=error)
        _set_cookie(request, response, SIGNIN_COOKIE, csrf, max_age=3600)
        return response

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        csrf = form.get("csrf")
        expected = request.cookies.get(SIGNIN_COOKIE)
        if not (isinstance(csrf, str) and expected and _same(csrf, expected)):
            return self.message(request, 403, "Refused", "The sign-in form expired: reload it.")
        client = request.remote or "unknown"
        now = self.clock()
        wait = self.throttle.retry_after(client, now)
        if wait is not None:
            log.warning("console_sign_in_throttled", client=client)
            response = self._sign_in_page(request, "Too many wrong tokens: wait a minute.", 429)
            response.headers["Retry-After"] = str(max(1, int(wait + 0.999)))
            return response
        given = form.get("token")
        assert self.token is not None  # the guard answered 403 otherwise
        if not (isinstance(given, str) and _same(given, self.token)):
            self.throttle.failed(client, now)
            # Never the token tried: it may be a real token of something else, mistyped.
            log.warning("console_sign_in_refused", client=client)
            return self._sign_in_page(request, "Wrong token.", 401)
        log.info("console_signed_in", client=client)
        session = self.sessions.create(now)
        response = see_other(PREFIX)
        _set_cookie(request, response, SESSION_COOKIE, session.id, max_age=self.sessions.ttl_s)
        response.del_cookie(SIGNIN_COOKIE, path=PREFIX)
        return response

    async def sign_out(self, request: web.Request, session: Session) -> web.StreamResponse:
        self.sessions.end(session.id)
        response = see_other(PREFIX + "sign-in")
        response.del_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    async def overview(self, request: web.Request, session: Session) -> web.StreamResponse:
        await self.collector.first(_FIRST_REFRESH_WAIT_S)
        loaded = self.source.console_config()
        admin, problems = await self._admin_suspensions()
        data = self.collector.latest
        rows = build_rows(loaded, admin, data, self.versions.of(loaded))
        fleet = totals(rows, data.traffic)
        query = request.query.get("q", "").strip()
        if query:
            rows = [row for row in rows if query.lower() in row.id.lower()]
        sort = request.query.get("sort", "tenant")
        sort = sort if sort in SORT_KEYS else "tenant"
        order = "desc" if request.query.get("order") == "desc" else "asc"
        replica, version = await self._status()
        scope = (
            f"fleet of {data.replicas} replicas (Redis)"
            if data.replicas > 1
            else f"replica {replica}"
        )
        return self.page(
            request,
            "overview.html",
            session=session,
            replica=replica,
            config_version=version,
            problems=(*data.problems, *problems),
            rows=sort_rows(rows, sort, order == "desc"),
            totals=fleet,
            columns=COLUMNS,
            sort=sort,
            order=order,
            query=query,
            scope=scope,
            age=_age(self.clock() - data.at) if data.at else "never",
        )

    async def tenant(
        self,
        request: web.Request,
        session: Session,
        *,
        status: int = 200,
        error: str | None = None,
    ) -> web.StreamResponse:
        tenant = request.match_info["tenant"]
        loaded = self.source.console_config()
        config = loaded.model.tenants.configs.get(tenant)
        if config is None:
            return self.message(request, 404, "Unknown tenant", f"No tenant {tenant!r}.")
        await self.collector.first(_FIRST_REFRESH_WAIT_S)
        admin, problems = await self._admin_suspensions()
        data = self.collector.latest
        (row,) = build_rows(loaded, admin, data, self.versions.of(loaded), only=tenant)
        now = self.clock()
        period = period_of(now)
        by_day, by_model, usage_problem = await self._usage_charts(loaded, tenant, now)
        if usage_problem:
            problems.append(usage_problem)
        stats = data.traffic.get(tenant)
        policy = loaded.policies.get(tenant)
        notice = {"suspended": "Suspended.", "resumed": "Resumed."}.get(
            request.query.get("done", "")
        )
        replica, version = await self._status()
        audit = config.audit
        return self.page(
            request,
            "tenant.html",
            status,
            session=session,
            replica=replica,
            config_version=version,
            problems=(*data.problems, *problems),
            row=row,
            check_p95=stats.p95_check_ms if stats else None,
            period=period,
            days=CHART_DAYS,
            by_day=by_day,
            by_model=by_model,
            triggers=data.recent_triggers.get(tenant),
            show_excerpts=bool(audit and audit.enabled and audit.include_content),
            config=describe(tenant, config),
            rules=policy.model.policies if policy is not None else [],
            notice=notice,
            error=error,
        )

    async def set_suspended(
        self, request: web.Request, session: Session, suspended: bool
    ) -> web.StreamResponse:
        tenant = request.match_info["tenant"]
        outcome = await self.source.set_suspended(tenant, suspended)
        if outcome.status == 200:
            done = "suspended" if suspended else "resumed"
            return see_other(f"{PREFIX}tenants/{tenant}?done={done}")
        if outcome.status == 404:
            return self.message(request, 404, "Unknown tenant", outcome.error or "")
        return await self.tenant(request, session, status=outcome.status, error=outcome.error)

    async def usage_csv(self, request: web.Request, session: Session) -> web.StreamResponse:
        tenant = request.match_info["tenant"]
        loaded = self.source.console_config()
        if tenant not in loaded.model.tenants.configs:
            return self.message(request, 404, "Unknown tenant", f"No tenant {tenant!r}.")
        period = request.query.get("period") or period_of(self.clock())
        source = usage_source(loaded)
        try:
            check_period(period)
            rows = (
                []
                if source is None
                else await asyncio.to_thread(source.month, period, tenant=tenant, by_model=True)
            )
        except UsageError as exc:
            return self.message(request, 400, "No export", str(exc))
        response = web.Response(text=render(rows, "csv"), content_type="text/csv")
        response.headers["Content-Disposition"] = (
            f'attachment; filename="{tenant}-usage-{period}.csv"'
        )
        return _secured(response)

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = self.static.get(name)
        if body is None:
            return self.message(request, 404, "Not found", "No such file.")
        response = web.Response(body=body, content_type=_STATIC_TYPES[Path(name).suffix])
        _secured(response)
        # Versioned URLs (?v=): a browser may keep them for the life of this process.
        response.headers["Cache-Control"] = "private, max-age=86400"
        return response

    # -- data helpers ------------------------------------------------------------------------
    async def _admin_suspensions(self) -> tuple[frozenset[str], list[str]]:
        try:
            return await self.collector.admin_suspensions(), []
        except SuspensionStoreUnavailable as exc:
            return frozenset(), [f"admin suspensions unknown: Redis cannot be reached ({exc})"]

    async def _usage_charts(
        self, loaded: LoadedConfig, tenant: str, now: float
    ) -> tuple[Markup, Markup, str | None]:
        today = datetime.fromtimestamp(now, UTC).date()
        first = today - timedelta(days=CHART_DAYS - 1)
        source = usage_source(loaded)
        problem = None
        day_rows: list[Any] = []
        month_rows: list[Any] = []
        if source is not None:
            try:
                day_rows = await asyncio.to_thread(source.days, first, tenant=tenant)
                month_rows = await asyncio.to_thread(
                    source.month, period_of(now), tenant=tenant, by_model=True
                )
            except UsageError as exc:
                problem = f"usage ledger: {exc}"
        per_day = {first + timedelta(days=i): [0, 0] for i in range(CHART_DAYS)}
        for r in day_rows:
            if r.day in per_day:
                per_day[r.day][0] += r.input_tokens
                per_day[r.day][1] += r.output_tokens
        days = [DayTokens(d, v[0], v[1]) for d, v in sorted(per_day.items())]
        models = [
            ModelTokens(r.model, r.input_tokens, r.output_tokens, r.cost_usd) for r in month_rows
        ]
        return (
            usage_by_day(days, f"{tenant}: tokens per day"),
            usage_by_model(models, f"{tenant}: tokens per model"),
            problem,
        )


def describe(tenant: str, config: TenantConfig) -> list[tuple[str, str]]:
    """A tenant's settings as shown to operators: never a secret (keys, header values)."""
    backend = urlsplit(config.backend_url)
    auth = (
        f"managed (bearer from ${config.auth.token_env})"
        if config.auth is not None
        else "client's key passed through"
        if config.auth_passthrough
        else "none sent upstream"
    )
    limits = config.rate_limit
    audit = config.audit
    items = [
        ("backend", f"{backend.scheme}://{backend.netloc}"),
        ("format", config.streaming_format),
        ("backend timeout", f"{config.backend_timeout_ms} ms"),
        ("auth", auth),
        ("headers set", ", ".join(sorted(config.headers)) or "none"),
        ("models", ", ".join(config.models) if config.models is not None else "any"),
        ("policy", config.policy_path or "none"),
        ("classifiers", ", ".join(config.classifiers) or "pipeline defaults"),
        (
            "rate limit",
            ", ".join(
                f"{name} {value}"
                for name, value in (
                    ("requests/min", limits.requests_per_minute),
                    ("tokens/min", limits.tokens_per_minute),
                    ("concurrent", limits.max_concurrent_requests),
                )
                if value
            )
            or "none",
        ),
        ("budget", f"${config.budget.monthly_usd:,.2f} a month" if config.budget else "none"),
        (
            "audit",
            "off"
            if audit is None or not audit.enabled
            else f"on, {audit.retention_days} days"
            + (", redacted excerpts" if audit.include_content else ", no text"),
        ),
        ("fail mode", config.fail_mode),
        ("passthrough paths", ", ".join(config.passthrough_paths) or "none"),
    ]
    return items


def _age(seconds: float) -> str:
    return f"{max(0, int(seconds))} s ago"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def _secured(response: web.Response) -> web.Response:
    response.headers.update(_SECURITY_HEADERS)
    return response


def see_other(location: str) -> web.Response:
    return _secured(web.Response(status=303, headers={"Location": location}))


def behind_tls(request: web.Request) -> bool:
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def _set_cookie(
    request: web.Request, response: web.Response, name: str, value: str, max_age: float
) -> None:
    response.set_cookie(
        name,
        value,
        path=PREFIX,
        max_age=int(max_age),
        httponly=True,
        samesite="Strict",
        secure=behind_tls(request),
    )


def same_origin(request: web.Request) -> bool:
    """A browser's ``Origin`` (when sent) names this console's own host."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.host.lower()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SignedIn = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]
