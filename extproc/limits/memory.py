"""The in-process limiter backend: exact for one extproc worker (worker).

Each operation runs without awaiting once its input is read, so on one event loop every
operation is atomic; several worker processes each get their own counts (use Redis). The
state mirrors Redis's (same keys, an empty bucket forgotten as a deleted key) so both backends
give the same answers.
"""

from __future__ import annotations

import time

from checkstream.limits.base import DEFAULT_LEASE_S, Keys, LedgerSpend, Limiter, nothing_spent
from checkstream.limits.decisions import (
    WINDOW_MS,
    Budget,
    Charge,
    Levels,
    Rates,
    drain,
    fits,
    to_ms,
)


def _clock_ms(now: float | None) -> int:
    return to_ms(time.time() if now is None else now)


class MemoryLimiter(Limiter):
    """Exact for one process; see the module docstring."""

    def __init__(
        self,
        ledger_spend: LedgerSpend = nothing_spent,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        heartbeat: bool = True,
    ) -> None:
        super().__init__(ledger_spend, lease_s, heartbeat)
        self._buckets: dict[str, tuple[int, int]] = {}
        #: lease key -> {lease id: expiry in ms}, as Redis's sorted sets.
        self._leases: dict[str, dict[str, int]] = {}
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
        if budget is not None:
            await self._seed(tenant, budget.period)  # the only await: before anything is read
        t = _clock_ms(now)
        rl, rt = self._load(keys.rpm, t)
        tl, tt = self._load(keys.tpm, t)
        if rates.rpm:
            rl = drain(rl, rt, t, rates.rpm)
        if rates.tpm:
            tl = drain(tl, tt, t, rates.tpm)
        in_flight = self._live_leases(keys.leases, t) if rates.concurrency else 0
        if budget is not None and self._month(tenant, budget.period) >= budget.limit_nano:
            return Levels(False, t, rl, tl, in_flight, over_budget=True)
        ok = (
            (not rates.rpm or fits(rl, rates.rpm, 1))
            and (not rates.tpm or fits(tl, rates.tpm, tokens))
            and (not rates.concurrency or in_flight + 1 <= rates.concurrency)
        )
        if ok:
            if rates.rpm:
                rl += WINDOW_MS
                self._store(keys.rpm, rl, max(rt, t))
            if rates.tpm:
                tl += tokens * WINDOW_MS
                self._store(keys.tpm, tl, max(tt, t))
            if rates.concurrency:
                self._leases.setdefault(keys.leases, {})[lease] = t + self._book.lease_ms
                in_flight += 1
        return Levels(ok, t, rl, tl, in_flight)

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
        t = _clock_ms(now)
        book = self._book
        for lease, key in list(book.held.items()):
            leases = self._leases.get(key)
            if leases is not None and lease in leases:  # never revive an expired lease
                leases[lease] = t + book.lease_ms
            else:  # expired, or freed by a finish this limiter did not start
                book.freed(lease, key)

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
        if charge is not None:
            await self._seed(tenant, charge.period)  # the only await: before anything changes
        if tpm:
            t = _clock_ms(now)
            level, ts = self._load(keys.tpm, t)
            level = drain(level, ts, t, tpm)
            # A refund cannot take the bucket below empty; an overrun may push it past full
            # (debt), which then delays the tenant's next requests: the tokens were really used.
            level = max(0, level + (actual_tokens - reserved_tokens) * WINDOW_MS)
            self._store(keys.tpm, level, max(ts, t))
        if lease is not None:
            leases = self._leases.get(keys.leases)
            if leases is not None:
                leases.pop(lease, None)
                if not leases:
                    del self._leases[keys.leases]
            self._book.freed(lease, keys.leases)
        if charge is not None:
            self._spent[(tenant, charge.period)] = self._month(tenant, charge.period) + charge.nano

    async def _levels(self, keys: Keys, rates: Rates, now: float | None) -> Levels:
        t = _clock_ms(now)
        rl, rt = self._load(keys.rpm, t)
        tl, tt = self._load(keys.tpm, t)
        rl = drain(rl, rt, t, rates.rpm) if rates.rpm else 0
        tl = drain(tl, tt, t, rates.tpm) if rates.tpm else 0
        leases = self._leases.get(keys.leases, {})
        in_flight = sum(1 for expiry in leases.values() if expiry > t)
        return Levels(False, t, rl, tl, in_flight)
