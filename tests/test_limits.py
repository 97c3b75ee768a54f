"""checkstream.limits (memory.py, redis.py): one suite over both backends, then what only
Redis can show (replicas).

Clocks are passed in (`now`), so nothing sleeps and every expected number is exact.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from checkstream.config.model import LimitsConfig, RateLimitConfig
from checkstream.limits import build_limiter
from checkstream.limits.base import Limiter
from checkstream.limits.decisions import CONCURRENCY, REQUESTS, TOKENS, Decision, LimiterUnavailable
from checkstream.limits.memory import MemoryLimiter
from checkstream.limits.redis import RedisLimiter
from tests.redis_server import RedisServer, redis_binary, redis_server
from tests.support import free_port

__all__ = ["redis_server"]  # the fixture is used by name

T0 = 1_700_000_000.0


def rl(
    rpm: int | None = None, tpm: int | None = None, concurrent: int | None = None
) -> RateLimitConfig:
    return RateLimitConfig(
        requests_per_minute=rpm, tokens_per_minute=tpm, max_concurrent_requests=concurrent
    )


async def _flushed(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    lim: Limiter
    if request.param == "memory":
        lim = MemoryLimiter()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        await _flushed(server.url)
        lim = RedisLimiter(server.url)
    yield lim
    await lim.aclose()


# --- Both backends. ---


async def test_rpm_allows_exactly_n_then_refuses_with_retry_after_and_reset(
    limiter: Limiter,
) -> None:
    limits = rl(rpm=5)
    for expected_remaining in (4, 3, 2, 1, 0):
        d = await limiter.acquire("acme", limits, 0, now=T0)
        # reset: when the whole quota is back; each request takes 60/5 = 12 s to drain.
        assert d == Decision(
            True, REQUESTS, 5, expected_remaining, T0 + 12 * (5 - expected_remaining), 0.0
        )
    refused = await limiter.acquire("acme", limits, 0, now=T0)
    # GCRA: the next request fits once one request's worth has drained, in 12 s.
    assert refused == Decision(False, REQUESTS, 5, 0, T0 + 60, 12.0)
    assert not (await limiter.acquire("acme", limits, 0, now=T0 + 11.999)).allowed
    # The refusals took nothing: after 12 s exactly one more fits.
    assert (await limiter.acquire("acme", limits, 0, now=T0 + 12)).allowed
    assert not (await limiter.acquire("acme", limits, 0, now=T0 + 12)).allowed
    # A full minute idle: the full burst again.
    later = T0 + 12 + 60
    assert [(await limiter.acquire("acme", limits, 0, now=later)).allowed for _ in range(6)] == [
        True
    ] * 5 + [False]


async def test_tokens_prepaid_then_settled(limiter: Limiter) -> None:
    limits = rl(tpm=1000)
    d = await limiter.acquire("acme", limits, 600, now=T0)
    assert (d.allowed, d.limit_name, d.remaining) == (True, TOKENS, 400)
    refused = await limiter.acquire("acme", limits, 600, now=T0)
    assert (refused.allowed, refused.limit_name) == (False, TOKENS)
    assert refused.retry_after_s == 12.0  # 200 tokens over, at 1000/min

    # The answer used only 100: the refund makes room for another 600.
    await limiter.finish("acme", limits, reserved_tokens=600, actual_tokens=100, now=T0)
    assert (await limiter.remaining("acme", limits, now=T0)).remaining == 900
    assert (await limiter.acquire("acme", limits, 600, now=T0)).allowed  # level 700

    # This one used 900: the overrun is charged, up to full...
    await limiter.finish("acme", limits, reserved_tokens=600, actual_tokens=900, now=T0)
    full = await limiter.remaining("acme", limits, now=T0)
    assert (full.allowed, full.remaining) == (True, 0)  # a token-free request still fits
    # ...and beyond: 200 tokens of debt block even a token-free request for 12 s.
    await limiter.finish("acme", limits, reserved_tokens=0, actual_tokens=200, now=T0)
    debt = await limiter.acquire("acme", limits, 0, now=T0)
    assert (debt.allowed, debt.limit_name, debt.retry_after_s) == (False, TOKENS, 12.0)
    assert debt.reset == T0 + 72  # 1200 tokens at 1000/min
    assert (await limiter.acquire("acme", limits, 0, now=T0 + 12)).allowed


async def test_cost_above_the_limit_never_fits(limiter: Limiter) -> None:
    d = await limiter.acquire("acme", rl(tpm=100), 101, now=T0)
    assert (d.allowed, d.limit_name, d.remaining, d.retry_after_s) == (False, TOKENS, 100, 60.0)


async def test_concurrency_slots_and_release(limiter: Limiter) -> None:
    limits = rl(concurrent=2)
    a = await limiter.acquire("acme", limits, 0, now=T0)
    b = await limiter.acquire("acme", limits, 0, now=T0)
    assert (a.allowed, a.limit_name, a.remaining) == (True, CONCURRENCY, 1)
    assert (b.allowed, b.remaining) == (True, 0)
    assert a.lease and b.lease and a.lease != b.lease
    c = await limiter.acquire("acme", limits, 0, now=T0)
    assert (c.allowed, c.limit_name, c.retry_after_s) == (False, CONCURRENCY, 1.0)
    assert c.lease is None  # refused: nothing to give back
    await limiter.finish("acme", limits, 0, 0, lease=a.lease)
    assert (await limiter.remaining("acme", limits, now=T0)).remaining == 1
    d = await limiter.acquire("acme", limits, 0, now=T0)
    assert d.allowed and d.lease
    for _ in range(3):  # releasing the same lease again frees nothing more
        await limiter.finish("acme", limits, 0, 0, lease=a.lease)
    assert (await limiter.remaining("acme", limits, now=T0)).remaining == 0
    await limiter.finish("acme", limits, 0, 0, lease=b.lease)
    await limiter.finish("acme", limits, 0, 0, now=T0, lease=d.lease)
    assert (await limiter.remaining("acme", limits, now=T0)).remaining == 2


async def test_a_lease_nobody_renews_expires_after_lease_s_even_under_traffic(
    limiter: Limiter,
) -> None:
    limits = rl(concurrent=1)
    held = await limiter.acquire("acme", limits, 0, now=T0)
    assert held.allowed
    # Its holder died: no renewal, no release. The tenant keeps asking every second.
    for second in range(1, 30):
        assert not (await limiter.acquire("acme", limits, 0, now=T0 + second)).allowed
    assert (await limiter.remaining("acme", limits, now=T0 + 29.999)).remaining == 0
    assert (await limiter.remaining("acme", limits, now=T0 + 30)).remaining == 1
    assert (await limiter.acquire("acme", limits, 0, now=T0 + 30)).allowed
    # The dead holder's late release (were it to come) frees nothing that is not its own.
    assert held.lease is not None
    await limiter.finish("acme", limits, 0, 0, lease=held.lease)
    assert not (await limiter.acquire("acme", limits, 0, now=T0 + 31)).allowed


async def test_a_renewed_lease_lives_on(limiter: Limiter) -> None:
    limits = rl(concurrent=2)
    first = await limiter.acquire("acme", limits, 0, now=T0)
    assert first.allowed and first.lease
    await limiter.renew(now=T0 + 20)  # the heartbeat: this process's request still runs
    assert (await limiter.remaining("acme", limits, now=T0 + 49.999)).remaining == 1
    assert (await limiter.remaining("acme", limits, now=T0 + 50)).remaining == 2
    second = await limiter.acquire("acme", limits, 0, now=T0 + 50)
    assert second.allowed
    # The expired lease is never revived by a renewal (its slot may be another's by now).
    await limiter.renew(now=T0 + 51)
    assert (await limiter.remaining("acme", limits, now=T0 + 51)).remaining == 1
    assert (await limiter.remaining("acme", limits, now=T0 + 80.999)).remaining == 1
    assert (await limiter.remaining("acme", limits, now=T0 + 81)).remaining == 2


async def test_a_refusal_by_one_limit_takes_nothing_from_the_others(limiter: Limiter) -> None:
    limits = rl(rpm=10, tpm=1000, concurrent=1)
    held = await limiter.acquire("acme", limits, 100, now=T0)
    assert held.allowed
    # Refused by concurrency: no request, no tokens taken.
    by_slot = await limiter.acquire("acme", limits, 100, now=T0)
    assert (by_slot.allowed, by_slot.limit_name) == (False, CONCURRENCY)
    await limiter.finish("acme", limits, 0, 0, lease=held.lease)
    # Refused by tokens: no request, no slot taken.
    by_tokens = await limiter.acquire("acme", limits, 950, now=T0)
    assert (by_tokens.allowed, by_tokens.limit_name) == (False, TOKENS)
    # Refused by requests (another tenant, at its request limit): no tokens, no slot taken.
    tight = rl(rpm=1, tpm=1000, concurrent=5)
    assert (await limiter.acquire("beta", tight, 10, now=T0)).allowed
    by_rpm = await limiter.acquire("beta", tight, 10, now=T0)
    assert (by_rpm.allowed, by_rpm.limit_name) == (False, REQUESTS)

    acme = rl(rpm=10)
    assert (await limiter.remaining("acme", acme, now=T0)).remaining == 9
    assert (await limiter.remaining("acme", rl(tpm=1000), now=T0)).remaining == 900
    assert (await limiter.remaining("acme", rl(concurrent=1), now=T0)).remaining == 1
    assert (await limiter.remaining("beta", rl(tpm=1000), now=T0)).remaining == 990
    assert (await limiter.remaining("beta", rl(concurrent=5), now=T0)).remaining == 4


async def test_tenants_are_isolated(limiter: Limiter) -> None:
    limits = rl(rpm=2, tpm=100, concurrent=1)
    held = await limiter.acquire("acme", limits, 100, now=T0)
    assert held.allowed and held.lease
    assert not (await limiter.acquire("acme", limits, 0, now=T0)).allowed
    assert not (await limiter.acquire("acme", limits, 0, now=T0 + 29)).allowed  # slot held
    # Look-alike ids are other tenants, with their own full quotas.
    for other in ("acme-corp", "acme.corp", "Acme"):
        assert await limiter.remaining(other, limits, now=T0) == Decision(
            True, REQUESTS, 2, 2, T0, 0.0
        )
        d = await limiter.acquire(other, limits, 10, now=T0)
        assert (d.allowed, d.limit_name, d.remaining) == (True, CONCURRENCY, 0)
    # acme's lease given as another tenant's frees nothing anywhere.
    await limiter.finish("acme-corp", limits, 0, 0, lease=held.lease)
    assert not (await limiter.acquire("acme", limits, 0, now=T0 + 29)).allowed


@pytest.mark.parametrize("bad", ["", "a}b", "a{b", "x:y", "acme}:rpm", "-lead", "a" * 129])
async def test_tenant_ids_that_could_escape_their_keys_are_refused(
    limiter: Limiter, bad: str
) -> None:
    with pytest.raises(ValueError, match="tenant"):
        await limiter.acquire(bad, rl(rpm=1), 0, now=T0)


async def test_remaining_is_consistent_and_takes_nothing(limiter: Limiter) -> None:
    limits = rl(rpm=60, tpm=6000, concurrent=10)
    fresh = await limiter.remaining("acme", limits, now=T0)
    assert fresh == Decision(True, REQUESTS, 60, 60, T0, 0.0)
    await limiter.acquire("acme", limits, 3000, now=T0)
    last = await limiter.acquire("acme", limits, 3000, now=T0)
    # Tightest share left: tokens (0/6000) before requests (58/60) and slots (8/10).
    assert last == Decision(True, TOKENS, 6000, 0, T0 + 60, 0.0)
    assert await limiter.remaining("acme", limits, now=T0) == last
    assert await limiter.remaining("acme", limits, now=T0) == last  # still nothing taken
    later = await limiter.remaining("acme", limits, now=T0 + 29)
    assert later == Decision(True, TOKENS, 6000, 2900, T0 + 60, 0.0)
    assert (await limiter.remaining("acme", rl(rpm=60), now=T0 + 30)).remaining == 60
    assert (await limiter.remaining("acme", rl(concurrent=10), now=T0 + 29)).remaining == 8
    # Another 3100 now would be refused, but tenant-info asks with no tokens: still allowed.
    assert not (await limiter.acquire("acme", limits, 3101, now=T0 + 29)).allowed


async def test_no_limits_configured_allows_without_headers(limiter: Limiter) -> None:
    assert await limiter.acquire("acme", rl(), 10**6, now=T0) == Decision(
        True, None, None, None, None, 0.0
    )


async def test_a_clock_going_backwards_refills_nothing(limiter: Limiter) -> None:
    limits = rl(rpm=1)
    assert (await limiter.acquire("acme", limits, 0, now=T0)).allowed
    assert not (await limiter.acquire("acme", limits, 0, now=T0 - 3600)).allowed
    assert (await limiter.acquire("acme", limits, 0, now=T0 + 60)).allowed


# --- Redis only. ---


async def test_backends_decide_identically_on_a_random_sequence(
    redis_server: RedisServer,
) -> None:
    await _flushed(redis_server.url)
    memory = MemoryLimiter(heartbeat=False)
    shared = RedisLimiter(redis_server.url, heartbeat=False)
    rng = random.Random(7)
    configs = [rl(7, 500, 3), rl(None, 1234, None), rl(3, None, 2), rl(2), rl(100, 100_000, 50)]
    now = T0
    held: dict[tuple[str, int], list[tuple[str, str]]] = {}
    seen: set[tuple[bool, str | None]] = set()
    try:
        for _ in range(600):
            now += rng.choice([0, 0, 0.001, 0.37, 1.5, 9.999, 61])
            tenant, ci = rng.choice(["a", "b"]), rng.randrange(len(configs))
            limits, op = configs[ci], rng.random()
            if op < 0.55:
                tokens = rng.choice([0, 1, 50, 499, 500, 501, 1300])
                dm = await memory.acquire(tenant, limits, tokens, now=now)
                dr = await shared.acquire(tenant, limits, tokens, now=now)
                assert dm == dr
                seen.add((dm.allowed, dm.limit_name))
                if dm.allowed and dm.lease and dr.lease:
                    held.setdefault((tenant, ci), []).append((dm.lease, dr.lease))
            elif op < 0.75:
                reserved, actual = rng.randrange(600), rng.randrange(900)
                await memory.finish(tenant, limits, reserved, actual, now=now)
                await shared.finish(tenant, limits, reserved, actual, now=now)
            elif op < 0.9 and held.get((tenant, ci)):
                lease_m, lease_r = held[(tenant, ci)].pop()
                await memory.finish(tenant, limits, 0, 0, lease=lease_m)
                await shared.finish(tenant, limits, 0, 0, lease=lease_r)
            else:
                assert await memory.remaining(tenant, limits, now=now) == await shared.remaining(
                    tenant, limits, now=now
                )
    finally:
        await shared.aclose()
    # The sequence really exercised every kind of refusal, not only easy allows.
    assert {(False, REQUESTS), (False, TOKENS), (False, CONCURRENCY)} <= seen


async def test_two_replicas_share_exact_counts(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    # Two instances = two connection pools, as two gateway replicas would have.
    replicas = [RedisLimiter(redis_server.url), RedisLimiter(redis_server.url)]
    try:
        limits = rl(rpm=50)
        decisions = await asyncio.gather(
            *(replicas[i % 2].acquire("acme", limits, 0, now=T0) for i in range(200))
        )
        assert sum(d.allowed for d in decisions) == 50
        assert {d.retry_after_s for d in decisions if not d.allowed} == {1.2}

        slots = rl(concurrent=10)
        decisions = await asyncio.gather(
            *(replicas[i % 2].acquire("beta", slots, 0, now=T0) for i in range(200))
        )
        assert sum(d.allowed for d in decisions) == 10
    finally:
        for r in replicas:
            await r.aclose()


async def test_keys_are_namespaced_per_tenant_and_expire(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    lim = RedisLimiter(redis_server.url, lease_s=300)
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await lim.acquire("acme", rl(rpm=60, tpm=600, concurrent=2), 60, now=time.time())
        keys = sorted(str(k) for k in await client.keys("*"))
        assert keys == [
            "checkstream:limits:{acme}:leases",
            "checkstream:limits:{acme}:rpm",
            "checkstream:limits:{acme}:tpm",
        ]
        ttls = {k.rsplit(":", 1)[1]: await client.pttl(k) for k in keys}
        # rpm: 1 request drains in 1 s; tpm: 60 of 600/min in 6 s; plus a 1 s margin.
        assert 0 < ttls["rpm"] <= 2_000
        assert 5_000 < ttls["tpm"] <= 7_000
        assert 290_000 < ttls["leases"] <= 300_000
    finally:
        await lim.aclose()
        await client.aclose()


async def test_now_none_uses_the_redis_clock(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    lim = RedisLimiter(redis_server.url)
    try:
        before = time.time()
        d = await lim.acquire("acme", rl(rpm=1), 0)
        assert d.allowed and d.reset is not None
        # Same machine, so the server clock agrees with ours within test slack.
        assert before + 59 <= d.reset <= time.time() + 61
        refused = await lim.acquire("acme", rl(rpm=1), 0)
        assert not refused.allowed and 58 < refused.retry_after_s <= 60
        await lim.finish("acme", rl(tpm=10), 5, 1)
        assert (await lim.remaining("acme", rl(rpm=1))).remaining == 0
    finally:
        await lim.aclose()


async def test_unreachable_redis_raises_limiter_unavailable() -> None:
    lim = RedisLimiter(f"redis://:hunter2@127.0.0.1:{free_port()}/0", timeout_s=0.5)
    try:
        for call in (
            lim.acquire("acme", rl(rpm=1), 0, now=T0),
            lim.finish("acme", rl(tpm=10), 5, 1, now=T0),
            lim.finish("acme", rl(concurrent=1), 0, 0, lease="some-lease"),
            lim.remaining("acme", rl(rpm=1), now=T0),
        ):
            with pytest.raises(LimiterUnavailable, match="unavailable") as caught:
                await call
            assert "hunter2" not in str(caught.value)  # never leak the password
    finally:
        await lim.aclose()


async def test_redis_going_down_mid_life_raises_limiter_unavailable() -> None:
    server = RedisServer(redis_binary()).start()
    lim = RedisLimiter(server.url, timeout_s=0.5)
    try:
        assert (await lim.acquire("acme", rl(rpm=5), 0, now=T0)).allowed
        server.stop()
        with pytest.raises(LimiterUnavailable, match=r"127\.0\.0\.1"):
            await lim.acquire("acme", rl(rpm=5), 0, now=T0)
    finally:
        server.stop()
        await lim.aclose()


async def test_a_killed_replicas_slots_free_within_lease_s_under_traffic(
    redis_server: RedisServer,
) -> None:
    await _flushed(redis_server.url)
    limits = rl(concurrent=2)
    dead = RedisLimiter(redis_server.url, lease_s=1.5)
    alive = RedisLimiter(redis_server.url, lease_s=1.5)
    try:
        for _ in range(2):  # Redis's clock (now=None), as in production
            assert (await dead.acquire("acme", limits, 0)).allowed
        # SIGKILL: no release, no heartbeat ever again.
        await dead.aclose()
        started = time.monotonic()
        admitted = False
        while not admitted:  # traffic all along: every attempt is an acquire
            assert time.monotonic() - started < 3.0, "the dead replica's slots never freed"
            admitted = (await alive.acquire("acme", limits, 0)).allowed
            await asyncio.sleep(0.05)
        assert time.monotonic() - started >= 1.0  # held while the leases were valid
    finally:
        await alive.aclose()


async def test_the_heartbeat_keeps_a_long_requests_lease(redis_server: RedisServer) -> None:
    await _flushed(redis_server.url)
    limits = rl(concurrent=1)
    holder = RedisLimiter(redis_server.url, lease_s=1.2)  # renews every 0.4 s
    other = RedisLimiter(redis_server.url, lease_s=1.2)
    try:
        held = await holder.acquire("acme", limits, 0)
        assert held.allowed and held.lease
        for _ in range(6):  # 3 s: two and a half leases
            await asyncio.sleep(0.5)
            assert not (await other.acquire("acme", limits, 0)).allowed
        await holder.finish("acme", limits, 0, 0, lease=held.lease)
        assert (await other.acquire("acme", limits, 0)).allowed
    finally:
        await holder.aclose()
        await other.aclose()


async def test_a_release_lost_to_a_redis_stall_is_retried() -> None:
    """Issue #19: a 4 s stall while streams end must not leave the tenant locked out."""
    server = RedisServer(redis_binary()).start()
    limits = rl(concurrent=2)
    # A 300 s lease: only the retried release can free the slots within this test.
    lim = RedisLimiter(server.url, timeout_s=0.5, lease_s=300, heartbeat=False)
    try:
        held = [await lim.acquire("acme", limits, 0) for _ in range(2)]
        assert all(d.allowed and d.lease for d in held)
        server.pause()
        try:
            for d in held:
                with pytest.raises(LimiterUnavailable):
                    await lim.finish("acme", limits, 0, 0, lease=d.lease)
        finally:
            server.resume()
        assert not (await lim.acquire("acme", limits, 0)).allowed  # still held in Redis
        await lim.renew()  # the next heartbeat
        assert (await lim.remaining("acme", limits)).remaining == 2
        await lim.renew()  # retried once only
    finally:
        await lim.aclose()
        server.stop()


def test_build_limiter_follows_the_config() -> None:
    assert isinstance(build_limiter(LimitsConfig()), MemoryLimiter)
    assert isinstance(
        build_limiter(LimitsConfig(backend="redis", url="redis://127.0.0.1:1/0")), RedisLimiter
    )
    with pytest.raises(ValueError, match=r"limits\.url"):
        build_limiter(LimitsConfig(backend="redis"))
    assert LimitsConfig().lease_s == 30


async def test_a_lease_another_worker_freed_is_no_longer_renewed(
    redis_server: RedisServer,
) -> None:
    """A deferred request is closed by whichever worker Envoy's access log reaches: the
    worker that admitted it must stop renewing (and remembering) its lease."""
    await _flushed(redis_server.url)
    limits = rl(concurrent=1)
    admitting = RedisLimiter(redis_server.url, lease_s=30, heartbeat=False)
    closing = RedisLimiter(redis_server.url, lease_s=30, heartbeat=False)
    try:
        held = await admitting.acquire("acme", limits, 0)
        kept = await admitting.acquire("other", limits, 0)
        assert held.allowed and held.lease and kept.allowed and kept.lease
        await closing.finish("acme", limits, 0, 0, lease=held.lease)
        await admitting.renew()
        assert list(admitting._book.held) == [kept.lease]  # the other tenant's still runs
        assert (await closing.acquire("acme", limits, 0)).allowed
    finally:
        await admitting.aclose()
        await closing.aclose()


async def test_a_renewal_forgets_leases_that_expired() -> None:
    limiter = MemoryLimiter(lease_s=30, heartbeat=False)
    limits = rl(concurrent=1)
    held = await limiter.acquire("acme", limits, 0, now=T0)
    assert held.allowed
    await limiter.acquire("acme", limits, 0, now=T0 + 31)  # sweeps the expired lease
    await limiter.renew(now=T0 + 32)
    assert held.lease not in limiter._book.held
