"""Rate limits, concurrency leases and budgets, in memory or in Redis (worker).

decisions.py: what a check answers and the GCRA arithmetic; base.py: the `Limiter` interface
with the guards and lease book both backends share; memory.py and redis.py: the backends (Lua
scripts in lua/); daily.py: daily spend quotas. `build_limiter` picks the configured backend.
"""

from __future__ import annotations

from checkstream.config.model import LimitsConfig
from checkstream.limits.base import LedgerSpend, Limiter, nothing_spent
from checkstream.limits.memory import MemoryLimiter
from checkstream.limits.redis import RedisLimiter


def build_limiter(config: LimitsConfig, ledger_spend: LedgerSpend = nothing_spent) -> Limiter:
    if config.backend == "redis":
        if not config.url:
            raise ValueError("limits.backend redis needs limits.url")
        return RedisLimiter(config.url, ledger_spend=ledger_spend, lease_s=config.lease_s)
    return MemoryLimiter(ledger_spend, lease_s=config.lease_s)
