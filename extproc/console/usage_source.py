"""What the operator console reads from the usage ledger, behind one narrow interface.

Run by the admin server, in a thread (the reads block). The console never opens the ledger's
tables itself: months come from ``usage.report`` (the same query as ``checkstream usage``)
and days from ``ledger/days.py`` (SQLite) or ``ledger/postgres.py``. With the shared PostgreSQL
ledger the console's tokens and spend are the whole fleet's.
"""

from __future__ import annotations

from datetime import date
from typing import Protocol

from checkstream.config.model import LoadedConfig
from checkstream.ledger import postgres
from checkstream.ledger.backends import usage_dsn
from checkstream.ledger.days import DailyRow, daily_report
from checkstream.ledger.usage import UsageRow, report, resolve_usage_path


class UsageSource(Protocol):
    def month(self, period: str, *, tenant: str | None, by_model: bool) -> list[UsageRow]:
        """``checkstream usage`` rows for ``period`` (YYYY-MM); empty before the first row."""
        ...

    def days(self, since: date, *, tenant: str | None) -> list[DailyRow]:
        """Per tenant, UTC day and model from ``since`` on; empty before the first row."""
        ...


class SqliteUsageSource:
    def __init__(self, loaded: LoadedConfig) -> None:
        self.path = resolve_usage_path(loaded)

    def month(self, period: str, *, tenant: str | None, by_model: bool) -> list[UsageRow]:
        if not self.path.is_file():  # no request recorded yet
            return []
        return report(self.path, tenant=tenant, period=period, by_model=by_model)

    def days(self, since: date, *, tenant: str | None) -> list[DailyRow]:
        if not self.path.is_file():
            return []
        return daily_report(self.path, tenant=tenant, since=since)


class PostgresUsageSource:
    """The fleet's shared ledger: tokens and spend of every replica."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.url = usage_dsn(loaded.model.usage)

    def month(self, period: str, *, tenant: str | None, by_model: bool) -> list[UsageRow]:
        return postgres.report(self.url, tenant=tenant, period=period, by_model=by_model)

    def days(self, since: date, *, tenant: str | None) -> list[DailyRow]:
        return postgres.daily_report(self.url, tenant=tenant, since=since)


def usage_source(loaded: LoadedConfig) -> UsageSource | None:
    """The ledger this config writes, or None when usage is not recorded."""
    if not loaded.model.usage.enabled:
        return None
    if loaded.model.usage.backend == "postgres":
        return PostgresUsageSource(loaded)
    return SqliteUsageSource(loaded)

