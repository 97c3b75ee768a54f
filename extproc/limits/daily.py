"""Per-day quotas: ``rate_limit.requests_per_day`` and ``budget.daily_usd`` (worker).

Days are UTC days: counters are keyed by the date, so they reset at 00:00 UTC. Kept apart
from the minute limiter (``base.py``): their own keys and their own Lua script, the same
shape (an in-memory backend exact with one worker, a Redis backend exact across workers and
replicas, since each admission is one atomic script).

``admit`` counts the request and checks the day's spend in one step, all or nothing: over
either limit nothing changes. ``refund`` gives the count back when the minute limits refuse
the request after all. ``charge`` adds a request's cost at its end and returns the day's
spend. A day's spend counter that does not exist yet starts from the usage ledger
(``SET NX``, first replica wins), like the month's in ``redis.py``.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

import redis.exceptions

from checkstream.config.model import TenantConfig
from checkstream.limits.decisions import Decision, LimiterUnavailable, to_nano
from checkstream.limits.redis import redis_client

REQUESTS_PER_DAY: Final = "requests_per_day"
DAILY_USD: Final = "daily_usd"
DAY_S: Final = 86_400
# A day's counters outlive their day by one, then expire.
_TTL_S: Final = 2 * DAY_S
#: Nothing limited per day: no store is touched.
UNLIMITED: Final = Decision(True, None, None, None, None, 0.0)

#: (tenant, day start epoch) -> USD committed that day, from the usage ledger.
LedgerDaySpend = Callable[[str, float], Awaitable[int]]


async def _nothing_spent(tenant: str, start: float) -> int:
    return 0


def day_of(now: float) -> tuple[str, float]:
    """The UTC date and the epoch second its day started."""
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    start = float(calendar.timegm(time.strptime(day, "%Y-%m-%d")))
    return day, start


@dataclass(frozen=True)
class DailyLimits:
    requests: int  # 0: none
    budget_nano: int  # 0: none

    @staticmethod
    def of(config: TenantConfig) -> DailyLimits:
        budget = config.budget
        daily_usd = budget.daily_usd if budget is not None else None
        return DailyLimits(
            config.rate_limit.requests_per_day or 0,
            to_nano(daily_usd) if daily_usd else 0,
        )

    def __bool__(self) -> bool:
        return bool(self.requests or self.budget_nano)


def _decide(limits: DailyLimits, outcome: int, count: int, start: float, now: float) -> Decision:
    """outcome: 1 admitted (count includes it), 0 over requests_per_day, -1 over daily_usd."""
    reset = start + DAY_S
    wait = max(1.0, reset - now)
    if outcome == -1:
        return Decision(False, DAILY_USD, None, None, reset, wait)
    if not limits.requests:
        return Decision(True, None, None, None, None, 0.0)
    remaining = max(0, limits.requests - count)
    if outcome == 0:
        return Decision(False, REQUESTS_PER_DAY, limits.requests, 0, reset, wait)
    return Decision(True, REQUESTS_PER_DAY, limits.requests, remaining, reset, 0.0)


def tightest(minute: Decision, daily: Decision) -> Decision:
    """The decision whose limit has the least share left, for X-RateLimit-* (integers, no
    rounding: remaining/limit compared by cross-multiplication)."""
    if daily.limit is None or daily.remaining is None:
        return minute
    if minute.limit is None or minute.remaining is None:
        return daily
    if daily.remaining * minute.limit < minute.remaining * daily.limit:
        return daily
    return minute


class DailyQuotas(Protocol):
    async def admit(self, tenant: str, limits: DailyLimits, now: float) -> Decision: ...

    async def refund(self, tenant: str, now: float) -> None: ...

    async def charge(self, tenant: str, nano: int, now: float) -> int: ...

    async def aclose(self) -> None: ...


class MemoryDailyQuotas:
    """Exact with one extproc worker; the day's counts live in this process."""

    def __init__(self, ledger_spend: LedgerDaySpend = _nothing_spent) -> None:
        self._ledger_spend = ledger_spend
        self._day = ""
        self._requests: dict[str, int] = {}
        self._spend: dict[str, int] = {}

    def _today(self, now: float) -> float:
        day, start = day_of(now)
        if day != self._day:  # 00:00 UTC: yesterday's counts go
            self._day, self._requests, self._spend = day, {}, {}
        return start

    async def _spent(self, tenant: str, start: float) -> int:
        if tenant not in self._spend:
            self._spend[tenant] = await self._ledger_spend(tenant, start)
        return self._spend[tenant]

    async def admit(self, tenant: str, limits: DailyLimits, now: float) -> Decision:
        if not limits:
            return UNLIMITED
        start = self._today(now)
        count = self._requests.get(tenant, 0)
        if limits.budget_nano and await self._spent(tenant, start) >= limits.budget_nano:
            return _decide(limits, -1, count, start, now)
        if limits.requests and count >= limits.requests:
            return _decide(limits, 0, count, start, now)
        self._requests[tenant] = count + 1
        return _decide(limits, 1, count + 1, start, now)

    async def refund(self, tenant: str, now: float) -> None:
        self._today(now)
        if self._requests.get(tenant, 0) > 0:
            self._requests[tenant] -= 1

    async def charge(self, tenant: str, nano: int, now: float) -> int:
        start = self._today(now)
        self._spend[tenant] = await self._spent(tenant, start) + nano
        return self._spend[tenant]

    async def aclose(self) -> None:
        return None


# KEYS: requests counter, spend counter. ARGV: requests limit, budget (nano), ttl s.
# Returns {outcome, count}: 1 admitted, 0 over the request limit, -1 over the budget,
# -2 the spend counter needs seeding from the ledger first.
_LUA_ADMIT = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
local budget = tonumber(ARGV[2])
if budget > 0 then
  local spent = redis.call('GET', KEYS[2])
  if not spent then return {-2, count} end
  if tonumber(spent) >= budget then return {-1, count} end
end
local limit = tonumber(ARGV[1])
if limit > 0 and count >= limit then return {0, count} end
count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, count}
"""
# KEYS: requests counter. Gives one back, never below zero.
_LUA_REFUND = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count > 0 then redis.call('DECR', KEYS[1]) end
return 0
"""
# KEYS: spend counter. ARGV: nano, ttl s. Returns the day's spend, or -1 if it needs seeding.
_LUA_CHARGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local spent = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return spent
"""


def _keys(tenant: str, day: str) -> tuple[str, str]:
    # A hash tag per tenant keeps both counters in one cluster slot.
    return (
        f"checkstream:day:{{{tenant}}}:{day}:requests",
        f"checkstream:day:{{{tenant}}}:{day}:nano",
    )


class RedisDailyQuotas:
    """Exact across every worker and replica sharing one Redis."""

    def __init__(
        self, url: str, ledger_spend: LedgerDaySpend = _nothing_spent, timeout_s: float = 1.0
    ) -> None:
        self._redis = redis_client(url, timeout_s)
        self._ledger_spend = ledger_spend
        self._admit = self._redis.register_script(_LUA_ADMIT)
        self._refund = self._redis.register_script(_LUA_REFUND)
        self._charge = self._redis.register_script(_LUA_CHARGE)

    async def _seed(self, key: str, tenant: str, start: float) -> None:
        await self._redis.set(key, await self._ledger_spend(tenant, start), nx=True, ex=_TTL_S)

    async def admit(self, tenant: str, limits: DailyLimits, now: float) -> Decision:
        if not limits:
            return UNLIMITED
        day, start = day_of(now)
        requests, spend = _keys(tenant, day)
        args = [limits.requests, limits.budget_nano, _TTL_S]
        try:
            for _attempt in range(3):
                outcome, count = await self._admit(keys=[requests, spend], args=args)
                if outcome != -2:
                    return _decide(limits, int(outcome), int(count), start, now)
                await self._seed(spend, tenant, start)
        except redis.exceptions.RedisError as exc:
            raise LimiterUnavailable(f"daily quotas: {exc}") from exc
        raise LimiterUnavailable("daily quotas: the spend counter keeps vanishing from Redis")

    async def refund(self, tenant: str, now: float) -> None:
        requests, _spend = _keys(tenant, day_of(now)[0])
        try:
            await self._refund(keys=[requests], args=[])
        except redis.exceptions.RedisError as exc:
            raise LimiterUnavailable(f"daily quotas: {exc}") from exc

    async def charge(self, tenant: str, nano: int, now: float) -> int:
        day, start = day_of(now)
        _requests, spend = _keys(tenant, day)
        try:
            for _attempt in range(3):
                spent = int(await self._charge(keys=[spend], args=[nano, _TTL_S]))
                if spent >= 0:
                    return spent
                await self._seed(spend, tenant, start)
        except redis.exceptions.RedisError as exc:
            raise LimiterUnavailable(f"daily quotas: {exc}") from exc
        raise LimiterUnavailable("daily quotas: the spend counter keeps vanishing from Redis")

    async def aclose(self) -> None:
        await self._redis.aclose()
