"""Every replica's five-minute traffic in Redis, so any replica's console shows the fleet's.

Run by the admin server of each replica when the config keeps its shared state in Redis
(``limits.backend: redis``). Each refresh writes this replica's window (per tenant: rpm,
requests, errors, the last minute, latency bucket counts; all of them add up across
replicas) as one field of a hash, named after the replica; reading sums the fields written
within ``FRESH_S``. A replica that stopped writing drops out of the sums after ``FRESH_S``
and its field is removed after ``FORGET_S``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Final

import redis.exceptions

from checkstream.console.traffic import NO_TRAFFIC, WindowStats
from checkstream.limits.redis import redis_client

KEY: Final = "checkstream:console:traffic"
FRESH_S: Final = 30.0
FORGET_S: Final = 3600.0
ERRORS: Final = (redis.exceptions.RedisError, OSError, ValueError)


def _encode(stats: Mapping[str, WindowStats], at: float) -> str:
    tenants = {
        tenant: [
            s.rpm,
            s.requests,
            s.errors,
            s.requests_last_minute,
            s.tokens_last_minute,
            list(s.total_buckets),
            list(s.check_buckets),
        ]
        for tenant, s in stats.items()
        if s.requests or s.requests_last_minute
    }
    return json.dumps({"at": at, "tenants": tenants}, separators=(",", ":"))


def _decode(raw: Any) -> tuple[float, dict[str, WindowStats]]:
    data = json.loads(raw)
    found = {}
    for tenant, v in data["tenants"].items():
        found[tenant] = WindowStats(
            float(v[0]), float(v[1]), float(v[2]), float(v[3]), float(v[4]),
            tuple(float(x) for x in v[5]), tuple(float(x) for x in v[6]),
        )  # fmt: skip
    return float(data["at"]), found


class FleetTraffic:
    def __init__(self, url: str, replica: str) -> None:
        self.url = url
        self.replica = replica
        self._redis = redis_client(url)

    async def exchange(
        self, mine: Mapping[str, WindowStats], now: float | None = None
    ) -> tuple[dict[str, WindowStats], int]:
        """Publish this replica's window; the fleet's sums and how many replicas are in them.
        Raises one of ``ERRORS`` when Redis cannot be reached."""
        at = time.time() if now is None else now
        await self._redis.hset(KEY, self.replica, _encode(mine, at))
        fields = await self._redis.hgetall(KEY)
        totals: dict[str, WindowStats] = {}
        replicas = 0
        stale = []
        for name, raw in fields.items():
            written, stats = _decode(raw)
            if written < at - FORGET_S:
                stale.append(name)
            if written < at - FRESH_S:
                continue
            replicas += 1
            for tenant, s in stats.items():
                totals[tenant] = totals.get(tenant, NO_TRAFFIC) + s
        if stale:
            await self._redis.hdel(KEY, *stale)
        return totals, replicas

    async def aclose(self) -> None:
        await self._redis.aclose()
