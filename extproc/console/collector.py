"""Gathers what the console shows, every ``REFRESH_S`` seconds, so pages never wait on it.

Run by the admin server as a background task. Each refresh: one metrics sample into the
traffic window (shared through Redis in a fleet), the month's and today's usage from the
ledger, the audit trails' new trigger records, and every limited tenant's rate-limit
headroom. Pages render from the last refresh (a few seconds old at most) plus the live
config and suspensions. A source that fails is reported on the page, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from checkstream.accounting.suspensions import SharedSuspensions, kept_in_redis
from checkstream.audit.trail import resolve_audit_dirs
from checkstream.config.model import AuditConfig, LoadedConfig, RateLimitConfig
from checkstream.console.audit_digest import AuditDigest, TriggerRecord
from checkstream.console.fleet_traffic import ERRORS as FLEET_ERRORS
from checkstream.console.fleet_traffic import FleetTraffic
from checkstream.console.source import ConsoleSource
from checkstream.console.traffic import TrafficWindow, WindowStats, sample_from
from checkstream.console.usage_source import usage_source
from checkstream.ledger.usage import UsageError, period_of
from checkstream.limits.base import Limiter
from checkstream.limits.decisions import REQUESTS, TOKENS, LimiterUnavailable
from checkstream.limits.redis import RedisLimiter
from checkstream.ops.replica import replica_name

log = logging.getLogger("checkstream.console")

REFRESH_S: Final = 10.0
# The ledger's all-tenant totals scan the month's rows (about 2 s for a million rows in
# SQLite), and spend moves slowly: once a minute is enough.
USAGE_EVERY_S: Final = 60.0


@dataclass(frozen=True)
class Headroom:
    """What is left of a tenant's tightest rate limit."""

    limit_name: str  # the rate_limit key: requests_per_minute, tokens_per_minute, ...
    limit: int
    remaining: float
    exact: bool  # from the limiter itself, not counted from this gateway's metrics

    @property
    def share(self) -> float:
        return max(0.0, min(1.0, self.remaining / self.limit)) if self.limit else 1.0


@dataclass(frozen=True)
class Collected:
    at: float
    traffic: Mapping[str, WindowStats]
    #: replicas whose traffic is summed (1 without Redis)
    replicas: int
    spend_month: Mapping[str, float]
    tokens_today: Mapping[str, int]
    triggers_24h: Mapping[str, int | None]
    recent_triggers: Mapping[str, list[TriggerRecord]]
    headroom: Mapping[str, Headroom]
    problems: tuple[str, ...] = ()


EMPTY: Final = Collected(0.0, {}, 0, {}, {}, {}, {}, {}, ("collecting the first numbers",))


def counted_headroom(limits: RateLimitConfig, stats: WindowStats | None) -> Headroom | None:
    """Headroom from the last minute's counted requests and tokens: the limiter's own levels
    live in the workers when the limits are in memory."""
    used_requests = stats.requests_last_minute if stats else 0.0
    used_tokens = stats.tokens_last_minute if stats else 0.0
    options = []
    if limits.requests_per_minute:
        left = max(0.0, limits.requests_per_minute - used_requests)
        options.append(Headroom(REQUESTS, limits.requests_per_minute, left, False))
    if limits.tokens_per_minute:
        left = max(0.0, limits.tokens_per_minute - used_tokens)
        options.append(Headroom(TOKENS, limits.tokens_per_minute, left, False))
    return min(options, key=lambda h: h.share) if options else None


@dataclass
class Collector:
    source: ConsoleSource
    clock: Callable[[], float] = time.time
    latest: Collected = EMPTY
    window: TrafficWindow = field(default_factory=TrafficWindow)
    _digest: AuditDigest = field(default_factory=AuditDigest)
    _fleet: FleetTraffic | None = None
    _limiter: RedisLimiter | None = None
    _suspensions: SharedSuspensions | None = None
    _redis_url: str | None = None
    _first: asyncio.Event = field(default_factory=asyncio.Event)
    _usage: tuple[float, dict[str, float], dict[str, int]] | None = None
    _closing: set[asyncio.Task[None]] = field(default_factory=set)

    async def run(self) -> None:
        """Refresh until cancelled."""
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug here must not end the loop: the page says it is stale
                log.exception("console refresh failed")
            self._first.set()
            await asyncio.sleep(REFRESH_S)

    async def first(self, timeout_s: float) -> None:
        """Wait (a little) for the first refresh, so the first page is not empty."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first.wait(), timeout_s)

    def _redis(self, loaded: LoadedConfig) -> str | None:
        """The Redis URL shared state lives at, reconnecting when a reload changed it."""
        url = loaded.model.limits.url if kept_in_redis(loaded) else None
        if url != self._redis_url:
            for client in (self._fleet, self._limiter, self._suspensions):
                if client is not None:  # closed in the background; kept until it is
                    task = asyncio.get_running_loop().create_task(client.aclose())
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)
            self._fleet = self._limiter = self._suspensions = None
            self._redis_url = url
            if url is not None:
                self._fleet = FleetTraffic(url, replica_name())
                self._limiter = RedisLimiter(url, heartbeat=False)
                self._suspensions = SharedSuspensions(url)
        return url

    async def admin_suspensions(self) -> frozenset[str]:
        """Admin suspensions in force now, wherever they are kept; raises
        ``SuspensionStoreUnavailable`` when that is Redis and it cannot be reached."""
        self._redis(self.source.console_config())
        if self._suspensions is None:
            return self.source.local_suspensions()
        return frozenset(await self._suspensions.read())

    async def refresh(self) -> None:
        now = self.clock()
        loaded = self.source.console_config()
        self._redis(loaded)
        problems: list[str] = []
        families = await asyncio.to_thread(self.source.metric_families)
        self.window.add(sample_from(families, now))
        traffic = self.window.stats()
        replicas = 1
        if self._fleet is not None:
            try:
                traffic, replicas = await self._fleet.exchange(traffic, now)
            except FLEET_ERRORS as exc:
                problems.append(f"fleet traffic from Redis unavailable ({exc}): this replica only")
        spend, tokens = await self._usage_totals(loaded, now, problems)
        dirs = resolve_audit_dirs(loaded)
        counts, recent = await asyncio.to_thread(self._audit, dirs, now)
        headroom = await self._headroom(loaded, traffic, problems)
        self.latest = Collected(
            now, traffic, replicas, spend, tokens, counts, recent, headroom, tuple(problems)
        )

    async def _usage_totals(
        self, loaded: LoadedConfig, now: float, problems: list[str]
    ) -> tuple[dict[str, float], dict[str, int]]:
        """Spend this month and tokens today per tenant, re-read every USAGE_EVERY_S (and
        at a new UTC day)."""
        cached = self._usage
        if (
            cached is not None
            and now - cached[0] < USAGE_EVERY_S
            and period_of(cached[0]) == period_of(now)
            and int(cached[0] // 86400) == int(now // 86400)
        ):
            return cached[1], cached[2]
        spend, tokens, ok = await self._read_usage(loaded, now, problems)
        if ok:
            self._usage = (now, spend, tokens)
        return spend, tokens

    async def _read_usage(
        self, loaded: LoadedConfig, now: float, problems: list[str]
    ) -> tuple[dict[str, float], dict[str, int], bool]:
        source = usage_source(loaded)
        if source is None:
            return {}, {}, True
        today = datetime.fromtimestamp(now, UTC).date()
        try:
            month = await asyncio.to_thread(
                source.month, period_of(now), tenant=None, by_model=False
            )
            days = await asyncio.to_thread(source.days, today, tenant=None)
        except UsageError as exc:
            problems.append(f"usage ledger: {exc}")
            return {}, {}, False
        tokens: dict[str, int] = {}
        for row in days:
            tokens[row.tenant] = tokens.get(row.tenant, 0) + row.input_tokens + row.output_tokens
        return {row.tenant: float(row.cost_usd) for row in month}, tokens, True

    def _audit(
        self, dirs: Mapping[str, tuple[Path, AuditConfig]], now: float
    ) -> tuple[dict[str, int | None], dict[str, list[TriggerRecord]]]:
        self._digest.refresh(dirs, now)
        counts = {tenant: self._digest.count_24h(tenant, now) for tenant in dirs}
        recent = {tenant: self._digest.recent(tenant) for tenant in dirs}
        return counts, recent

    async def _headroom(
        self, loaded: LoadedConfig, traffic: Mapping[str, WindowStats], problems: list[str]
    ) -> dict[str, Headroom]:
        tenants = loaded.model.tenants.configs
        limiter: Limiter | None = self.source.own_limiter() or self._limiter
        found: dict[str, Headroom] = {}
        if limiter is None:
            for tenant, config in tenants.items():
                counted = counted_headroom(config.rate_limit, traffic.get(tenant))
                if counted is not None:
                    found[tenant] = counted
            return found
        limited = [t for t, c in tenants.items() if c.rate_limit.limited]
        try:
            decisions = await asyncio.gather(
                *(limiter.remaining(t, tenants[t].rate_limit) for t in limited)
            )
        except LimiterUnavailable as exc:
            problems.append(f"rate-limit headroom unavailable: {exc}")
            return found
        for tenant, decision in zip(limited, decisions, strict=True):
            if decision.limit_name and decision.limit and decision.remaining is not None:
                found[tenant] = Headroom(
                    decision.limit_name, decision.limit, decision.remaining, True
                )
        return found

    async def aclose(self) -> None:
        for client in (self._fleet, self._limiter, self._suspensions):
            if client is not None:
                with contextlib.suppress(*FLEET_ERRORS):
                    await client.aclose()
