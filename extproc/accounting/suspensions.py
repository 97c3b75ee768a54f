"""Admin suspensions, kept in one place: Redis when the gateway has one, else its launcher.

Run by the launcher (writes) and by every extproc worker (follows). One truth per tenant:

- ``suspended: true`` in the config always suspends; an admin resume cannot lift it (409).
- An admin suspension is a field of one Redis hash when ``limits.backend`` is ``redis``: no
  launcher keeps a copy, a resume deletes the field, and every worker of every replica reads
  the hash every ``FOLLOW_EVERY_S`` (and the replica that took the order at once), so all
  agree within a second. Without Redis there is one gateway, and its launcher's dict is the
  only copy (``control.py`` hands it to its workers).
- A write that cannot reach Redis changes nothing and is refused (503): no half-applied
  state waits in a launcher for a later reload to apply it.
- A worker that cannot read Redis keeps the last state it read (logged once per outage).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

import redis.exceptions

from checkstream.config.model import LoadedConfig
from checkstream.limits.redis import redis_client
from checkstream.ops import logs

log = logs.get("checkstream.suspensions")

KEY: Final = "checkstream:suspensions"
# Half the agreement goal: a follower's read lands within a second of the write.
FOLLOW_EVERY_S: Final = 0.5
_ERRORS = (redis.exceptions.RedisError, OSError)


class SuspensionStoreUnavailable(Exception):
    """Redis could not be reached; nothing was changed."""


@dataclass(frozen=True)
class SuspensionOutcome:
    #: 200 done, 404 unknown tenant, 409 held by the config, 503 store unreachable.
    status: int
    error: str | None = None


def kept_in_redis(loaded: LoadedConfig) -> bool:
    limits = loaded.model.limits
    return limits.backend == "redis" and bool(limits.url)


def shared_suspensions(loaded: LoadedConfig) -> SharedSuspensions | None:
    """The Redis store for this config's admin suspensions, or None (the launcher keeps them)."""
    url = loaded.model.limits.url
    return SharedSuspensions(url) if kept_in_redis(loaded) and url else None


async def record_suspension(
    loaded: LoadedConfig, tenant: str, suspended: bool, local: set[str]
) -> SuspensionOutcome:
    """Record an admin's suspend or resume where it lives: Redis, or ``local`` (the launcher's
    set) when the config has no Redis. A refusal changes nothing."""
    tenants = loaded.model.tenants.configs
    if tenant not in tenants:
        return SuspensionOutcome(404, f"unknown tenant: {tenant}")
    if not suspended and tenants[tenant].suspended:
        where = loaded.doc.problem(
            ("tenants", "configs", tenant, "suspended"),
            "the config suspends this tenant, which an admin resume cannot lift: "
            "set it to false there and reload",
        )
        return SuspensionOutcome(409, str(where))
    shared = shared_suspensions(loaded)
    if shared is None:
        (local.add if suspended else local.discard)(tenant)
        return SuspensionOutcome(200)
    try:
        await shared.write(tenant, suspended)
    except SuspensionStoreUnavailable as exc:
        message = (
            f"suspensions are kept in Redis (limits.url), which cannot be reached: {exc}; "
            "nothing was changed, try again"
        )
        return SuspensionOutcome(503, message)
    finally:
        await shared.aclose()
    return SuspensionOutcome(200)


class SharedSuspensions:
    def __init__(self, url: str) -> None:
        self._redis = redis_client(url)

    async def write(self, tenant: str, suspended: bool) -> None:
        try:
            if suspended:
                await self._redis.hset(KEY, tenant, "1")
            else:
                await self._redis.hdel(KEY, tenant)
        except _ERRORS as exc:
            raise SuspensionStoreUnavailable(str(exc)) from exc

    async def read(self) -> set[str]:
        """The suspended tenants (a first-round "0" value, a resume, is not a suspension)."""
        try:
            found = await self._redis.hgetall(KEY)
        except _ERRORS as exc:
            raise SuspensionStoreUnavailable(str(exc)) from exc
        return {_text(key) for key, value in found.items() if _text(value) == "1"}

    async def refresh(self, into: set[str]) -> None:
        """Make ``into`` equal to the shared state now."""
        current = await self.read()
        into.clear()
        into.update(current)

    async def follow(self, into: set[str]) -> None:
        """Keep ``into`` equal to the shared state until cancelled."""
        failing = False
        while True:
            try:
                await self.refresh(into)
            except SuspensionStoreUnavailable as exc:
                if not failing:
                    log.error("suspensions_unavailable", error=str(exc))
                failing = True
            else:
                failing = False
            await asyncio.sleep(FOLLOW_EVERY_S)

    async def aclose(self) -> None:
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
