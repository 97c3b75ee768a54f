"""Monthly budgets in checkstream.limits: one suite over both backends, then what only
Redis can
show (replicas, round trips, seeding races, an unreachable, flushed or restarted server), and
the month arithmetic.

Spend is integer nano-dollars. A month's counter starts from the usage ledger (``LedgerSpend``)
the first time it is needed, `acquire(..., budget=)` refuses once it has reached the budget,
and `finish(..., charge=)` adds a request's cost in the same store operation that settles its
tokens and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from checkstream.config.model import LimitsConfig, RateLimitConfig
from checkstream.limits import build_limiter
from checkstream.limits.base import Limiter
from checkstream.limits.decisions import (
    CONCURRENCY,
    NANO,
    REQUESTS,
    TOKENS,
    Budget,
    Charge,
    Decision,
    LimiterUnavailable,
    seconds_to_next_month,
    to_nano,
)
from checkstream.limits.memory import MemoryLimiter
from checkstream.limits.redis import RedisLimiter
from tests.redis_server import RedisServer, redis_binary, redis_server
from tests.support import free_port

__all__ = ["redis_server"]  # the fixture is used by name

T0 = 1_700_000_000.0  # 2023-11-14: the limiter's clock; budget periods are passed explicitly
MONTH = "2026-11"
NEXT_MONTH = "2026-12"
# The cost of one gpt-4o-mini input token ($0.15 per million): 150 nano-dollars.
ONE_TOKEN_NANO = 150
NO_LIMITS = RateLimitConfig()


def rl(
    rpm: int | None = None, tpm: int | None = None, concurrent: int | None = None
) -> RateLimitConfig:
    return RateLimitConfig(
        requests_per_minute=rpm, tokens_per_minute=tpm, max_concurrent_requests=concurrent
    )


class Ledger:
    """A usage ledger's month spend in nano-dollars, recording who asked."""

    def __init__(self, spend: dict[tuple[str, str], int] | None = None) -> None:
        self.spend = dict(spend or {})
        self.asked: list[tuple[str, str]] = []

    async def __call__(self, tenant: str, period: str) -> int:
        self.asked.append((tenant, period))
        return self.spend.get((tenant, period), 0)


Make = Callable[[Ledger], Limiter]


async def charge(
    limiter: Limiter, tenant: str, period: str, nano: int, limits: RateLimitConfig = NO_LIMITS
) -> None:
    """A request's end that only costs money (nothing reserved, no slot held)."""
    await limiter.finish(tenant, limits, 0, 0, now=T0, charge=Charge(period, nano))


async def admits(limiter: Limiter, tenant: str, limit_nano: int, period: str = MONTH) -> bool:
    decision = await limiter.acquire(
        tenant, NO_LIMITS, 0, now=T0, budget=Budget(period, limit_nano)
    )
    return decision.allowed


def _client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)


async def _flushed(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()


def _key(tenant: str, period: str) -> str:
    return f"checkstream:budget:{{{tenant}}}:{period}"


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Builds limiters of one kind; Redis ones share one freshly flushed database, as the
    replicas of a deployment do."""
    made: list[Limiter] = []
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        await _flushed(server.url)

        def build(ledger: Ledger) -> Limiter:
            limiter = RedisLimiter(server.url, ledger_spend=ledger)
            made.append(limiter)
            return limiter
    else:

        def build(ledger: Ledger) -> Limiter:
            limiter = MemoryLimiter(ledger)
            made.append(limiter)
            return limiter

    yield build
    for limiter in made:
        await limiter.aclose()


# --- Both backends: the month's counter. ---


async def test_a_month_starts_from_the_ledger_which_is_read_once(make: Make) -> None:
    ledger = Ledger({("acme", MONTH): to_nano(12.5)})
    limiter = make(ledger)
    assert await limiter.spent("acme", MONTH) == 12_500_000_000
    await charge(limiter, "acme", MONTH, to_nano(0.25))
    assert await admits(limiter, "acme", to_nano(100))
    assert await limiter.spent("acme", MONTH) == 12_750_000_000
    assert ledger.asked == [("acme", MONTH)]


async def test_a_first_charge_also_starts_from_the_ledger(make: Make) -> None:
    ledger = Ledger({("acme", MONTH): to_nano(1.1)})
    limiter = make(ledger)
    await charge(limiter, "acme", MONTH, to_nano(2.2))
    # Counted in nano-dollars: 1.1 + 2.2 is exactly 3.3, with no float noise.
    assert await limiter.spent("acme", MONTH) == to_nano(3.3) == 3_300_000_000
    assert ledger.asked == [("acme", MONTH)]


async def test_a_first_acquire_with_a_budget_starts_from_the_ledger(make: Make) -> None:
    ledger = Ledger({("acme", MONTH): to_nano(10)})
    limiter = make(ledger)
    assert not await admits(limiter, "acme", to_nano(10))
    assert await admits(limiter, "acme", to_nano(10) + 1)
    assert ledger.asked == [("acme", MONTH)]


async def test_without_a_budget_or_charge_the_ledger_is_never_read(make: Make) -> None:
    ledger = Ledger({("acme", MONTH): to_nano(10)})
    limiter = make(ledger)
    limits = rl(rpm=5, tpm=1000, concurrent=2)
    assert (await limiter.acquire("acme", limits, 100, now=T0)).allowed
    await limiter.finish("acme", limits, 100, 40, now=T0)
    await limiter.finish("acme", limits, 0, 0, now=T0, charge=Charge(MONTH, 0))
    assert ledger.asked == []


async def test_many_tiny_charges_add_up_exactly(make: Make) -> None:
    limiter = make(Ledger())
    for _ in range(1000):
        await charge(limiter, "acme", MONTH, ONE_TOKEN_NANO)
    # A float sum of the same 1000 costs in USD would drift; integers do not.
    assert sum([0.00000015] * 1000) != 0.00015
    assert await limiter.spent("acme", MONTH) == 150_000


async def test_concurrent_charges_are_all_counted(make: Make) -> None:
    limiter = make(Ledger())
    await asyncio.gather(*(charge(limiter, "acme", MONTH, to_nano(0.001)) for _ in range(100)))
    assert await limiter.spent("acme", MONTH) == to_nano(0.1)


async def test_months_are_separate(make: Make) -> None:
    ledger = Ledger({("acme", MONTH): to_nano(7), ("acme", NEXT_MONTH): to_nano(0.5)})
    limiter = make(ledger)
    await charge(limiter, "acme", MONTH, to_nano(1))
    assert await limiter.spent("acme", NEXT_MONTH) == to_nano(0.5)
    await charge(limiter, "acme", NEXT_MONTH, to_nano(0.25))
    assert await limiter.spent("acme", MONTH) == to_nano(8)
    assert await limiter.spent("acme", NEXT_MONTH) == to_nano(0.75)
    # A spent month does not refuse the next one.
    assert not await admits(limiter, "acme", to_nano(8), MONTH)
    assert await admits(limiter, "acme", to_nano(8), NEXT_MONTH)
    assert sorted(ledger.asked) == [("acme", MONTH), ("acme", NEXT_MONTH)]


async def test_tenants_are_separate(make: Make) -> None:
    ledger = Ledger({("acme", MONTH): to_nano(3)})
    limiter = make(ledger)
    await charge(limiter, "acme", MONTH, to_nano(1))
    await charge(limiter, "globex", MONTH, to_nano(0.125))
    assert await limiter.spent("acme", MONTH) == to_nano(4)
    assert await limiter.spent("globex", MONTH) == to_nano(0.125)
    assert await limiter.spent("initech", MONTH) == 0
    assert not await admits(limiter, "acme", to_nano(4))
    assert await admits(limiter, "globex", to_nano(4))


async def test_a_big_month_stays_exact(make: Make) -> None:
    # 2000 USD is 2 * 10**12 nano-dollars: far inside Redis' 64-bit integers and Lua's doubles.
    limiter = make(Ledger({("acme", MONTH): to_nano(1999.999999999)}))
    assert await admits(limiter, "acme", to_nano(2000))  # one nano-dollar short
    await charge(limiter, "acme", MONTH, 1)
    assert await limiter.spent("acme", MONTH) == 2000 * NANO
    assert not await admits(limiter, "acme", to_nano(2000))


@pytest.mark.parametrize("bad", ["a}b", "a{b", "acme}:2026-11", "x:y"])
async def test_tenant_ids_that_could_escape_their_keys_are_refused(make: Make, bad: str) -> None:
    ledger = Ledger()
    limiter = make(ledger)
    with pytest.raises(ValueError, match="tenant"):
        await limiter.acquire(bad, NO_LIMITS, 0, now=T0, budget=Budget(MONTH, 1))
    with pytest.raises(ValueError, match="tenant"):
        await charge(limiter, bad, MONTH, 1)
    assert ledger.asked == []


# --- Both backends: acquire with a budget, finish with a charge. ---


async def test_acquire_refuses_exactly_when_spent_reaches_the_budget(make: Make) -> None:
    limit = to_nano(0.0001)  # 100 000 nano-dollars
    limiter = make(Ledger({("acme", MONTH): limit - 1}))
    assert await admits(limiter, "acme", limit)  # spent == limit - 1: still under
    await charge(limiter, "acme", MONTH, 1)
    assert await limiter.spent("acme", MONTH) == limit
    assert not await admits(limiter, "acme", limit)  # spent == limit: refused
    assert await admits(limiter, "acme", limit + 1)  # the same spend under a bigger budget
    await charge(limiter, "acme", MONTH, 5)
    assert not await admits(limiter, "acme", limit)  # overshot: still refused


async def test_a_request_may_overshoot_the_budget_by_its_own_cost(make: Make) -> None:
    limiter = make(Ledger())
    budget = Budget(MONTH, 1000)
    assert (await limiter.acquire("acme", NO_LIMITS, 0, now=T0, budget=budget)).allowed
    # Its cost was unknown when it started; it is charged in full when it ends.
    await charge(limiter, "acme", MONTH, 5000)
    assert await limiter.spent("acme", MONTH) == 5000
    assert not (await limiter.acquire("acme", NO_LIMITS, 0, now=T0, budget=budget)).allowed


async def test_an_over_budget_refusal_takes_nothing(make: Make) -> None:
    limiter = make(Ledger({("acme", MONTH): 500}))
    limits = rl(rpm=5, tpm=1000, concurrent=3)
    assert (await limiter.acquire("acme", limits, 100, now=T0)).allowed
    before = {
        name: (await limiter.remaining("acme", rl(**{name: value}), now=T0)).remaining
        for name, value in (("rpm", 5), ("tpm", 1000), ("concurrent", 3))
    }
    assert before == {"rpm": 4, "tpm": 900, "concurrent": 2}
    for _ in range(3):
        refused = await limiter.acquire("acme", limits, 100, now=T0, budget=Budget(MONTH, 500))
        assert (refused.allowed, refused.over_budget) == (False, True)
    after = {
        name: (await limiter.remaining("acme", rl(**{name: value}), now=T0)).remaining
        for name, value in (("rpm", 5), ("tpm", 1000), ("concurrent", 3))
    }
    assert after == before
    assert await limiter.spent("acme", MONTH) == 500


async def test_over_budget_waits_for_next_month_and_reports_the_tightest_rate_limit(
    make: Make,
) -> None:
    limiter = make(Ledger({("acme", MONTH): 1000}))
    limits = rl(rpm=10, tpm=1000)
    assert (await limiter.acquire("acme", limits, 500, now=T0)).allowed
    refused = await limiter.acquire("acme", limits, 100, now=T0, budget=Budget(MONTH, 1000))
    # Tokens are the tightest (500 of 1000 left, against 9 of 10 requests); it would fit.
    assert refused == Decision(
        allowed=False,
        limit_name=TOKENS,
        limit=1000,
        remaining=500,
        reset=T0 + 30,  # 500 tokens drain in 30 s at 1000 per minute
        retry_after_s=seconds_to_next_month(T0),
        over_budget=True,
    )
    assert refused.retry_after_s == 16 * 86400 + 6400  # to 2023-12-01 00:00Z
    # The rate limits as they stand, only refused for the month.
    standing = await limiter.remaining("acme", limits, now=T0)
    assert refused == replace(
        standing, allowed=False, retry_after_s=seconds_to_next_month(T0), over_budget=True
    )


async def test_over_budget_wins_over_a_rate_limit_refusal(make: Make) -> None:
    limiter = make(Ledger({("acme", MONTH): 1000}))
    limits = rl(rpm=1)
    assert (await limiter.acquire("acme", limits, 0, now=T0)).allowed
    # A rate limit alone would say 60 s; the budget says next month, which is the honest wait.
    refused = await limiter.acquire("acme", limits, 0, now=T0, budget=Budget(MONTH, 1000))
    assert refused == Decision(
        False, REQUESTS, 1, 0, T0 + 60, seconds_to_next_month(T0), over_budget=True
    )


async def test_over_budget_without_rate_limits_has_no_limit_to_report(make: Make) -> None:
    limiter = make(Ledger({("acme", MONTH): 1000}))
    refused = await limiter.acquire("acme", NO_LIMITS, 0, now=T0, budget=Budget(MONTH, 1000))
    assert refused == Decision(
        False, None, None, None, None, seconds_to_next_month(T0), over_budget=True
    )


async def test_finish_settles_releases_and_charges_in_one_call(make: Make) -> None:
    limiter = make(Ledger({("acme", MONTH): 1000}))
    limits = rl(tpm=1000, concurrent=1)
    budget = Budget(MONTH, to_nano(1))
    taken = await limiter.acquire("acme", limits, 300, now=T0, budget=budget)
    assert taken.allowed
    assert (await limiter.remaining("acme", limits, now=T0)).remaining == 0  # the slot
    await limiter.finish(
        "acme", limits, 300, 7, now=T0, charge=Charge(MONTH, 7 * 150), lease=taken.lease
    )
    assert (await limiter.remaining("acme", rl(tpm=1000), now=T0)).remaining == 1000 - 7
    assert (await limiter.remaining("acme", rl(concurrent=1), now=T0)).remaining == 1
    assert await limiter.spent("acme", MONTH) == 1000 + 7 * 150


async def test_a_finish_that_seeds_the_month_settles_and_releases_once(make: Make) -> None:
    # Admitted without a budget (no seed), then charged: the charge must seed the month
    # first, and the settle and release in the same finish must still happen exactly once.
    ledger = Ledger({("acme", MONTH): 40})
    limiter = make(ledger)
    limits = rl(tpm=1000, concurrent=2)
    taken = [await limiter.acquire("acme", limits, 300, now=T0) for _ in range(2)]
    assert all(d.allowed for d in taken)
    await limiter.finish(
        "acme", limits, 300, 7, now=T0, charge=Charge(MONTH, 2), lease=taken[0].lease
    )
    assert (await limiter.remaining("acme", rl(tpm=1000), now=T0)).remaining == 1000 - 307
    assert (await limiter.remaining("acme", rl(concurrent=2), now=T0)).remaining == 1
    assert await limiter.spent("acme", MONTH) == 42
    assert ledger.asked == [("acme", MONTH)]


async def test_a_negative_charge_is_refused_before_anything_changes(make: Make) -> None:
    limiter = make(Ledger())
    limits = rl(tpm=1000, concurrent=1)
    assert (await limiter.acquire("acme", limits, 300, now=T0)).allowed
    with pytest.raises(ValueError, match="never negative"):
        await limiter.finish("acme", limits, 300, 7, now=T0, charge=Charge(MONTH, -5))
    assert (await limiter.remaining("acme", rl(tpm=1000), now=T0)).remaining == 700
    assert (await limiter.remaining("acme", rl(concurrent=1), now=T0)).remaining == 0


# --- Redis only. ---


async def test_two_replicas_share_one_month(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    a = RedisLimiter(redis_server.url, ledger_spend=Ledger({("acme", MONTH): to_nano(2)}))
    # The second replica's ledger differs (it may be another host's): the first seed wins.
    b = RedisLimiter(redis_server.url, ledger_spend=Ledger({("acme", MONTH): to_nano(5)}))
    try:
        await charge(a, "acme", MONTH, to_nano(0.25))
        await charge(b, "acme", MONTH, to_nano(0.5))
        assert await a.spent("acme", MONTH) == await b.spent("acme", MONTH) == to_nano(2.75)
        await asyncio.gather(*(charge(r, "acme", MONTH, ONE_TOKEN_NANO) for r in [a, b] * 50))
        total = to_nano(2.75) + 100 * ONE_TOKEN_NANO
        assert await a.spent("acme", MONTH) == total
        # What one replica charged, the other refuses on.
        assert await admits(a, "acme", total + 1)
        await charge(a, "acme", MONTH, 1)
        assert not await admits(b, "acme", total + 1)
    finally:
        await a.aclose()
        await b.aclose()


async def test_replicas_seeding_at_once_agree_on_one_start(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    replicas = [
        RedisLimiter(redis_server.url, ledger_spend=Ledger({("acme", MONTH): to_nano(n)}))
        for n in range(1, 11)
    ]
    try:
        await asyncio.gather(*(charge(r, "acme", MONTH, 1) for r in replicas))
        spent = await replicas[0].spent("acme", MONTH)
        # Exactly one ledger's start, plus every charge once.
        assert spent - 10 in {to_nano(n) for n in range(1, 11)}
    finally:
        for r in replicas:
            await r.aclose()


async def test_seed_never_overwrites_an_existing_counter(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    raw = _client(redis_server.url)
    key = _key("acme", MONTH)
    await raw.set(key, 7 * NANO)
    ledger = Ledger({("acme", MONTH): to_nano(99)})
    limiter = RedisLimiter(redis_server.url, ledger_spend=ledger)
    try:
        assert await limiter.spent("acme", MONTH) == 7 * NANO
        assert await admits(limiter, "acme", 7 * NANO + 1)
        assert ledger.asked == []  # an existing counter needs no seed
        assert await raw.get(key) == str(7 * NANO).encode()
        # The counter is the one value every replica adds to, in nano-dollars.
        await charge(limiter, "acme", MONTH, ONE_TOKEN_NANO)
        assert await raw.get(key) == str(7 * NANO + 150).encode()
    finally:
        await limiter.aclose()
        await raw.aclose()


@pytest.mark.parametrize("first", ["spent", "acquire", "finish"])
async def test_a_seeded_counter_expires_after_its_month(
    redis_server: RedisServer, first: str
) -> None:
    await _flushed(redis_server.url)
    raw = _client(redis_server.url)
    limiter = RedisLimiter(redis_server.url, ledger_spend=Ledger({("acme", MONTH): NANO}))
    key = _key("acme", MONTH)
    try:
        if first == "spent":
            await limiter.spent("acme", MONTH)
        elif first == "acquire":
            await admits(limiter, "acme", 2 * NANO)
        else:
            await charge(limiter, "acme", MONTH, 1)
        await charge(limiter, "acme", MONTH, NANO)  # INCRBY keeps the TTL
        ttl = await raw.ttl(key)
        # Longer than any month, so the counter outlives the month it counts.
        assert 31 * 24 * 3600 < ttl <= 40 * 24 * 3600
    finally:
        await limiter.aclose()
        await raw.aclose()


# What the scripts call inside Redis; commandstats counts these too, so they are left out.
_INSIDE_SCRIPTS = {"time", "get", "hmget", "hset", "pexpire", "del", "incr", "decr", "incrby",
                   "exists", "zadd", "zrem", "zcard", "zcount", "zremrangebyscore",
                   "pttl"}  # fmt: skip


async def commands_run(raw: aioredis.Redis) -> dict[str, int]:
    """Calls per command clients sent the server, but INFO (which asks)."""
    stats = await raw.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    return {name: n for name, n in calls.items() if name not in _INSIDE_SCRIPTS | {"info"}}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


async def test_a_request_costs_two_round_trips(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    raw = _client(redis_server.url)
    ledger = Ledger({("acme", MONTH): 1000})
    limiter = RedisLimiter(redis_server.url, ledger_spend=ledger)
    limits = rl(rpm=100, tpm=10_000, concurrent=4)
    budget = Budget(MONTH, NANO)
    try:
        # Another tenant's request loads the scripts, so what follows counts only their runs.
        warm = await limiter.acquire("warm", limits, 1, now=T0, budget=budget)
        assert warm.allowed
        await limiter.finish(
            "warm", limits, 1, 1, now=T0, charge=Charge(MONTH, 1), lease=warm.lease
        )

        # A month's first request seeds it: the script says so, SET NX, the script again.
        before = await commands_run(raw)
        first = await limiter.acquire("acme", limits, 300, now=T0, budget=budget)
        assert first.allowed
        assert _delta(before, await commands_run(raw)) == {"evalsha": 2, "set": 1}
        await limiter.finish(
            "acme", limits, 300, 7, now=T0, charge=Charge(MONTH, 150), lease=first.lease
        )

        # From then on: acquire and finish, one script each, nothing else.
        before = await commands_run(raw)
        second = await limiter.acquire("acme", limits, 300, now=T0, budget=budget)
        assert second.allowed
        await limiter.finish(
            "acme", limits, 300, 7, now=T0, charge=Charge(MONTH, 150), lease=second.lease
        )
        assert _delta(before, await commands_run(raw)) == {"evalsha": 2}
        assert (await limiter.remaining("acme", rl(tpm=10_000), now=T0)).remaining == 10_000 - 14
        assert await limiter.spent("acme", MONTH) == 1300
        assert ledger.asked == [("warm", MONTH), ("acme", MONTH)]

        # An end with nothing to change (no tokens to settle, no slot, no cost): none at all.
        before = await commands_run(raw)
        await limiter.finish("acme", rl(rpm=100), 0, 0, now=T0, charge=Charge(MONTH, 0))
        assert _delta(before, await commands_run(raw)) == {}
    finally:
        await limiter.aclose()
        await raw.aclose()


async def test_a_budget_above_2_to_the_53_nano_stays_exact(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    limit = 10**16  # $10 000 000
    memory = MemoryLimiter(Ledger({("acme", MONTH): limit - 1}))
    redis_limiter = RedisLimiter(
        redis_server.url, ledger_spend=Ledger({("acme", MONTH): limit - 1})
    )
    try:
        assert await admits(memory, "acme", limit)
        assert await redis_limiter.spent("acme", MONTH) == limit - 1  # INCRBY/GET: exact
        assert await admits(redis_limiter, "acme", limit)
    finally:
        await redis_limiter.aclose()


@pytest.mark.parametrize("operation", ["acquire", "finish"])
async def test_a_counter_lost_right_after_its_seed_is_seeded_again(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    await _flushed(redis_server.url)
    raw = _client(redis_server.url)
    limiter = RedisLimiter(redis_server.url, ledger_spend=Ledger({("acme", MONTH): 40}))
    limits = rl(concurrent=1)
    seed = limiter._seed
    seeds = 0

    async def seed_then_lose_it(tenant: str, period: str) -> None:
        # Redis is flushed between the seed and the script that needed it (the first time).
        nonlocal seeds
        await seed(tenant, period)
        seeds += 1
        if seeds == 1:
            await raw.delete(_key(tenant, period))

    monkeypatch.setattr(limiter, "_seed", seed_then_lose_it)
    try:
        if operation == "acquire":
            decision = await limiter.acquire("acme", limits, 0, now=T0, budget=Budget(MONTH, 100))
            assert decision.allowed
        else:
            taken = await limiter.acquire("acme", limits, 0, now=T0)
            assert taken.allowed
            await limiter.finish(
                "acme", limits, 0, 0, now=T0, charge=Charge(MONTH, 2), lease=taken.lease
            )
            assert (await limiter.remaining("acme", limits, now=T0)).remaining == 1
            assert await raw.get(_key("acme", MONTH)) == b"42"
    finally:
        await limiter.aclose()
        await raw.aclose()


@pytest.mark.parametrize("operation", ["spent", "acquire", "finish"])
async def test_redis_refusing_connections_is_limiter_unavailable_at_once(operation: str) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    limiter = build_limiter(LimitsConfig(backend="redis", url=url), Ledger())
    assert isinstance(limiter, RedisLimiter)
    started = time.monotonic()
    try:
        with pytest.raises(LimiterUnavailable) as caught:
            if operation == "spent":
                await limiter.spent("acme", MONTH)
            elif operation == "acquire":
                await admits(limiter, "acme", NANO)
            else:
                await charge(limiter, "acme", MONTH, NANO)
    finally:
        await limiter.aclose()
    assert time.monotonic() - started < 0.5
    assert "hunter2" not in str(caught.value)  # never leak the password


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung Redis)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield int(listener.getsockname()[1])
    listener.close()


@pytest.mark.parametrize("operation", ["acquire", "finish"])
async def test_a_hung_redis_is_limiter_unavailable_within_the_timeout(
    silent_server: int, operation: str
) -> None:
    url = f"redis://127.0.0.1:{silent_server}/0"
    limiter = build_limiter(LimitsConfig(backend="redis", url=url), Ledger())
    started = time.monotonic()
    try:
        with pytest.raises(LimiterUnavailable):
            if operation == "acquire":
                await admits(limiter, "acme", NANO)
            else:
                await charge(limiter, "acme", MONTH, NANO)
    finally:
        await limiter.aclose()
    # build_limiter sets 1 s socket timeouts: no retry loop stretches them.
    assert 0.9 < time.monotonic() - started < 2.5


async def test_a_month_is_seeded_once_redis_is_back() -> None:
    server = RedisServer(redis_binary())
    ledger = Ledger({("acme", MONTH): to_nano(4)})
    limiter = RedisLimiter(server.url, ledger_spend=ledger)
    try:
        with pytest.raises(LimiterUnavailable):
            await limiter.spent("acme", MONTH)  # not started yet
        with pytest.raises(LimiterUnavailable):
            await admits(limiter, "acme", to_nano(4))
        server.start()
        # The failed attempts did not count as seeded: the ledger's spend is there.
        assert not await admits(limiter, "acme", to_nano(4))
        assert await limiter.spent("acme", MONTH) == to_nano(4)
    finally:
        await limiter.aclose()
        server.stop()


async def test_a_flushed_redis_reseeds_the_month_from_the_ledger(
    redis_server: RedisServer,
) -> None:
    await _flushed(redis_server.url)
    ledger = Ledger({("acme", MONTH): to_nano(4)})
    limiter = RedisLimiter(redis_server.url, ledger_spend=ledger)
    budget = to_nano(5)
    try:
        await charge(limiter, "acme", MONTH, to_nano(1))
        assert not await admits(limiter, "acme", budget)
        # The charge is now in the ledger too (Accounts.finish records it).
        ledger.spend[("acme", MONTH)] = to_nano(5)
        await _flushed(redis_server.url)
        # Still refused: the month starts again from the ledger, not from zero.
        assert not await admits(limiter, "acme", budget)
        assert await limiter.spent("acme", MONTH) == to_nano(5)
        assert ledger.asked == [("acme", MONTH)] * 2
        # A charge after the flush also starts from the ledger, not from itself.
        await _flushed(redis_server.url)
        await charge(limiter, "acme", MONTH, 1)
        assert await limiter.spent("acme", MONTH) == to_nano(5) + 1
    finally:
        await limiter.aclose()


async def test_a_restarted_redis_does_not_zero_the_month() -> None:
    server = RedisServer(redis_binary()).start()
    ledger = Ledger({("acme", MONTH): to_nano(4)})
    limiter = RedisLimiter(server.url, ledger_spend=ledger)
    try:
        await charge(limiter, "acme", MONTH, to_nano(1))
        assert await limiter.spent("acme", MONTH) == to_nano(5)
        ledger.spend[("acme", MONTH)] = to_nano(5)  # Accounts.finish recorded it
        server.stop()
        server.start()  # same port, empty: the counter is gone
        with contextlib.suppress(LimiterUnavailable):
            await limiter.spent("acme", MONTH)  # the pooled connection died with the server
        assert not await admits(limiter, "acme", to_nano(5))
        assert await limiter.spent("acme", MONTH) == to_nano(5)
    finally:
        await limiter.aclose()
        server.stop()


async def test_more_concurrent_requests_than_pooled_connections(
    redis_server: RedisServer,
) -> None:
    # The client pools 64 connections; the rest wait for one instead of failing.
    await _flushed(redis_server.url)
    limiter = build_limiter(LimitsConfig(backend="redis", url=redis_server.url), Ledger())
    limits = rl(rpm=1000, concurrent=1000)
    budget = Budget(MONTH, NANO)

    async def request() -> bool:
        decision = await limiter.acquire("acme", limits, 0, now=T0, budget=budget)
        await limiter.finish(
            "acme", limits, 0, 0, now=T0, charge=Charge(MONTH, to_nano(0.001)), lease=decision.lease
        )
        return decision.allowed

    try:
        assert await asyncio.gather(*(request() for _ in range(150))) == [True] * 150
        assert await limiter.spent("acme", MONTH) == to_nano(0.15)
        assert (await limiter.remaining("acme", limits, now=T0)).remaining == 1000 - 150
        in_flight = await limiter.remaining("acme", rl(concurrent=1000), now=T0)
        assert (in_flight.limit_name, in_flight.remaining) == (CONCURRENCY, 1000)
    finally:
        await limiter.aclose()


async def test_build_limiter_passes_the_ledger_to_either_backend(
    redis_server: RedisServer,
) -> None:
    await _flushed(redis_server.url)
    for config in (LimitsConfig(), LimitsConfig(backend="redis", url=redis_server.url)):
        limiter = build_limiter(config, Ledger({("acme", MONTH): 42}))
        try:
            assert isinstance(limiter, RedisLimiter if config.url else MemoryLimiter)
            assert await limiter.spent("acme", MONTH) == 42
        finally:
            await limiter.aclose()


# --- Money and months. ---


def test_to_nano_rounds_to_whole_nano_dollars() -> None:
    assert to_nano(0.00000015) == ONE_TOKEN_NANO
    assert to_nano(1.1) + to_nano(2.2) == to_nano(3.3)
    assert to_nano(0.0000000014) == 1
    assert to_nano(0) == 0
    assert NANO == 10**9


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("now", "seconds"),
    [
        (_utc(2026, 12, 31, 23, 59, 59), 1.0),
        (_utc(2026, 12, 31, 23, 59, 59) + 0.25, 0.75),
        (_utc(2026, 2, 14, 12), 14.5 * 86400),  # to March 1st
        (_utc(2028, 2, 14, 12), 15.5 * 86400),  # leap year: February has 29 days
        (_utc(2026, 3, 1), 31 * 86400),  # a month's very first second: all of it is left
        (_utc(2026, 4, 30, 23, 59, 59), 1.0),
        (_utc(2026, 11, 15, 6, 30), 15 * 86400 + 17.5 * 3600),
    ],
)
def test_seconds_to_next_month(now: float, seconds: float) -> None:
    assert seconds_to_next_month(now) == seconds


def test_seconds_to_next_month_ignores_the_local_time_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # UTC+14: local time is already January while UTC is still in December.
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    try:
        assert seconds_to_next_month(_utc(2026, 12, 31, 12)) == 12 * 3600
    finally:
        monkeypatch.undo()
        time.tzset()
