"""What each request costs and how it is closed: tallies, metering, budgets and alerts,
suspensions, store failures (worker)."""
