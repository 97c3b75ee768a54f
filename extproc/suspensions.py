"""Admin suspensions shared by every replica, when limits and budgets live in Redis.

``POST /admin/tenants/<id>/suspend`` reaches one gateway. Its launcher tells its own workers
at once (``control.py``); with ``limits.backend: redis`` it also records the suspension in
one Redis hash, which every worker of every replica reads every ``FOLLOW_EVERY_S`` and at
start. So a suspension sent to any replica applies to all within a second, and survives
restarts, like the counts it sits next to. A Redis outage keeps the last known state.
"""

from __future__ import annotations

import asyncio
from typing import Final

import redis.exceptions

from extproc import logs
from extproc.limits import redis_client

log = logs.get("checkstream.suspensions")

KEY: Final = "checkstream:suspensions"
FOLLOW_EVERY_S: Final = 1.0
_ERRORS = (redis.exceptions.RedisError, OSError)


class SharedSuspensions:
    def __init__(self, url: str) -> None:
        self._redis = redis_client(url)

    async def set(self, tenant: str, suspended: bool) -> None:
        await self._redis.hset(KEY, tenant, "1" if suspended else "0")

    async def read(self) -> dict[str, bool]:
        found = await self._redis.hgetall(KEY)
        return {_text(key): _text(value) == "1" for key, value in found.items()}

    async def follow(self, into: dict[str, bool]) -> None:
        """Keep ``into`` equal to the shared state until cancelled."""
        failing = False
        while True:
            try:
                current = await self.read()
            except _ERRORS as exc:
                if not failing:
                    log.error("suspensions_unavailable", error=str(exc))
                failing = True
            else:
                failing = False
                into.clear()
                into.update(current)
            await asyncio.sleep(FOLLOW_EVERY_S)

    async def aclose(self) -> None:
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
