"""Per-tenant rate limits (requests per minute, tokens per minute, concurrent requests) and
monthly budgets.

One narrow async interface (`Limiter`) with two backends that make identical decisions:
`MemoryLimiter` (in-process, exact only with one extproc worker) and `RedisLimiter` (one Lua
script per operation, so several workers and replicas share exact counts; design.md "Scaling
out"). The shape follows envoyproxy/ratelimit: a small interface, atomicity from the store.

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

Limits that refuse: all-or-nothing. `acquire` takes one request, the pre-paid tokens and a
concurrency slot only if every configured limit allows it; otherwise nothing changes. A token
cost larger than ``tokens_per_minute`` can never fit: it is refused with a full window as
retry-after (the caller may prefer to answer 413).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript

from extproc.config import LimitsConfig, RateLimitConfig

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
# Redis only: a replica that dies mid-request never releases its slots; the counter expires
# after this long without any acquire for the tenant, so leaked slots cannot block forever.
DEFAULT_CONCURRENCY_TTL_S: Final = 900.0

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

    async def release(self, tenant: str, limits: RateLimitConfig) -> None:
        """Free the concurrency slot taken by a successful `acquire`."""

    async def finish(
        self,
        tenant: str,
        limits: RateLimitConfig,
        reserved_tokens: int,
        actual_tokens: int,
        now: float | None = None,
        charge: Charge | None = None,
    ) -> None:
        """`settle`, `release` and the budget ``charge`` together, as one store operation:
        a request's end."""

    async def spent(self, tenant: str, period: str) -> int:
        """Nano-dollars ``tenant`` spent in ``period`` (tenant-info)."""

    async def remaining(
        self, tenant: str, limits: RateLimitConfig, now: float | None = None
    ) -> Decision:
        """What a request without tokens would get now; takes nothing (tenant-info)."""

    async def aclose(self) -> None: ...


# --- Shared arithmetic. `drain` and `fits` are mirrored line for line in _LUA_COMMON. ---


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
    return f"{base}:rpm", f"{base}:tpm", f"{base}:concurrency"


def _budget_key(tenant: str, period: str) -> str:
    _keys(tenant)  # the same tenant id check
    return f"checkstream:budget:{{{tenant}}}:{period}"


def _check_tokens(*values: int) -> None:
    for value in values:
        if value < 0:
            raise ValueError(f"token counts are never negative (got {value})")


# --- In-process backend. ---


class MemoryLimiter:
    """Exact for one process. Each method runs without awaiting, so on one event loop every
    operation is atomic; several worker processes each get their own counts (use Redis)."""

    def __init__(self, ledger_spend: LedgerSpend = _NOTHING_SPENT) -> None:
        # Same keys as Redis, so both backends are driven by the same tenant validation.
        self._buckets: dict[str, tuple[int, int]] = {}
        self._in_flight: dict[str, int] = {}
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
        in_flight = self._in_flight.get(ck, 0)
        if budget is not None and self._month(tenant, budget.period) >= budget.limit_nano:
            return _over_budget(decide(rates, tokens, t, rl, tl, in_flight, taken=False), t)
        ok = (
            (not rates.rpm or fits(rl, rates.rpm, 1))
            and (not rates.tpm or fits(tl, rates.tpm, tokens))
            and (not rates.concurrency or in_flight + 1 <= rates.concurrency)
        )
        if ok:
            if rates.rpm:
                rl += WINDOW_MS
                self._store(rk, rl, max(rt, t))
            if rates.tpm:
                tl += tokens * WINDOW_MS
                self._store(tk, tl, max(tt, t))
            if rates.concurrency:
                in_flight += 1
                self._in_flight[ck] = in_flight
        return decide(rates, tokens, t, rl, tl, in_flight, taken=ok)

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
    ) -> None:
        if charge is not None:
            _check_tokens(charge.nano)  # before anything changes
            if charge.nano:
                _keys(tenant)  # the tenant id check, before the ledger is asked
                await self._seed(tenant, charge.period)
        await self.settle(tenant, limits, reserved_tokens, actual_tokens, now)
        if limits.max_concurrent_requests:
            await self.release(tenant, limits)
        if charge is not None and charge.nano:
            self._spent[(tenant, charge.period)] = self._month(tenant, charge.period) + charge.nano

    async def release(self, tenant: str, limits: RateLimitConfig) -> None:
        _, _, ck = _keys(tenant)
        n = self._in_flight.get(ck, 0)
        if n <= 1:
            self._in_flight.pop(ck, None)
        else:
            self._in_flight[ck] = n - 1

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
        in_flight = self._in_flight.get(ck, 0)
        return decide(rates, 0, t, rl, tl, in_flight, taken=False)

    async def aclose(self) -> None:
        return None


# --- Redis backend. ---

# Mirrors `drain`, `fits`, `MemoryLimiter._load/_store`. Numbers are written with '%d': Redis
# would otherwise format Lua numbers with '%.14g' and round levels above 1e14.
_LUA_COMMON = """
local W = 60000
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function load(key, now)
  local v = redis.call('HMGET', key, 'l', 't')
  return tonumber(v[1]) or 0, tonumber(v[2]) or now
end
local function drain(level, ts, now, rate)
  if now <= ts then return level end
  local elapsed = now - ts
  if elapsed > level / rate then return 0 end
  return level - elapsed * rate
end
local function fits(level, rate, cost)
  return level + cost * W <= rate * W
end
local function store(key, level, ts, rate)
  if level <= 0 then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'l', string.format('%d', level), 't', string.format('%d', ts))
  -- The key lives until the bucket has drained (plus a margin), then empty == absent.
  redis.call('PEXPIRE', key, string.format('%d', math.ceil(level / rate) + 1000))
end
"""

# KEYS: rpm, tpm, concurrency[, budget]. ARGV: now_ms|'', rpm, tpm, max_concurrent, tokens,
# conc_ttl_ms, budget_nano|''. Returns {-1} when the month's budget counter must be seeded
# first (from the usage ledger, which only the caller can read), having changed nothing.
_LUA_ACQUIRE = (
    _LUA_COMMON
    + """
local over = 0
if ARGV[7] ~= '' then
  local spent = redis.call('GET', KEYS[4])
  if not spent then return {-1} end
  -- Compared as decimal strings (non-negative, no leading zeros): Lua's doubles would round
  -- amounts above 2^53 nano-dollars (about $9M).
  local budget = ARGV[7]
  if #spent > #budget or (#spent == #budget and spent >= budget) then over = 1 end
end
local now = clock(ARGV[1])
local rpm, tpm, cmax = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, cttl = tonumber(ARGV[5]), ARGV[6]
local rl, rt = load(KEYS[1], now)
local tl, tt = load(KEYS[2], now)
if rpm > 0 then rl = drain(rl, rt, now, rpm) end
if tpm > 0 then tl = drain(tl, tt, now, tpm) end
local inflight = tonumber(redis.call('GET', KEYS[3])) or 0
local ok = over == 0
  and (rpm == 0 or fits(rl, rpm, 1))
  and (tpm == 0 or fits(tl, tpm, tokens))
  and (cmax == 0 or inflight + 1 <= cmax)
if ok then
  if rpm > 0 then
    rl = rl + W
    store(KEYS[1], rl, math.max(rt, now), rpm)
  end
  if tpm > 0 then
    tl = tl + tokens * W
    store(KEYS[2], tl, math.max(tt, now), tpm)
  end
  if cmax > 0 then
    inflight = redis.call('INCR', KEYS[3])
    redis.call('PEXPIRE', KEYS[3], cttl)
  end
end
return {ok and 1 or 0, now, rl, tl, inflight, over}
"""
)

# KEYS: tpm. ARGV: now_ms|'', tpm, reserved, actual
_LUA_SETTLE = (
    _LUA_COMMON
    + """
local now = clock(ARGV[1])
local tpm, reserved, actual = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local level, ts = load(KEYS[1], now)
level = drain(level, ts, now, tpm)
level = math.max(0, level + (actual - reserved) * W)
store(KEYS[1], level, math.max(ts, now), tpm)
return 1
"""
)

# KEYS: concurrency.
_LUA_RELEASE = """
local n = tonumber(redis.call('GET', KEYS[1])) or 0
if n <= 1 then
  redis.call('DEL', KEYS[1])
else
  redis.call('DECR', KEYS[1])
end
return 1
"""

# KEYS: tpm, concurrency[, budget]. ARGV: now_ms|'', tpm (0: no settling), reserved, actual,
# release (1/0), charge_nano|''. Settle, release and charge in one round trip, atomically: a
# request's end. Returns -1, having changed nothing, when the budget counter needs seeding.
_LUA_FINISH = (
    _LUA_COMMON
    + """
if ARGV[6] ~= '' and redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
local tpm, reserved, actual = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tpm > 0 and reserved ~= actual then
  local now = clock(ARGV[1])
  local level, ts = load(KEYS[1], now)
  level = drain(level, ts, now, tpm)
  level = math.max(0, level + (actual - reserved) * W)
  store(KEYS[1], level, math.max(ts, now), tpm)
end
if ARGV[5] == '1' then
  local n = tonumber(redis.call('GET', KEYS[2])) or 0
  if n <= 1 then
    redis.call('DEL', KEYS[2])
  else
    redis.call('DECR', KEYS[2])
  end
end
if ARGV[6] ~= '' then redis.call('INCRBY', KEYS[3], ARGV[6]) end
return 1
"""
)

# KEYS: rpm, tpm, concurrency. ARGV: now_ms|'', rpm, tpm. Read-only.
_LUA_REMAINING = (
    _LUA_COMMON
    + """
local now = clock(ARGV[1])
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local rl, rt = load(KEYS[1], now)
local tl, tt = load(KEYS[2], now)
if rpm > 0 then rl = drain(rl, rt, now, rpm) else rl = 0 end
if tpm > 0 then tl = drain(tl, tt, now, tpm) else tl = 0 end
local inflight = tonumber(redis.call('GET', KEYS[3])) or 0
return {now, rl, tl, inflight}
"""
)

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
        concurrency_ttl_s: float = DEFAULT_CONCURRENCY_TTL_S,
    ) -> None:
        self._url = _redacted(url)
        self._ledger_spend = ledger_spend
        # Bounded timeouts: a hung Redis must turn into LimiterUnavailable (and the fail mode)
        # quickly, not into a request stuck behind it.
        self._redis = redis_client(url, timeout_s)
        self._conc_ttl_ms = str(max(1, round(concurrency_ttl_s * 1000)))
        self._acquire = self._redis.register_script(_LUA_ACQUIRE)
        self._settle = self._redis.register_script(_LUA_SETTLE)
        self._release = self._redis.register_script(_LUA_RELEASE)
        self._finish = self._redis.register_script(_LUA_FINISH)
        self._remaining = self._redis.register_script(_LUA_REMAINING)
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
            self._conc_ttl_ms,
            "",
        ]
        if budget is not None:
            keys.append(_budget_key(tenant, budget.period))
            args[-1] = str(budget.limit_nano)
        period = budget.period if budget is not None else None
        ok, t, rl, tl, in_flight, over = await self._run_seeded(
            self._acquire, keys, args, tenant, period
        )
        decision = decide(rates, tokens, t, rl, tl, in_flight, taken=bool(ok))
        return _over_budget(decision, t) if over else decision

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

    async def release(self, tenant: str, limits: RateLimitConfig) -> None:
        _, _, ck = _keys(tenant)
        await self._run(self._release, [ck], [])

    async def finish(
        self,
        tenant: str,
        limits: RateLimitConfig,
        reserved_tokens: int,
        actual_tokens: int,
        now: float | None = None,
        charge: Charge | None = None,
    ) -> None:
        _check_tokens(reserved_tokens, actual_tokens)
        tpm = limits.tokens_per_minute or 0
        settles = bool(tpm) and reserved_tokens != actual_tokens
        releases = bool(limits.max_concurrent_requests)
        if charge is not None:
            _check_tokens(charge.nano)  # before anything changes
        charges = charge is not None and charge.nano > 0
        if not (settles or releases or charges):
            return  # nothing to change: no round trip
        _, tk, ck = _keys(tenant)
        keys = [tk, ck]
        args = [_arg_now(now), str(tpm), str(reserved_tokens), str(actual_tokens)]
        args += ["1" if releases else "0", ""]
        if charge is not None and charges:
            keys.append(_budget_key(tenant, charge.period))
            args[-1] = str(charge.nano)
        period = charge.period if charge is not None and charges else None
        await self._run_seeded(self._finish, keys, args, tenant, period)

    async def remaining(
        self, tenant: str, limits: RateLimitConfig, now: float | None = None
    ) -> Decision:
        rates = _Rates.of(limits)
        args = [_arg_now(now), str(rates.rpm), str(rates.tpm)]
        t, rl, tl, in_flight = await self._run(self._remaining, list(_keys(tenant)), args)
        return decide(rates, 0, t, rl, tl, in_flight, taken=False)

    async def aclose(self) -> None:
        await self._redis.aclose()


def build_limiter(config: LimitsConfig, ledger_spend: LedgerSpend = _NOTHING_SPENT) -> Limiter:
    if config.backend == "redis":
        if not config.url:
            raise ValueError("limits.backend redis needs limits.url")
        return RedisLimiter(config.url, ledger_spend=ledger_spend)
    return MemoryLimiter(ledger_spend)
