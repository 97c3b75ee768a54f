"""Per-tenant, hash-chained audit trails and their verification (worker, CLI)."""
