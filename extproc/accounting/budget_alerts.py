"""Budget alerts and the budget-used gauge (worker).

After a request's cost is charged, its tenant's spend is compared with each budget (the
month's, the day's). Every ``budget.alerts.at_percent`` threshold reached for the first time
in a period sends one POST to ``budget.alerts.webhook_url``:
``{"tenant", "period", "percent", "spent", "budget"}`` (USD). "First time" is decided by a
claim: ``SET NX`` in Redis when limits use Redis, so exactly one replica sends it; in memory
otherwise (one process: a restart may send a threshold again). The POST is retried with
exponential backoff while the receiver is down or answers 5xx, and the outcome (delivered or
not, attempts) goes to the tenant's audit trail, or the log for tenants without one.

Claims happen before delivery: a replica that dies between the two loses that alert rather
than sending it twice.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import aiohttp
import redis.exceptions

from checkstream.audit.trail import AuditLog
from checkstream.config.model import TenantConfig
from checkstream.ledger.usage import period_of
from checkstream.limits.base import Limiter
from checkstream.limits.daily import DailyQuotas, day_of
from checkstream.limits.decisions import NANO, to_nano
from checkstream.limits.redis import redis_client
from checkstream.ops import logs
from checkstream.ops.metrics import BUDGET_USED

log = logs.get("checkstream.alerts")

#: Delivery attempts, and the first wait between them (doubled after each failure).
ATTEMPTS: Final = 6
FIRST_BACKOFF_S: Final = 0.5
_POST_TIMEOUT_S: Final = 10.0
# A claim outlives the longest period (a month) it stands for.
_CLAIM_TTL_S: Final = 40 * 86_400


@dataclass(frozen=True)
class Alert:
    tenant: str
    period: str  # "YYYY-MM" (monthly budget) or "YYYY-MM-DD" (daily budget)
    percent: int
    spent: float
    budget: float

    def body(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "period": self.period,
            "percent": self.percent,
            "spent": round(self.spent, 6),
            "budget": self.budget,
        }


class Claims(Protocol):
    async def claim(self, key: str) -> bool: ...

    async def aclose(self) -> None: ...


class MemoryClaims:
    def __init__(self) -> None:
        self._taken: set[str] = set()

    async def claim(self, key: str) -> bool:
        if key in self._taken:
            return False
        self._taken.add(key)
        return True

    async def aclose(self) -> None:
        return None


class RedisClaims:
    def __init__(self, url: str) -> None:
        self._redis = redis_client(url)

    async def claim(self, key: str) -> bool:
        return bool(await self._redis.set(key, "1", nx=True, ex=_CLAIM_TTL_S))

    async def aclose(self) -> None:
        await self._redis.aclose()


Sender = Callable[[str, bytes], Awaitable[int]]


class BudgetAlerts:
    """Long-lived (outlives reloads): the claims, the HTTP session, deliveries in flight."""

    def __init__(
        self, claims: Claims, audit: AuditLog, send: Sender | None = None, backoff_s: float = 1.0
    ) -> None:
        self._claims = claims
        self._audit = audit
        self._send = send or self._post
        self._first_backoff = FIRST_BACKOFF_S * backoff_s
        self._seen: set[str] = set()  # claimed here or elsewhere: no need to ask again
        self._session: aiohttp.ClientSession | None = None
        self._deliveries: set[asyncio.Task[None]] = set()

    async def spent(
        self, tenant: str, config: TenantConfig, kind: str, period: str, spent_nano: int
    ) -> None:
        """Record ``spent_nano`` of the ``kind`` ("monthly" or "daily") budget in ``period``."""
        budget = config.budget
        if budget is None:
            return
        usd = budget.monthly_usd if kind == "monthly" else budget.daily_usd
        if not usd:
            return
        spent = spent_nano / NANO
        BUDGET_USED.labels(tenant, kind).set(spent / usd)
        if budget.alerts is None:
            return
        for percent in sorted(set(budget.alerts.at_percent)):
            if spent * 100 < usd * percent:
                break
            key = f"checkstream:alert:{{{tenant}}}:{period}:{percent}"
            if key in self._seen:
                continue
            try:
                mine = await self._claims.claim(key)
            except redis.exceptions.RedisError as exc:
                log.error("budget_alert_claim_failed", error=str(exc))
                return  # unclaimed: a later request tries again
            self._seen.add(key)
            if mine:
                alert = Alert(tenant, period, percent, spent, usd)
                url = budget.alerts.webhook_url
                task = asyncio.get_running_loop().create_task(self._deliver(alert, url))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)

    async def _post(self, url: str, body: bytes) -> int:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_POST_TIMEOUT_S)
            )
        headers = {"content-type": "application/json"}
        async with self._session.post(url, data=body, headers=headers) as response:
            return response.status

    async def _deliver(self, alert: Alert, url: str) -> None:
        body = json.dumps(alert.body()).encode()
        wait = self._first_backoff
        status: int | None = None
        error: str | None = None
        attempts = 0
        for attempts in range(1, ATTEMPTS + 1):
            try:
                status = await self._send(url, body)
                error = None
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status, error = None, type(exc).__name__
            if status is not None and status < 500:
                break
            if attempts < ATTEMPTS:
                await asyncio.sleep(wait)
                wait *= 2
        delivered = status is not None and 200 <= status < 300
        record = {
            "time": _iso_now(),
            "type": "budget_alert",
            **alert.body(),
            # The receiver's host only: a webhook URL's path or query may carry a secret.
            "webhook_host": urlsplit(url).hostname,
            "delivered": delivered,
            "attempts": attempts,
            "status": status,
            "error": error,
        }
        if self._audit.audits(alert.tenant):
            try:
                await self._audit.append(alert.tenant, [record])
                return
            except Exception as exc:
                log.error("audit_write_failed", error=str(exc))
        log.info("budget_alert", **record)

    async def aclose(self) -> None:
        if self._deliveries:
            await asyncio.wait(set(self._deliveries), timeout=5)
        if self._session is not None:
            await self._session.close()
        await self._claims.aclose()


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BudgetTracker:
    """What happens to a budgeted tenant's spend at each request's end: the day's spend
    charged (daily_quotas.py), the gauge set and the alerts checked for both budgets.

    The month's spend is charged by the limiter; reading it back costs a store round trip,
    so tenants without alerts read it for the gauge at most once per ``GAUGE_EVERY_S``.
    """

    GAUGE_EVERY_S: Final = 1.0

    def __init__(self, daily: DailyQuotas, limiter: Limiter, alerts: BudgetAlerts) -> None:
        self.daily = daily
        self.limiter = limiter
        self.alerts = alerts
        self._gauged: dict[str, float] = {}

    async def charged(self, tenant: str, config: TenantConfig, cost_usd: float, now: float) -> None:
        """Raises LimiterUnavailable when the store cannot be reached."""
        budget = config.budget
        if budget is None:
            return
        if budget.daily_usd and cost_usd:
            spent = await self.daily.charge(tenant, to_nano(cost_usd), now)
            await self.alerts.spent(tenant, config, "daily", day_of(now)[0], spent)
        if not budget.monthly_usd:
            return
        if budget.alerts is None and now - self._gauged.get(tenant, 0.0) < self.GAUGE_EVERY_S:
            return
        self._gauged[tenant] = now
        period = period_of(now)
        await self.alerts.spent(
            tenant, config, "monthly", period, await self.limiter.spent(tenant, period)
        )

    async def aclose(self) -> None:
        await self.daily.aclose()
        await self.alerts.aclose()
