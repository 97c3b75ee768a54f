"""Rate limits, concurrency leases and budgets, in memory or in Redis (Lua scripts in lua/)
(worker)."""
