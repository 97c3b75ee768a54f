"""Monthly spend per tenant, checked before a request and charged when it finishes.

Spend is counted in integer nano-dollars so that adding many small costs is exact in
Python and in Redis alike (float sums drift; micro-dollars would round a cheap model's
single-token cost to zero). A month is a UTC calendar month, "YYYY-MM".

Two stores behind one interface, chosen with the limiter (``limits.backend``):
- ``MemoryBudgets``: one process; each tenant's month starts from the usage ledger's sum, so
  a restart does not forget what was spent.
- ``RedisBudgets``: one counter per tenant and month shared by every replica
  (``INCRBY``). A counter that does not exist yet starts from this replica's ledger
  (``SET NX``: the first replica to look wins, so a fresh Redis does not zero a month).

A request may overshoot the budget by its own cost: it is checked before it runs and charged
after, when its cost is known. Requests then get 429 ``budget_exceeded`` until the next month.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, Protocol

import redis.asyncio as aioredis
import redis.exceptions

from extproc.limits import LimiterUnavailable, redis_client

NANO: Final = 1_000_000_000
# Long enough to outlive the month it counts; short enough to clean itself up.
_KEY_TTL_S: Final = 40 * 24 * 3600

#: Reads a tenant's spend in a month from the durable ledger, in USD.
LedgerSpend = Callable[[str, str], float]


def seconds_to_next_month(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp() - now


def to_nano(usd: float) -> int:
    return round(usd * NANO)


class Budgets(Protocol):
    async def spent(self, tenant: str, period: str) -> float:
        """USD spent by ``tenant`` in ``period``."""

    async def charge(self, tenant: str, period: str, usd: float) -> None: ...

    async def aclose(self) -> None: ...


class MemoryBudgets:
    def __init__(self, ledger_spend: LedgerSpend) -> None:
        self._ledger_spend = ledger_spend
        self._nano: dict[tuple[str, str], int] = {}

    def _get(self, tenant: str, period: str) -> int:
        key = (tenant, period)
        value = self._nano.get(key)
        if value is None:
            value = self._nano[key] = to_nano(self._ledger_spend(tenant, period))
        return value

    async def spent(self, tenant: str, period: str) -> float:
        return self._get(tenant, period) / NANO

    async def charge(self, tenant: str, period: str, usd: float) -> None:
        self._nano[(tenant, period)] = self._get(tenant, period) + to_nano(usd)

    async def aclose(self) -> None:
        return None


# Adds to an existing counter only: a missing one (new month, restarted or flushed Redis)
# must first be seeded from the ledger, or the month's spend would restart from zero.
_LUA_CHARGE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBY', KEYS[1], ARGV[1])
end
return false
"""


class RedisBudgets:
    def __init__(self, client: aioredis.Redis, ledger_spend: LedgerSpend) -> None:
        self._client = client
        self._ledger_spend = ledger_spend
        self._charge = client.register_script(_LUA_CHARGE)

    @staticmethod
    def _key(tenant: str, period: str) -> str:
        # Tenant ids cannot contain '{', '}' or ':' (config.TenantId): one key, one tenant.
        return f"checkstream:budget:{{{tenant}}}:{period}"

    async def _seed(self, key: str, tenant: str, period: str) -> None:
        # NX: when several replicas seed at once, the first wins and the others keep it.
        start = to_nano(self._ledger_spend(tenant, period))
        await self._client.set(key, start, nx=True, ex=_KEY_TTL_S)

    async def spent(self, tenant: str, period: str) -> float:
        key = self._key(tenant, period)
        try:
            value = await self._client.get(key)
            if value is None:
                await self._seed(key, tenant, period)
                value = await self._client.get(key)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise LimiterUnavailable(f"budget store unreachable: {type(exc).__name__}") from exc
        return int(value or 0) / NANO

    async def charge(self, tenant: str, period: str, usd: float) -> None:
        key = self._key(tenant, period)
        amount = to_nano(usd)
        try:
            if await self._charge(keys=[key], args=[amount]) is None:
                await self._seed(key, tenant, period)
                await self._charge(keys=[key], args=[amount])
        except (redis.exceptions.RedisError, OSError) as exc:
            raise LimiterUnavailable(f"budget store unreachable: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()


def build_budgets(url: str | None, ledger_spend: LedgerSpend) -> Budgets:
    """Redis when ``url`` is given (``limits.backend: redis``), else in-process."""
    if url is None:
        return MemoryBudgets(ledger_spend)
    return RedisBudgets(redis_client(url), ledger_spend)
