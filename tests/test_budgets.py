"""extproc.budgets: one suite over both stores, then what only Redis can show (replicas,
seeding races, an unreachable or restarted server), and the month arithmetic."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from extproc.budgets import (
    NANO,
    Budgets,
    LedgerSpend,
    MemoryBudgets,
    RedisBudgets,
    build_budgets,
    seconds_to_next_month,
)
from extproc.limits import LimiterUnavailable
from tests.redis_server import RedisServer, redis_binary, redis_server
from tests.support import free_port

__all__ = ["redis_server"]  # the fixture is used by name

MONTH = "2026-11"
NEXT_MONTH = "2026-12"
# The cost of one gpt-4o-mini input token ($0.15 per million): 150 nano-dollars.
ONE_TOKEN_USD = 0.00000015


class Ledger:
    """A usage ledger's month spend, recording who asked."""

    def __init__(self, spend: dict[tuple[str, str], float] | None = None) -> None:
        self.spend = dict(spend or {})
        self.asked: list[tuple[str, str]] = []

    def __call__(self, tenant: str, period: str) -> float:
        self.asked.append((tenant, period))
        return self.spend.get((tenant, period), 0.0)


Make = Callable[[LedgerSpend], Budgets]


def _client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)


async def _flushed(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Builds budget stores of one kind; Redis ones share one freshly flushed database, as
    the replicas of a deployment do."""
    made: list[Budgets] = []
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        await _flushed(server.url)

        def build(spend: LedgerSpend) -> Budgets:
            store = RedisBudgets(_client(server.url), spend)
            made.append(store)
            return store
    else:

        def build(spend: LedgerSpend) -> Budgets:
            store = MemoryBudgets(spend)
            made.append(store)
            return store

    yield build
    for store in made:
        await store.aclose()


# --- Both stores. ---


async def test_a_month_starts_from_the_ledger_which_is_read_once(make: Make) -> None:
    ledger = Ledger({("acme", MONTH): 12.5})
    budgets = make(ledger)
    assert await budgets.spent("acme", MONTH) == 12.5
    await budgets.charge("acme", MONTH, 0.25)
    assert await budgets.spent("acme", MONTH) == 12.75
    assert ledger.asked == [("acme", MONTH)]


async def test_a_first_charge_also_starts_from_the_ledger(make: Make) -> None:
    ledger = Ledger({("acme", MONTH): 1.1})
    budgets = make(ledger)
    await budgets.charge("acme", MONTH, 2.2)
    # Counted in nano-dollars: 1.1 + 2.2 is 3.3, not 3.3000000000000003.
    assert 1.1 + 2.2 != 3.3
    assert await budgets.spent("acme", MONTH) == 3.3
    assert ledger.asked == [("acme", MONTH)]


async def test_many_tiny_charges_add_up_exactly(make: Make) -> None:
    budgets = make(Ledger())
    for _ in range(1000):
        await budgets.charge("acme", MONTH, ONE_TOKEN_USD)
    # A float sum would drift; the same 1000 charges in nano-dollars do not.
    assert math.fsum([ONE_TOKEN_USD] * 1000) == 0.00015
    assert sum([ONE_TOKEN_USD] * 1000) != 0.00015
    assert await budgets.spent("acme", MONTH) == 0.00015


async def test_concurrent_charges_are_all_counted(make: Make) -> None:
    budgets = make(Ledger())
    await asyncio.gather(*(budgets.charge("acme", MONTH, 0.001) for _ in range(100)))
    assert await budgets.spent("acme", MONTH) == 0.1


async def test_months_are_separate(make: Make) -> None:
    ledger = Ledger({("acme", MONTH): 7.0, ("acme", NEXT_MONTH): 0.5})
    budgets = make(ledger)
    await budgets.charge("acme", MONTH, 1.0)
    assert await budgets.spent("acme", NEXT_MONTH) == 0.5
    await budgets.charge("acme", NEXT_MONTH, 0.25)
    assert await budgets.spent("acme", MONTH) == 8.0
    assert await budgets.spent("acme", NEXT_MONTH) == 0.75
    assert sorted(ledger.asked) == [("acme", MONTH), ("acme", NEXT_MONTH)]


async def test_tenants_are_separate(make: Make) -> None:
    ledger = Ledger({("acme", MONTH): 3.0})
    budgets = make(ledger)
    await budgets.charge("acme", MONTH, 1.0)
    await budgets.charge("globex", MONTH, 0.125)
    assert await budgets.spent("acme", MONTH) == 4.0
    assert await budgets.spent("globex", MONTH) == 0.125
    assert await budgets.spent("initech", MONTH) == 0.0


async def test_a_big_month_stays_exact(make: Make) -> None:
    # 2000 USD is 2 * 10**12 nano-dollars: far inside Redis' 64-bit integers.
    budgets = make(Ledger({("acme", MONTH): 1999.999999999}))
    await budgets.charge("acme", MONTH, 0.000000001)
    assert await budgets.spent("acme", MONTH) == 2000.0


# --- Redis only. ---


async def test_two_replicas_share_one_month(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    a = RedisBudgets(_client(redis_server.url), Ledger({("acme", MONTH): 2.0}))
    # The second replica's ledger differs (it may be another host's): the first seed wins.
    b = RedisBudgets(_client(redis_server.url), Ledger({("acme", MONTH): 5.0}))
    try:
        await a.charge("acme", MONTH, 0.25)
        await b.charge("acme", MONTH, 0.5)
        assert await a.spent("acme", MONTH) == 2.75
        assert await b.spent("acme", MONTH) == 2.75
        await asyncio.gather(*(store.charge("acme", MONTH, ONE_TOKEN_USD) for store in [a, b] * 50))
        assert await a.spent("acme", MONTH) == 2.75 + 100 * 150 / NANO
    finally:
        await a.aclose()
        await b.aclose()


async def test_seed_never_overwrites_an_existing_counter(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    key = f"checkstream:budget:{{acme}}:{MONTH}"
    await raw.set(key, 7 * NANO)
    ledger = Ledger({("acme", MONTH): 99.0})
    budgets = RedisBudgets(_client(redis_server.url), ledger)
    try:
        assert await budgets.spent("acme", MONTH) == 7.0
        assert ledger.asked == []  # an existing counter needs no seed
        assert await raw.get(key) == str(7 * NANO).encode()
        # The counter is the one value every replica adds to, in nano-dollars.
        await budgets.charge("acme", MONTH, ONE_TOKEN_USD)
        assert await raw.get(key) == str(7 * NANO + 150).encode()
    finally:
        await budgets.aclose()
        await raw.aclose()


async def test_a_seeded_counter_expires_after_its_month(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    budgets = RedisBudgets(_client(redis_server.url), Ledger({("acme", MONTH): 1.0}))
    try:
        await budgets.charge("acme", MONTH, 1.0)
        ttl = await raw.ttl(f"checkstream:budget:{{acme}}:{MONTH}")
        # Longer than any month, so the counter outlives the month it counts.
        assert 31 * 24 * 3600 < ttl <= 40 * 24 * 3600
    finally:
        await budgets.aclose()
        await raw.aclose()


@pytest.mark.parametrize("operation", ["spent", "charge"])
async def test_redis_refusing_connections_is_limiter_unavailable_at_once(operation: str) -> None:
    budgets = build_budgets(f"redis://:hunter2@127.0.0.1:{free_port()}/0", Ledger())
    assert isinstance(budgets, RedisBudgets)
    started = time.monotonic()
    try:
        with pytest.raises(LimiterUnavailable) as caught:
            if operation == "spent":
                await budgets.spent("acme", MONTH)
            else:
                await budgets.charge("acme", MONTH, 1.0)
    finally:
        await budgets.aclose()
    assert time.monotonic() - started < 0.5
    assert "hunter2" not in str(caught.value)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung Redis)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield int(listener.getsockname()[1])
    listener.close()


async def test_a_hung_redis_is_limiter_unavailable_within_the_timeout(silent_server: int) -> None:
    budgets = build_budgets(f"redis://127.0.0.1:{silent_server}/0", Ledger())
    started = time.monotonic()
    try:
        with pytest.raises(LimiterUnavailable):
            await budgets.charge("acme", MONTH, 1.0)
    finally:
        await budgets.aclose()
    # build_budgets sets 1 s socket timeouts: no retry loop stretches them.
    assert 0.9 < time.monotonic() - started < 2.5


async def test_a_month_is_seeded_once_redis_is_back() -> None:
    server = RedisServer(redis_binary())
    ledger = Ledger({("acme", MONTH): 4.0})
    budgets = build_budgets(server.url, ledger)
    try:
        with pytest.raises(LimiterUnavailable):
            await budgets.spent("acme", MONTH)  # not started yet
        server.start()
        # The failed attempt did not count as seeded: the ledger's spend is there.
        assert await budgets.spent("acme", MONTH) == 4.0
    finally:
        await budgets.aclose()
        server.stop()


async def test_more_concurrent_charges_than_pooled_connections(
    redis_server: RedisServer,
) -> None:
    await _flushed(redis_server.url)
    budgets = build_budgets(redis_server.url, Ledger())
    try:
        await asyncio.gather(*(budgets.charge("acme", MONTH, 0.001) for _ in range(150)))
        assert await budgets.spent("acme", MONTH) == 0.15
    finally:
        await budgets.aclose()


async def test_a_restarted_redis_does_not_zero_the_month() -> None:
    server = RedisServer(redis_binary()).start()
    ledger = Ledger({("acme", MONTH): 4.0})
    budgets = build_budgets(server.url, ledger)
    try:
        await budgets.charge("acme", MONTH, 1.0)
        assert await budgets.spent("acme", MONTH) == 5.0
        # The charge is now in the ledger too (Accounts.finish records it).
        ledger.spend[("acme", MONTH)] = 5.0
        server.stop()
        server.start()  # same port, empty: the counter is gone
        with contextlib.suppress(LimiterUnavailable):
            await budgets.spent("acme", MONTH)  # the pooled connection died with the server
        # The module's promise: "a fresh Redis does not zero a month".
        assert await budgets.spent("acme", MONTH) == 5.0
    finally:
        await budgets.aclose()
        server.stop()


def test_build_budgets_picks_the_store() -> None:
    assert isinstance(build_budgets(None, Ledger()), MemoryBudgets)


# --- seconds_to_next_month. ---


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
