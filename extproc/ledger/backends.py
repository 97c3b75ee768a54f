"""The usage ledger's one interface and the choice of its backend (``usage.backend``).

Run by extproc workers (``open_ledger``) and the CLI (``read_report``, ``read_request_times``).
Two backends keep the same promise (a recorded request is durable when ``record`` returns):
SQLite (``extproc/ledger/usage.py``, one file per machine, the default) and PostgreSQL
(``extproc/ledger/postgres.py``, one ledger for a fleet).
"""

from __future__ import annotations

import os
from typing import Protocol

from checkstream.config.model import LoadedConfig, UsageConfig
from checkstream.ledger.usage import (
    UsageError,
    UsageLedger,
    UsageRecord,
    UsageRow,
    report,
    request_times,
    resolve_usage_path,
)


class Ledger(Protocol):
    #: The last write failed; the next that succeeds clears it.
    failing: bool

    async def record(self, rec: UsageRecord) -> None:
        """Return once ``rec`` is durable; raise LedgerWriteError if it is not."""

    async def month_spend(self, tenant: str, period: str) -> float:
        """What ``tenant`` spent in ``period`` ("YYYY-MM"), as far as this ledger knows."""

    async def day_spend(self, tenant: str, start: float) -> float:
        """``tenant``'s committed cost in the UTC day starting at epoch ``start``."""
        ...

    async def report(self, *, tenant: str | None, period: str, by_model: bool) -> list[UsageRow]:
        """Totals per tenant (and model) for a month."""

    async def request_times(self, tenant: str, since: float) -> dict[str, float]:
        """``tenant``'s request ids recorded at or after ``since``, with their time."""

    async def aclose(self) -> None:
        """Make what is queued durable and release the store."""


def usage_dsn(usage: UsageConfig) -> str:
    """The PostgreSQL URL: ``usage.url`` or the variable ``usage.url_env`` names."""
    if usage.url is not None:
        return usage.url
    name = usage.url_env or ""
    value = os.environ.get(name)
    if not value:
        raise UsageError(f"usage.url_env: environment variable {name} is not set")
    return value


def open_ledger(loaded: LoadedConfig) -> Ledger | None:
    """The configured ledger, or None when usage is off. PostgreSQL's schema is brought up to
    date here (blocking, at start); its errors are LedgerUnavailable (an OSError)."""
    usage = loaded.model.usage
    if not usage.enabled:
        return None
    if usage.backend == "postgres":
        from checkstream.ledger.postgres import PostgresLedger

        return PostgresLedger.open(usage_dsn(usage))
    return UsageLedger.open(resolve_usage_path(loaded))


def read_report(
    loaded: LoadedConfig, *, tenant: str | None, period: str, by_model: bool
) -> list[UsageRow]:
    """``checkstream usage``: blocking, raises UsageError in the user's terms."""
    usage = loaded.model.usage
    if usage.backend == "postgres":
        from checkstream.ledger import postgres as usage_postgres

        return usage_postgres.report(
            usage_dsn(usage), tenant=tenant, period=period, by_model=by_model
        )
    return report(resolve_usage_path(loaded), tenant=tenant, period=period, by_model=by_model)


def read_request_times(loaded: LoadedConfig, tenant: str, since: float) -> dict[str, float]:
    """A tenant's ledger request ids since ``since``: blocking, raises UsageError."""
    usage = loaded.model.usage
    if usage.backend == "postgres":
        from checkstream.ledger import postgres as usage_postgres

        return usage_postgres.request_times(usage_dsn(usage), tenant, since)
    return request_times(resolve_usage_path(loaded), tenant, since)
