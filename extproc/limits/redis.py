"""The Redis limiter backend: exact across every worker and replica sharing one Redis (worker).

Each operation is one Lua script (``lua/*.lua``, package data, one file per operation, with
``common.lua``'s shared functions first), which Redis runs atomically. Scripts called in the
same event-loop turn go to Redis as one pipeline. A month's spend counter that does not exist
yet is seeded from the usage ledger with ``SET NX`` (the first replica to seed wins). Also
home of `redis_client`, the bounded client every Redis-backed store of the worker uses.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript

from checkstream.limits.base import (
    DEFAULT_LEASE_S,
    Keys,
    LedgerSpend,
    Limiter,
    budget_key,
    nothing_spent,
)
from checkstream.limits.decisions import Budget, Charge, Levels, LimiterUnavailable, Rates, to_ms

# A month's spend counter outlives its month, then cleans itself up.
_BUDGET_TTL_S: Final = 40 * 24 * 3600
# A counter removed again right after its seed (FLUSHDB, eviction) is seeded again this often.
_SEED_ATTEMPTS: Final = 3
_COUNTER_VANISHES: Final = "the budget counter keeps vanishing from Redis (flushed or evicted?)"

# Concurrent operations beyond this wait for a free connection (up to the timeout) instead
# of failing: a busy gateway must not turn a healthy Redis into LimiterUnavailable.
MAX_REDIS_CONNECTIONS: Final = 64

_UNREACHABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    OSError,
)


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


def _script(name: str, *, common: bool = True) -> str:
    """A Lua script shipped in ``lua/`` (package data), with the shared functions first."""
    here = Path(__file__).parent / "lua"
    body = (here / f"{name}.lua").read_text()
    return (here / "common.lua").read_text() + body if common else body


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
    """Empty: the script reads Redis ``TIME``, the one clock all replicas share."""
    return "" if now is None else str(to_ms(now))


#: A script call waiting for the next pipeline: script, keys, args, the caller's future.
_Call = tuple[AsyncScript, list[str], list[str], "asyncio.Future[Any]"]


class RedisLimiter(Limiter):
    """Exact across every process and replica sharing one Redis: each operation is one Lua
    script, which Redis runs atomically."""

    def __init__(
        self,
        url: str,
        *,
        ledger_spend: LedgerSpend = nothing_spent,
        timeout_s: float = 1.0,
        lease_s: float = DEFAULT_LEASE_S,
        heartbeat: bool = True,
    ) -> None:
        super().__init__(ledger_spend, lease_s, heartbeat)
        self._url = _redacted(url)
        # Bounded timeouts: a hung Redis must turn into LimiterUnavailable (and the fail mode)
        # quickly, not into a request stuck behind it.
        self._redis = redis_client(url, timeout_s)
        self._lease_ms = str(self._book.lease_ms)
        register = self._redis.register_script
        self._acquire = register(_script("acquire"))
        self._release = register(_script("release", common=False))
        self._renew = register(_script("renew"))
        self._finish_script = register(_script("finish"))
        self._remaining = register(_script("remaining"))
        self._pending: list[_Call] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    def _unavailable(self, exc: BaseException) -> LimiterUnavailable:
        return LimiterUnavailable(f"rate-limit store {self._url} is unavailable: {exc}")

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
            results = [self._unavailable(exc)] * len(batch)
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
            await self._redis.set(budget_key(tenant, period), start, nx=True, ex=_BUDGET_TTL_S)
        except _UNREACHABLE as exc:
            raise self._unavailable(exc) from exc

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
        key = budget_key(tenant, period)
        try:
            value = await self._redis.get(key)
            if value is None:
                await self._seed(tenant, period)
                value = await self._redis.get(key)
        except _UNREACHABLE as exc:
            raise self._unavailable(exc) from exc
        return int(value or 0)

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
        script_keys = list(keys)
        args = [
            _arg_now(now),
            str(rates.rpm),
            str(rates.tpm),
            str(rates.concurrency),
            str(tokens),
            self._lease_ms,
            "" if budget is None else str(budget.limit_nano),
            lease,
        ]
        if budget is not None:
            script_keys.append(budget_key(tenant, budget.period))
        period = budget.period if budget is not None else None
        ok, t, rl, tl, in_flight, over = await self._run_seeded(
            self._acquire, script_keys, args, tenant, period
        )
        return Levels(bool(ok), t, rl, tl, in_flight, over_budget=bool(over))

    async def renew(self, now: float | None = None) -> None:
        book = self._book
        held = list(book.by_key(book.held).items())
        calls = [
            self._run(self._renew, [key], [_arg_now(now), self._lease_ms, *leases])
            for key, leases in held
        ]
        retried = list(book.by_key(book.unreleased).items())
        calls += [self._run(self._release, [key], leases) for key, leases in retried]
        # One pipeline for all of them (same event-loop turn).
        results = await asyncio.gather(*calls, return_exceptions=True)
        for (key, leases), gone in zip(held, results[: len(held)], strict=True):
            if not isinstance(gone, BaseException):
                for position in gone:  # expired, or freed by another worker
                    book.freed(leases[position - 1], key)
        outcomes = results[len(held) :]
        for (key, leases), result in zip(retried, outcomes, strict=True):
            if not isinstance(result, BaseException):
                for lease in leases:
                    book.freed(lease, key)
        for result in results:
            if isinstance(result, BaseException):
                raise result

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
        if not (tpm or lease is not None or charge is not None):
            return  # nothing to change: no round trip
        script_keys = [keys.tpm, keys.leases]
        args = [_arg_now(now), str(tpm), str(reserved_tokens), str(actual_tokens)]
        args += [lease or "", ""]
        if charge is not None:
            script_keys.append(budget_key(tenant, charge.period))
            args[-1] = str(charge.nano)
        period = charge.period if charge is not None else None
        try:
            await self._run_seeded(self._finish_script, script_keys, args, tenant, period)
        except LimiterUnavailable:
            if lease is not None:
                self._book.lost(lease)
            raise
        if lease is not None:
            self._book.freed(lease, keys.leases)

    async def _levels(self, keys: Keys, rates: Rates, now: float | None) -> Levels:
        args = [_arg_now(now), str(rates.rpm), str(rates.tpm)]
        t, rl, tl, in_flight = await self._run(self._remaining, list(keys), args)
        return Levels(False, t, rl, tl, in_flight)

    async def aclose(self) -> None:
        await super().aclose()
        await self._redis.aclose()
