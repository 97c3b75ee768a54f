"""Per-tenant rate limits (requests per minute, tokens per minute, concurrent requests) and
monthly budgets.

Run by each extproc worker. One narrow async interface (`Limiter`) with two backends that
make identical decisions: `MemoryLimiter` (in-process, exact only with one extproc worker)
and `RedisLimiter` (one Lua script per operation, so several workers and replicas share
exact counts; design.md "Scaling out"). The shape follows envoyproxy/ratelimit: a small
interface, atomicity from the store.

Algorithm: GCRA, in its leaky-bucket form, per minute for requests and for tokens.
    Each limit ``L`` per minute is a bucket holding a *level* in integer units: one request (or
    one token) adds ``WINDOW_MS`` (60 000) units, and the bucket drains ``L`` units per
    millisecond. A cost fits while ``level + cost * WINDOW_MS <= L * WINDOW_MS``.
Why GCRA rather than windows:
    - exact and smooth: no fixed-window boundary where a tenant gets 2x its limit, no
      approximation as in the sliding-window-counter trick; a fresh tenant gets a burst of ``L``,
      then a steady ``L`` per minute;
    - O(1) state per limit (level + timestamp), one hash per limit in Redis, self-expiring;
    - refunds and overruns (token reconciliation) are plain additions to the level.
Integers everywhere: time is integer milliseconds, levels are integers below 2**53, so Lua's
doubles and Python's ints compute the same values; the only division shared with Lua
(`drain`) is one correctly rounded IEEE division in both languages. Lua mirrors only `drain`,
`fits` and the updates; everything reported (remaining, reset, retry-after, the tightest limit)
is computed once, in Python, by `decide`, from the levels the backend returns.

Budgets ride along: `acquire` refuses when the month's spend (integer nano-dollars, so sums
are exact in Python and Redis alike) has reached the budget, and `finish` adds the request's
cost, in the same store operation as the limits, so a request's accounting costs two Redis
round trips in all. A month's counter that does not exist yet (new month, fresh or flushed
Redis) starts from the usage ledger's sum (``ledger_spend``; ``SET NX``: the first replica to
seed wins), so a restart does not forget what was spent. A request may overshoot the budget by
its own cost: it is checked before it runs and charged when its cost is known.

Clocks: the caller passes ``now`` (epoch seconds) so tests control time. ``now=None`` makes
`RedisLimiter` read Redis ``TIME`` inside the script: the one clock all replicas share, which
is what cross-replica exactness needs (replicas' own clocks drift). `MemoryLimiter` uses
``time.time()`` for None. A clock that goes backwards drains nothing (never a free refill).

Concurrency slots are leases (``limits.lease_s``): `acquire` adds a random lease id to the
tenant's sorted set, scored by its expiry; a heartbeat renews the leases this process holds
while their requests live, and `finish`/`release` remove them. A replica that dies (SIGKILL)
or a release lost to a Redis stall leaves leases nobody renews: they expire within
``lease_s`` however much traffic the tenant has (a counter with a TTL that every acquire
renewed stayed capped forever under traffic). A failed release is also retried by the next
heartbeat. The Lua scripts live in ``lua/`` (package data), one file per operation.

Limits that refuse: all-or-nothing. `acquire` takes one request, the pre-paid tokens and a
concurrency slot only if every configured limit allows it; otherwise nothing changes. A token
cost larger than ``tokens_per_minute`` can never fit: it is refused with a full window as
retry-after (the caller may prefer to answer 413).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript

from checkstream.config.model import LimitsConfig, RateLimitConfig

log = logging.getLogger("checkstream.limits")

WINDOW_MS: Final = 60_000
# Spend is counted in integer nano-dollars: exact in Python and Redis alike (float sums
# drift; micro-dollars would round a cheap model's single-token cost to zero).
NANO: Final = 1_000_000_000
# A month's spend counter outlives its month, then cleans itself up.
_BUDGET_TTL_S: Final = 40 * 24 * 3600
# A counter removed again right after its seed (FLUSHDB, eviction) is seeded again this often.
_SEED_ATTEMPTS: Final = 3
_COUNTER_VANISHES: Final = "the budget counter keeps vanishing from Redis (flushed or evicted?)"
# A concurrency refusal has no computable end (it lasts until some request finishes): a short
# fixed hint keeps clients from hammering without pretending to know.
CONCURRENCY_RETRY_MS: Final = 1_000
# A concurrency slot is a lease that expires unless its holder renews it: a replica killed
# mid-request (or a release lost to a Redis stall) frees its slots within this long.
DEFAULT_LEASE_S: Final = 30.0
# The holder renews its leases this many times per lease, so one or two missed heartbeats
# (a stalled Redis, a busy event loop) never expire a lease whose request is alive.
HEARTBEATS_PER_LEASE: Final = 3

REQUESTS: Final = "requests_per_minute"
TOKENS: Final = "tokens_per_minute"
CONCURRENCY: Final = "max_concurrent_requests"

# Same rule as config.TenantId. It also guarantees the id has no '{', '}' or ':', so a key
# `checkstream:limits:{<tenant>}:<kind>` names exactly one tenant: no tenant id can address
# another tenant's keys. The braces are a Redis Cluster hash tag: a tenant's keys share a slot,
# which multi-key scripts require.
_TENANT_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


#: Reads what a tenant spent in a month ("YYYY-MM") from the durable usage ledger, in
#: nano-dollars: a month's counter starts there, so restarts do not forget spend.
LedgerSpend = Callable[[str, str], Awaitable[int]]


async def _NOTHING_SPENT(tenant: str, period: str) -> int:
    return 0


class LimiterUnavailable(Exception):
    """The shared limit store cannot be reached; the caller applies the tenant's fail mode."""


@dataclass(frozen=True)
class Decision:
    """Outcome of a limit check, enough for 429 + Retry-After and the X-RateLimit-* headers.

    ``limit_name`` is the limit that refused (the one with the longest wait when several do)
    or, when allowed, the tightest one (least remaining share). All None when the tenant has
    no limit configured.
    """

    allowed: bool
    limit_name: str | None
    limit: int | None
    remaining: int | None
    reset: float | None  # epoch seconds when this limit is fully available again
    retry_after_s: float  # 0.0 when allowed
    #: Refused because the month's budget is spent (then retry_after_s runs to next month,
    #: and the other fields still describe the tightest rate limit, for the headers).
    over_budget: bool = False
    #: The concurrency slot taken (allowed, with max_concurrent_requests): give it back to
    #: `release` or `finish`. Random per request, so no client-chosen id can share a slot.
    lease: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Budget:
    """A monthly budget checked by `acquire`, in the same store operation as the limits."""

    period: str  # "YYYY-MM", UTC
    limit_nano: int


@dataclass(frozen=True)
class Charge:
    """A request's cost added to its month's spend by `finish`."""

    period: str
    nano: int


@dataclass(frozen=True)
class _Rates:
    """Limits as the scripts take them: 0 means not configured."""

    rpm: int
    tpm: int
    concurrency: int

    @staticmethod
    def of(limits: RateLimitConfig) -> _Rates:
        return _Rates(
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            limits.max_concurrent_requests or 0,
        )


class Limiter(Protocol):
    async def acquire(
        self,
        tenant: str,
        limits: RateLimitConfig,
        tokens: int,
        now: float | None = None,
        budget: Budget | None = None,
    ) -> Decision:
        """Take one request, ``tokens`` pre-paid tokens and a concurrency slot, or nothing;
        nothing either when ``budget`` is given and the month's spend has reached it."""

    async def settle(
        self,
        tenant: str,
        limits: RateLimitConfig,
        reserved_tokens: int,
        actual_tokens: int,
        now: float | None = None,
    ) -> None:
        """Reconcile the pre-paid tokens with the real usage: refund or charge the difference."""

    async def release(self, tenant: str, limits: RateLimitConfig, lease: str) -> None:
        """Free the concurrency slot (``Decision.lease``) taken by a successful `acquire`;
        a lease already freed or expired is ignored."""

    async def finish(
        self,
        tenant: str,
        limits: RateLimitConfig,
        reserved_tokens: int,
        actual_tokens: int,
        now: float | None = None,
        charge: Charge | None = None,
        lease: str | None = None,
    ) -> None:
        """`settle`, `release` (of ``lease``) and the budget ``charge`` together, as one
        store operation: a request's end."""

    async def renew(self, now: float | None = None) -> None:
        """Extend every lease this limiter holds by ``lease_s`` from ``now`` (the heartbeat,
        which runs on its own every ``lease_s / HEARTBEATS_PER_LEASE`` while leases are held;
        tests with their own clock call it)."""

    async def spent(self, tenant: str, period: str) -> int:
        """Nano-dollars ``tenant`` spent in ``period`` (tenant-info)."""

    async def remaining(
        self, tenant: str, limits: RateLimitConfig, now: float | None = None
    ) -> Decision:
        """What a request without tokens would get now; takes nothing (tenant-info)."""

    async def aclose(self) -> None: ...


# --- Shared arithmetic. `drain` and `fits` are mirrored line for line in lua/common.lua. ---


def drain(level: int, ts: int, now: int, rate: int) -> int:
    """The level at ``now`` of a bucket last written at ``ts``, draining ``rate`` units/ms."""
    if now <= ts:
        return level
    elapsed = now - ts
    # Compare before multiplying: elapsed * rate for an old timestamp would exceed 2**53 and
    # lose exactness in Lua. `level / rate` is one correctly rounded division in both languages.
    if elapsed > level / rate:
        return 0
    return level - elapsed * rate


def fits(level: int, rate: int, cost: int) -> bool:
    return level + cost * WINDOW_MS <= rate * WINDOW_MS


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _View:
    name: str
    limit: int
    remaining: int
    reset_ms: int
    retry_ms: int  # 0 when the cost fits


def _bucket_view(name: str, level: int, rate: int, cost: int, now: int) -> _View:
    remaining = max(0, (rate * WINDOW_MS - level) // WINDOW_MS)
    reset_ms = now + _ceil_div(level, rate)
    if fits(level, rate, cost):
        retry = 0
    elif cost > rate:
        retry = WINDOW_MS  # never fits; see the module docstring
    else:
        retry = _ceil_div(level + cost * WINDOW_MS - rate * WINDOW_MS, rate)
    return _View(name, rate, remaining, reset_ms, retry)


def decide(
    rates: _Rates,
    tokens: int,
    now: int,
    rpm_level: int,
    tpm_level: int,
    in_flight: int,
    taken: bool,
) -> Decision:
    """Build the reported decision from a backend's levels.

    When ``taken`` the levels are after the take (so remaining is what is left); otherwise
    they are the drained levels before any take, and the costs are checked against them.
    """
    views: list[_View] = []
    take = 0 if taken else 1
    if rates.rpm:
        views.append(_bucket_view(REQUESTS, rpm_level, rates.rpm, take, now))
    if rates.tpm:
        views.append(_bucket_view(TOKENS, tpm_level, rates.tpm, take * tokens, now))
    if rates.concurrency:
        refused = in_flight + take > rates.concurrency
        views.append(
            _View(
                CONCURRENCY,
                rates.concurrency,
                max(0, rates.concurrency - in_flight),
                now,
                CONCURRENCY_RETRY_MS if refused else 0,
            )
        )
    if not views:
        return Decision(True, None, None, None, None, 0.0)
    refusing = [v for v in views if v.retry_ms > 0]
    if refusing:
        # All must pass, so the honest Retry-After is the longest wait (first on ties).
        chosen = max(refusing, key=lambda v: v.retry_ms)
    else:
        # Least remaining share, compared exactly by cross-multiplying (integers); the first
        # wins on ties (requests, tokens, concurrency).
        chosen = views[0]
        for view in views[1:]:
            if view.remaining * chosen.limit < chosen.remaining * view.limit:
                chosen = view
    return Decision(
        allowed=not refusing,
        limit_name=chosen.name,
        limit=chosen.limit,
        remaining=chosen.remaining,
        reset=chosen.reset_ms / 1000,
        retry_after_s=chosen.retry_ms / 1000,
    )


def _over_budget(decision: Decision, now_ms: int) -> Decision:
    """``decision`` (the rate limits as they stand, nothing taken) refused for the budget."""
    return replace(
        decision,
        allowed=False,
        retry_after_s=seconds_to_next_month(now_ms / 1000),
        over_budget=True,
    )


def seconds_to_next_month(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp() - now


def to_nano(usd: float) -> int:
    return round(usd * NANO)


def _now_ms(now: float) -> int:
    return round(now * 1000)


def _keys(tenant: str) -> tuple[str, str, str]:
    if not _TENANT_RE.match(tenant):
        raise ValueError(f"invalid tenant id for limits: {tenant!r}")
    base = f"checkstream:limits:{{{tenant}}}"
    # "leases", not the first round's "concurrency" counter: a rolling update must not meet
    # a key of the old type (WRONGTYPE).
    return f"{base}:rpm", f"{base}:tpm", f"{base}:leases"


def _budget_key(tenant: str, period: str) -> str:
    _keys(tenant)  # the same tenant id check
    return f"checkstream:budget:{{{tenant}}}:{period}"


def _check_tokens(*values: int) -> None:
    for value in values:
        if value < 0:
            raise ValueError(f"token counts are never negative (got {value})")


# --- Leases: the part of concurrency both backends share. ---


def _new_lease() -> str:
    return uuid.uuid4().hex


class _LeaseBook:
    """The leases one limiter holds and the heartbeat that renews them while their requests
    live. Releases that failed (Redis stalled or down) wait here and are retried by the
    heartbeat; meanwhile their lease is no longer renewed, so it frees itself within
    ``lease_s`` even if Redis never answers this replica again."""

    def __init__(self, lease_s: float, beat: Callable[[], Any], heartbeat: bool) -> None:
        self.lease_ms = max(1, round(lease_s * 1000))
        self.interval_s = lease_s / HEARTBEATS_PER_LEASE
        #: lease id -> the tenant's lease key
        self.held: dict[str, str] = {}
        self.unreleased: dict[str, str] = {}
        self._beat = beat
        self._heartbeat = heartbeat
        self._task: asyncio.Task[None] | None = None

    def taken(self, lease: str, key: str) -> None:
        self.held[lease] = key
        if self._heartbeat and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def freed(self, lease: str, key: str) -> None:
        # Only for its own tenant's key: a lease named with another tenant freed nothing.
        if self.held.get(lease) == key:
            del self.held[lease]
        if self.unreleased.get(lease) == key:
            del self.unreleased[lease]

    def lost(self, lease: str) -> None:
        """Its release failed: stop renewing it, retry the release at the next beat."""
        key = self.held.pop(lease, None)
        if key is not None:
            self.unreleased[lease] = key

    def by_key(self, leases: dict[str, str]) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for lease, key in leases.items():
            grouped.setdefault(key, []).append(lease)
        return grouped

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._beat()
            except Exception as exc:  # the heartbeat must outlive any one failure
                if not failing:  # one line per outage, not one per beat
                    log.error(json.dumps({"event": "lease_heartbeat_failed", "error": str(exc)}))
                failing = True
            else:
                failing = False

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# --- In-process backend. ---


class MemoryLimiter:
    """Exact for one process. Each method runs without awaiting, so on one event loop every
    operation is atomic; several worker processes each get their own counts (use Redis)."""

    def __init__(
        self,
        ledger_spend: LedgerSpend = _NOTHING_SPENT,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        heartbeat: bool = True,
    ) -> None:
        # Same keys as Redis, so both backends are driven by the same tenant validation.
        self._buckets: dict[str, tuple[int, int]] = {}
        #: lease key -> {lease id: expiry in ms}, as Redis's sorted sets.
        self._leases: dict[str, dict[str, int]] = {}
        self._book = _LeaseBook(lease_s, self.renew, heartbeat)
        self._ledger_spend = ledger_spend
        self._spent: dict[tuple[str, str], int] = {}

    async def _seed(self, tenant: str, period: str) -> None:
        """Read a month's start from the ledger once; the operations that follow it run
        without awaiting, so they stay atomic."""
        key = (tenant, period)
        if key not in self._spent:
            start = await self._ledger_spend(tenant, period)
            self._spent.setdefault(key, start)

    def _month(self, tenant: str, period: str) -> int:
        return self._spent[(tenant, period)]

    async def spent(self, tenant: str, period: str) -> int:
        await self._seed(tenant, period)
        return self._month(tenant, period)

    def _load(self, key: str, now: int) -> tuple[int, int]:
        return self._buckets.get(key, (0, now))

    def _store(self, key: str, level: int, ts: int) -> None:
        # An empty bucket is forgotten, as the Redis key is deleted: same state, same answers.
        if level <= 0:
            self._buckets.pop(key, None)
        else:
            self._buckets[key] = (level, ts)

    async def acquire(
        self,
        tenant: str,
        limits: RateLimitConfig,
        tokens: int,
        now: float | None = None,
        budget: Budget | None = None,
    ) -> Decision:
        _check_tokens(tokens)
        rk, tk, ck = _keys(tenant)
        if budget is not None:
            await self._seed(tenant, budget.period)  # the only await: before anything is read
        rates = _Rates.of(limits)
        t = _now_ms(time.time() if now is None else now)
        rl, rt = self._load(rk, t)
        tl, tt = self._load(tk, t)
        if rates.rpm:
            rl = drain(rl, rt, t, rates.rpm)
        if rates.tpm:
            tl = drain(tl, tt, t, rates.tpm)
        in_flight = self._live_leases(ck, t) if rates.concurrency else 0
        if budget is not None and self._month(tenant, budget.period) >= budget.limit_nano:
            return _over_budget(decide(rates, tokens, t, rl, tl, in_flight, taken=False), t)
        ok = (
            (not rates.rpm or fits(rl, rates.rpm, 1))
            and (not rates.tpm or fits(tl, rates.tpm, tokens))
            and (not rates.concurrency or in_flight + 1 <= rates.concurrency)
        )
        lease = None
        if ok:
            if rates.rpm:
                rl += WINDOW_MS
                self._store(rk, rl, max(rt, t))
            if rates.tpm:
                tl += tokens * WINDOW_MS
                self._store(tk, tl, max(tt, t))
            if rates.concurrency:
                lease = _new_lease()
                self._leases.setdefault(ck, {})[lease] = t + self._book.lease_ms
                self._book.taken(lease, ck)
                in_flight += 1
        decision = decide(rates, tokens, t, rl, tl, in_flight, taken=ok)
        return replace(decision, lease=lease) if lease else decision

    def _live_leases(self, key: str, now: int) -> int:
        leases = self._leases.get(key)
        if not leases:
            return 0
        for lease in [lease for lease, expiry in leases.items() if expiry <= now]:
            del leases[lease]
        if not leases:
            del self._leases[key]
        return len(leases)

    async def renew(self, now: float | None = None) -> None:
        t = _now_ms(time.time() if now is None else now)
        for lease, key in self._book.held.items():
            leases = self._leases.get(key)
            if leases is not None and lease in leases:  # never revive an expired lease
                leases[lease] = t + self._book.lease_ms

    async def settle(
        self,
        tenant: str,
        limits: RateLimitConfig,
        reserved_tokens: int,
        actual_tokens: int,
        now: float | None = None,
    ) -> None:
        _check_tokens(reserved_tokens, actual_tokens)
        _, tk, _ = _keys(tenant)
        rate = limits.tokens_per_minute
        if not rate or reserved_tokens == actual_tokens:
            return
        t = _now_ms(time.time() if now is None else now)
        level, ts = self._load(tk, t)
        level = drain(level, ts, t, rate)
        # A refund cannot take the bucket below empty; an overrun may push it past full (debt),
        # which then delays the tenant's next requests: the tokens were really used.
        level = max(0, level + (actual_tokens - reserved_tokens) * WINDOW_MS)
        self._store(tk, level, max(ts, t))

    async def finish(
        self,
        tenant: str,
        limits: RateLimitConfig,
        reserved_tokens: int,
        actual_tokens: int,
        now: float | None = None,
        charge: Charge | None = None,
        lease: str | None = None,
    ) -> None:
        if charge is not None:
            _check_tokens(charge.nano)  # before anything changes
            if charge.nano:
                _keys(tenant)  # the tenant id check, before the ledger is asked
                await self._seed(tenant, charge.period)
        await self.settle(tenant, limits, reserved_tokens, actual_tokens, now)
        if lease is not None:
            await self.release(tenant, limits, lease)
        if charge is not None and charge.nano:
            self._spent[(tenant, charge.period)] = self._month(tenant, charge.period) + charge.nano

    async def release(self, tenant: str, limits: RateLimitConfig, lease: str) -> None:
        _, _, ck = _keys(tenant)
        leases = self._leases.get(ck)
        if leases is not None:
            leases.pop(lease, None)
            if not leases:
                del self._leases[ck]
        self._book.freed(lease, ck)

    async def remaining(
        self, tenant: str, limits: RateLimitConfig, now: float | None = None
    ) -> Decision:
        rk, tk, ck = _keys(tenant)
        rates = _Rates.of(limits)
        t = _now_ms(time.time() if now is None else now)
        rl, rt = self._load(rk, t)
        tl, tt = self._load(tk, t)
        rl = drain(rl, rt, t, rates.rpm) if rates.rpm else 0
        tl = drain(tl, tt, t, rates.tpm) if rates.tpm else 0
        leases = self._leases.get(ck, {})
        in_flight = sum(1 for expiry in leases.values() if expiry > t)
        return decide(rates, 0, t, rl, tl, in_flight, taken=False)

    async def aclose(self) -> None:
        await self._book.aclose()


# --- Redis backend. ---


def _script(name: str, *, common: bool = True) -> str:
    """A Lua script shipped in ``lua/`` (package data), with the shared functions first."""
    here = Path(__file__).parent / "lua"
    body = (here / f"{name}.lua").read_text()
    return (here / "common.lua").read_text() + body if common else body


_UNREACHABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    OSError,
)


# Concurrent operations beyond this wait for a free connection (up to the timeout) instead
# of failing: a busy gateway must not turn a healthy Redis into LimiterUnavailable.
MAX_REDIS_CONNECTIONS: Final = 64


def redis_client(url: str, timeout_s: float = 1.0) -> aioredis.Redis:
    """A client with bounded timeouts (a hung Redis becomes the fail mode quickly, not a
    stuck request) and a pool that queues rather than refuses when all connections are busy."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_REDIS_CONNECTIONS,
        timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
    )
    return aioredis.Redis(connection_pool=pool)


def _redacted(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _arg_now(now: float | None) -> str:
    return "" if now is None else str(_now_ms(now))


#: A script call waiting for the next pipeline: script, keys, args, the caller's future.
_Call = tuple[AsyncScript, list[str], list[str], "asyncio.Future[Any]"]


class RedisLimiter:
    """Exact across every process and replica sharing one Redis: each operation is one Lua
    script, which Redis runs atomically."""

    def __init__(
        self,
        url: str,
        *,
        ledger_spend: LedgerSpend = _NOTHING_SPENT,
        timeout_s: float = 1.0,
        lease_s: float = DEFAULT_LEASE_S,
        heartbeat: bool = True,
    ) -> None:
        self._url = _redacted(url)
        self._ledger_spend = ledger_spend
        # Bounded timeouts: a hung Redis must turn into LimiterUnavailable (and the fail mode)
        # quickly, not into a request stuck behind it.
        self._redis = redis_client(url, timeout_s)
        self._book = _LeaseBook(lease_s, self.renew, heartbeat)
        self._lease_ms = str(self._book.lease_ms)
        register = self._redis.register_script
        self._acquire = register(_script("acquire"))
        self._settle = register(_script("settle"))
        self._release = register(_script("release", common=False))
        self._renew = register(_script("renew"))
        self._finish = register(_script("finish"))
        self._remaining = register(_script("remaining"))
        self._pending: list[_Call] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    async def _run(self, script: AsyncScript, keys: list[str], args: list[str]) -> list[int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((script, keys, args, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        result = await future
        return [int(x) for x in result] if isinstance(result, list) else [int(result)]

    # Scripts called in the same event-loop turn (concurrent requests' starts and ends) go
    # to Redis as one pipeline: one write and one read for all of them, which halves
    # redis-py's CPU per script under load (bench/limits.py). Each script still runs
    # atomically on its own; a pipeline is not a transaction.
    def _flush(self) -> None:
        batch, self._pending, self._flush_scheduled = self._pending, [], False
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._pipeline(batch)
        except _UNREACHABLE as exc:
            error = LimiterUnavailable(f"rate-limit store {self._url} is unavailable: {exc}")
            results = [error] * len(batch)
        except Exception as exc:  # never leave a caller waiting
            results = [exc] * len(batch)
        for (_script, _keys, _args, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for script, keys, args, _future in batch:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        for index, result in enumerate(results):
            if isinstance(result, redis.exceptions.NoScriptError):
                # Redis restarted or was flushed: the Script object loads and retries.
                script, keys, args, _future = batch[index]
                results[index] = await script(keys=keys, args=args)
        return results

    async def _seed(self, tenant: str, period: str) -> None:
        """Start a month's spend counter from the ledger. NX: when replicas race, the first
        wins; a counter that exists (this month's spend by every replica) is never replaced."""
        start = await self._ledger_spend(tenant, period)
        try:
            await self._redis.set(_budget_key(tenant, period), start, nx=True, ex=_BUDGET_TTL_S)
        except _UNREACHABLE as exc:
            raise LimiterUnavailable(f"rate-limit store {self._url} is unavailable: {exc}") from exc

    async def _run_seeded(
        self,
        script: AsyncScript,
        keys: list[str],
        args: list[str],
        tenant: str,
        period: str | None,
    ) -> list[int]:
        """Run a script that answers [-1], having changed nothing, when the month's budget
        counter is missing: seed it and run again."""
        result = await self._run(script, keys, args)
        attempts = 0
        while result == [-1] and period is not None:
            if attempts == _SEED_ATTEMPTS:
                raise LimiterUnavailable(_COUNTER_VANISHES)
            attempts += 1
            await self._seed(tenant, period)
            result = await self._run(script, keys, args)
        return result

    async def spent(self, tenant: str, period: str) -> int:
        key = _budget_key(tenant, period)
        try:
            value = await self._redis.get(key)
            if value is None:
                await self._seed(tenant, period)
                value = await self._redis.get(key)
        except _UNREACHABLE as exc:
            raise LimiterUnavailable(f"rate-limit store {self._url} is unavailable: {exc}") from exc
        return int(value or 0)

    async def acquire(
        self,
        tenant: str,
        limits: RateLimitConfig,
        tokens: int,
        now: float | None = None,
        budget: Budget | None = None,
    ) -> Decision:
        _check_tokens(tokens)
        rates = _Rates.of(limits)
        keys = list(_keys(tenant))
        args = [
            _arg_now(now),
            str(rates.rpm),
            str(rates.tpm),
            str(rates.concurrency),
            str(tokens),
            self._lease_ms,
            "" if budget is None else str(budget.limit_nano),
            lease := _new_lease(),
        ]
        if budget is not None:
            keys.append(_budget_key(tenant, budget.period))
        period = budget.period if budget is not None else None
        ok, t, rl, tl, in_flight, over = await self._run_seeded(
            self._acquire, keys, args, tenant, period
        )
        decision = decide(rates, tokens, t, rl, tl, in_flight, taken=bool(ok))
        if over:
            return _over_budget(decision, t)
        if ok and rates.concurrency:
            self._book.taken(lease, keys[2])
            return replace(decision, lease=lease)
        return decision

    async def settle(
        self,
        tenant: str,
        limits: RateLimitConfig,
        reserved_tokens: int,
        actual_tokens: int,
        now: float | None = None,
    ) -> None:
        _check_tokens(reserved_tokens, actual_tokens)
        _, tk, _ = _keys(tenant)
        rate = limits.tokens_per_minute
        if not rate or reserved_tokens == actual_tokens:
            return
        args = [_arg_now(now), str(rate), str(reserved_tokens), str(actual_tokens)]
        await self._run(self._settle, [tk], args)

    async def release(self, tenant: str, limits: RateLimitConfig, lease: str) -> None:
        _, _, ck = _keys(tenant)
        try:
            await self._run(self._release, [ck], [lease])
        except LimiterUnavailable:
            self._book.lost(lease)
            raise
        self._book.freed(lease, ck)

    async def renew(self, now: float | None = None) -> None:
        book = self._book
        calls = [
            self._run(self._renew, [key], [_arg_now(now), self._lease_ms, *leases])
            for key, leases in book.by_key(book.held).items()
        ]
        retried = list(book.by_key(book.unreleased).items())
        calls += [self._run(self._release, [key], leases) for key, leases in retried]
        # One pipeline for all of them (same event-loop turn).
        results = await asyncio.gather(*calls, return_exceptions=True)
        outcomes = results[len(calls) - len(retried) :]
        for (key, leases), result in zip(retried, outcomes, strict=True):
            if not isinstance(result, BaseException):
                for lease in leases:
                    book.freed(lease, key)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def finish(
        self,
        tenant: str,
        limits: RateLimitConfig,
        reserved_tokens: int,
        actual_tokens: int,
        now: float | None = None,
        charge: Charge | None = None,
        lease: str | None = None,
    ) -> None:
        _check_tokens(reserved_tokens, actual_tokens)
        tpm = limits.tokens_per_minute or 0
        settles = bool(tpm) and reserved_tokens != actual_tokens
        releases = lease is not None
        if charge is not None:
            _check_tokens(charge.nano)  # before anything changes
        charges = charge is not None and charge.nano > 0
        if not (settles or releases or charges):
            return  # nothing to change: no round trip
        _, tk, ck = _keys(tenant)
        keys = [tk, ck]
        args = [_arg_now(now), str(tpm), str(reserved_tokens), str(actual_tokens)]
        args += [lease or "", ""]
        if charge is not None and charges:
            keys.append(_budget_key(tenant, charge.period))
            args[-1] = str(charge.nano)
        period = charge.period if charge is not None and charges else None
        try:
            await self._run_seeded(self._finish, keys, args, tenant, period)
        except LimiterUnavailable:
            if lease is not None:
                self._book.lost(lease)
            raise
        if lease is not None:
            self._book.freed(lease, ck)

    async def remaining(
        self, tenant: str, limits: RateLimitConfig, now: float | None = None
    ) -> Decision:
        rates = _Rates.of(limits)
        args = [_arg_now(now), str(rates.rpm), str(rates.tpm)]
        t, rl, tl, in_flight = await self._run(self._remaining, list(_keys(tenant)), args)
        return decide(rates, 0, t, rl, tl, in_flight, taken=False)

    async def aclose(self) -> None:
        await self._book.aclose()
        await self._redis.aclose()


def build_limiter(config: LimitsConfig, ledger_spend: LedgerSpend = _NOTHING_SPENT) -> Limiter:
    if config.backend == "redis":
        if not config.url:
            raise ValueError("limits.backend redis needs limits.url")
        return RedisLimiter(config.url, ledger_spend=ledger_spend, lease_s=config.lease_s)
    return MemoryLimiter(ledger_spend, lease_s=config.lease_s)
