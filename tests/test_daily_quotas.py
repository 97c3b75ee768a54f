"""Daily quotas, the same tests for the in-memory and the Redis backend (real redis-server)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest

from checkstream.limits.daily import (
    DAILY_USD,
    REQUESTS_PER_DAY,
    UNLIMITED,
    DailyLimits,
    DailyQuotas,
    LedgerDaySpend,
    MemoryDailyQuotas,
    RedisDailyQuotas,
    day_of,
    tightest,
)
from checkstream.limits.decisions import NANO, Decision
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

# 2026-03-14 23:59:30 UTC: thirty seconds before the day ends.
LATE = datetime(2026, 3, 14, 23, 59, 30, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2026, 3, 15, tzinfo=UTC).timestamp()


Make = Callable[..., DailyQuotas]


def seeded(spend: dict[str, int]) -> tuple[list[tuple[str, float]], LedgerDaySpend]:
    asked: list[tuple[str, float]] = []

    async def ledger(tenant: str, start: float) -> int:
        asked.append((tenant, start))
        return spend.get(tenant, 0)

    return asked, ledger


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Make]:
    made: list[DailyQuotas] = []

    async def nothing(tenant: str, start: float) -> int:
        return 0

    def build(ledger: LedgerDaySpend = nothing) -> DailyQuotas:
        quotas: DailyQuotas
        if request.param == "memory":
            quotas = MemoryDailyQuotas(ledger)
        else:
            quotas = RedisDailyQuotas(redis_server.url, ledger)
        made.append(quotas)
        return quotas

    yield build
    for quotas in made:
        await quotas.aclose()


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def test_days_are_utc_days() -> None:
    assert day_of(LATE) == ("2026-03-14", MIDNIGHT - 86400)
    assert day_of(MIDNIGHT) == ("2026-03-15", MIDNIGHT)


async def test_requests_per_day_refuse_until_midnight_utc(make: Make) -> None:
    quotas, who, limits = make(), tenant(), DailyLimits(3, 0)
    for n in range(3):
        got = await quotas.admit(who, limits, LATE)
        assert got == Decision(True, REQUESTS_PER_DAY, 3, 2 - n, MIDNIGHT, 0.0)
    refused = await quotas.admit(who, limits, LATE)
    assert refused == Decision(False, REQUESTS_PER_DAY, 3, 0, MIDNIGHT, 30.0)
    # A refusal takes nothing; a refund gives one back.
    await quotas.refund(who, LATE)
    assert (await quotas.admit(who, limits, LATE)).allowed
    assert not (await quotas.admit(who, limits, LATE)).allowed
    # 00:00 UTC: a new day.
    assert (await quotas.admit(who, limits, MIDNIGHT)).remaining == 2


async def test_daily_budget_refuses_once_spent_and_seeds_from_the_ledger(make: Make) -> None:
    who = tenant()
    asked, ledger = seeded({who: 7 * NANO})
    quotas, limits = make(ledger), DailyLimits(0, 10 * NANO)
    assert (await quotas.admit(who, limits, LATE)) == Decision(True, None, None, None, None, 0.0)
    assert asked == [(who, MIDNIGHT - 86400)]
    assert await quotas.charge(who, 2 * NANO, LATE) == 9 * NANO
    assert (await quotas.admit(who, limits, LATE)).allowed
    assert await quotas.charge(who, 2 * NANO, LATE) == 11 * NANO
    refused = await quotas.admit(who, limits, LATE)
    assert (refused.allowed, refused.limit_name, refused.reset) == (False, DAILY_USD, MIDNIGHT)
    assert refused.retry_after_s == 30.0
    assert (await quotas.admit(who, limits, MIDNIGHT)).allowed  # the next day


async def test_no_daily_limits_touch_no_store(make: Make) -> None:
    asked, ledger = seeded({})
    quotas = make(ledger)
    assert await quotas.admit(tenant(), DailyLimits(0, 0), LATE) is UNLIMITED
    assert asked == []


async def test_redis_is_exact_across_replicas(redis_server: RedisServer) -> None:
    replicas = [RedisDailyQuotas(redis_server.url) for _ in range(2)]
    who, limits = tenant(), DailyLimits(20, 0)
    try:
        results = await asyncio.gather(
            *(replicas[i % 2].admit(who, limits, LATE) for i in range(60))
        )
    finally:
        for replica in replicas:
            await replica.aclose()
    assert sum(r.allowed for r in results) == 20
    assert sorted(r.remaining for r in results if r.allowed) == list(range(20))


def test_tightest_is_the_least_share_left() -> None:
    minute = Decision(True, "requests_per_minute", 100, 50, 1.0, 0.0)  # half left
    daily = Decision(True, REQUESTS_PER_DAY, 10, 3, 2.0, 0.0)  # 30% left
    assert tightest(minute, daily) is daily
    assert tightest(Decision(True, "rpm", 100, 10, 1.0, 0.0), daily).limit == 100
    assert tightest(minute, UNLIMITED) is minute
    none = Decision(True, None, None, None, None, 0.0)
    assert tightest(none, daily) is daily
