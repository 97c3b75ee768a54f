"""The usage ledger: SQLite by default, PostgreSQL for a fleet, and the reports read from it
(worker, CLI)."""
