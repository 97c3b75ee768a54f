"""The limiter interface and what both backends share: input guards, tenant keys, leases (worker).

One narrow async interface (`Limiter`: acquire, finish, renew, spent, remaining, aclose) with
two backends that make identical decisions: `MemoryLimiter` (memory.py, in-process, exact
only with one extproc worker) and `RedisLimiter` (redis.py, one Lua script per operation, so
several workers and replicas share exact counts; design.md "Scaling out"). The shape follows
envoyproxy/ratelimit: a small interface, atomicity from the store. The base class validates
every input and builds the reported `Decision` from the levels a backend answers, so the
backends only read and write their store.

Budgets ride along: `acquire` refuses when the month's spend has reached the budget, and
`finish` adds the request's cost, in the same store operation as the limits, so a request's
accounting costs two Redis round trips in all. A month's counter that does not exist yet (new
month, fresh or flushed Redis) starts from the usage ledger's sum (``ledger_spend``), so a
restart does not forget what was spent. A request may overshoot the budget by its own cost:
it is checked before it runs and charged when its cost is known.

Clocks: the caller passes ``now`` (epoch seconds) so tests control time. ``now=None`` makes
`RedisLimiter` read Redis ``TIME`` inside the script: the one clock all replicas share, which
is what cross-replica exactness needs (replicas' own clocks drift). `MemoryLimiter` uses
``time.time()`` for None. A clock that goes backwards drains nothing (never a free refill).

Concurrency slots are leases (``limits.lease_s``): `acquire` adds a random lease id to the
tenant's sorted set, scored by its expiry; a heartbeat renews the leases this process holds
while their requests live, and `finish` removes them. A replica that dies (SIGKILL) or a
release lost to a Redis stall leaves leases nobody renews: they expire within ``lease_s``
however much traffic the tenant has (a counter with a TTL that every acquire renewed stayed
capped forever under traffic). A failed release is also retried by the next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Final, NamedTuple

from checkstream.config.model import RateLimitConfig
from checkstream.limits.decisions import (
    Budget,
    Charge,
    Decision,
    Levels,
    Rates,
    check_tokens,
    decide,
    over_budget,
)
from checkstream.ops import logs

log = logs.get("checkstream.limits")

# A concurrency slot is a lease that expires unless its holder renews it: a replica killed
# mid-request (or a release lost to a Redis stall) frees its slots within this long.
DEFAULT_LEASE_S: Final = 30.0
# The holder renews its leases this many times per lease, so one or two missed heartbeats
# (a stalled Redis, a busy event loop) never expire a lease whose request is alive.
HEARTBEATS_PER_LEASE: Final = 3

# Same rule as config.TenantId. It also guarantees the id has no '{', '}' or ':', so a key
# `checkstream:limits:{<tenant>}:<kind>` names exactly one tenant: no tenant id can address
# another tenant's keys. The braces are a Redis Cluster hash tag: a tenant's keys share a slot,
# which multi-key scripts require.
_TENANT_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


#: Reads what a tenant spent in a month ("YYYY-MM") from the durable usage ledger, in
#: nano-dollars: a month's counter starts there, so restarts do not forget spend.
LedgerSpend = Callable[[str, str], Awaitable[int]]


async def nothing_spent(tenant: str, period: str) -> int:
    return 0


class Keys(NamedTuple):
    """One tenant's limit keys (Redis keys; the memory backend uses the same names)."""

    rpm: str
    tpm: str
    leases: str


def tenant_keys(tenant: str) -> Keys:
    if not _TENANT_RE.match(tenant):
        raise ValueError(f"invalid tenant id for limits: {tenant!r}")
    base = f"checkstream:limits:{{{tenant}}}"
    # "leases", not the first round's "concurrency" counter: a rolling update must not meet
    # a key of the old type (WRONGTYPE).
    return Keys(f"{base}:rpm", f"{base}:tpm", f"{base}:leases")


def budget_key(tenant: str, period: str) -> str:
    tenant_keys(tenant)  # the same tenant id check
    return f"checkstream:budget:{{{tenant}}}:{period}"


def new_lease() -> str:
    return uuid.uuid4().hex


class LeaseBook:
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
                    log.error("lease_heartbeat_failed", error=str(exc))
                failing = True
            else:
                failing = False

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Limiter(ABC):
    """Per-tenant rate limits (requests per minute, tokens per minute, concurrent requests)
    and monthly budgets. The public methods check their input, then ask the backend."""

    def __init__(self, ledger_spend: LedgerSpend, lease_s: float, heartbeat: bool) -> None:
        self._ledger_spend = ledger_spend
        self._book = LeaseBook(lease_s, self.renew, heartbeat)

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
        check_tokens(tokens)
        keys = tenant_keys(tenant)
        rates = Rates.of(limits)
        lease = new_lease()
        levels = await self._take(tenant, keys, rates, tokens, now, budget, lease)
        decision = decide(
            rates,
            tokens,
            levels.now_ms,
            levels.rpm_level,
            levels.tpm_level,
            levels.in_flight,
            taken=levels.ok,
        )
        if levels.over_budget:
            return over_budget(decision, levels.now_ms)
        if levels.ok and rates.concurrency:
            self._book.taken(lease, keys.leases)
            return replace(decision, lease=lease)
        return decision

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
        """A request's end, as one store operation: reconcile the pre-paid tokens with the
        real usage (refund or charge the difference), free the concurrency slot ``lease``
        (one already freed or expired is ignored) and add ``charge`` to the month's spend."""
        check_tokens(reserved_tokens, actual_tokens)
        if charge is not None:
            check_tokens(charge.nano)  # before anything changes
        keys = tenant_keys(tenant)
        tpm = limits.tokens_per_minute or 0
        settle = tpm if reserved_tokens != actual_tokens else 0
        billed = charge if charge is not None and charge.nano else None
        await self._finish(tenant, keys, settle, reserved_tokens, actual_tokens, now, billed, lease)

    async def remaining(
        self, tenant: str, limits: RateLimitConfig, now: float | None = None
    ) -> Decision:
        """What a request without tokens would get now; takes nothing (tenant-info)."""
        keys = tenant_keys(tenant)
        rates = Rates.of(limits)
        levels = await self._levels(keys, rates, now)
        return decide(
            rates,
            0,
            levels.now_ms,
            levels.rpm_level,
            levels.tpm_level,
            levels.in_flight,
            taken=False,
        )

    @abstractmethod
    async def renew(self, now: float | None = None) -> None:
        """Extend every lease this limiter holds by ``lease_s`` from ``now`` (the heartbeat,
        which runs on its own every ``lease_s / HEARTBEATS_PER_LEASE`` while leases are held;
        tests with their own clock call it)."""

    @abstractmethod
    async def spent(self, tenant: str, period: str) -> int:
        """Nano-dollars ``tenant`` spent in ``period`` (tenant-info)."""

    async def aclose(self) -> None:
        await self._book.aclose()

    # --- What a backend implements: its store operations, on checked input. ---

    @abstractmethod
    async def _take(
        self,
        tenant: str,
        keys: Keys,
        rates: Rates,
        tokens: int,
        now: float | None,
        budget: Budget | None,
        lease: str,
    ) -> Levels:
        """All or nothing: one request, ``tokens`` and (with a concurrency limit) the slot
        ``lease``, unless a limit or the budget refuses."""

    @abstractmethod
    async def _finish(
        self,
        tenant: str,
        keys: Keys,
        tpm: int,
        reserved_tokens: int,
        actual_tokens: int,
        now: float | None,
        charge: Charge | None,
        lease: str | None,
    ) -> None:
        """Settle the tokens at ``tpm`` (0: nothing to settle), free ``lease`` and add
        ``charge`` (None: nothing to add), and keep the lease book up to date."""

    @abstractmethod
    async def _levels(self, keys: Keys, rates: Rates, now: float | None) -> Levels:
        """The drained levels and live leases now; changes nothing."""
