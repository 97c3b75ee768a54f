"""A tenant's rows in the usage ledger, read and deleted for offboarding (CLI).

The same two operations on either ledger: the default SQLite file or the fleet's PostgreSQL
database. A purge deletes the rows and records itself in one transaction, so a ledger never
shows rows gone without the purge that removed them.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Protocol

import psycopg

from checkstream.config.model import LoadedConfig
from checkstream.ledger.backends import usage_dsn
from checkstream.ledger.postgres import TABLE, redacted
from checkstream.ledger.usage import resolve_usage_path

COLUMNS = (
    "time",
    "period",
    "request_id",
    "tenant",
    "model",
    "input_tokens",
    "output_tokens",
    "estimated",
    "status",
    "latency_ms",
    "cost_usd",
)
_PURGES = """CREATE TABLE IF NOT EXISTS {table} (
    time {real} NOT NULL,
    tenant TEXT NOT NULL,
    usage_rows INTEGER NOT NULL,
    audit_files INTEGER NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    operator TEXT NOT NULL
)"""


class LedgerRowsError(Exception):
    """The ledger cannot be read or changed; the message is for the operator."""


class LedgerRows(Protocol):
    #: Where the rows are, for messages and the export's manifest (no password).
    where: str

    def rows(self, tenant: str) -> list[tuple[Any, ...]]:
        """The tenant's rows, ``COLUMNS`` each, oldest first."""
        ...

    def purge(self, tenant: str, audit_files: int, manifest_sha: str, operator: str) -> int:
        """Delete the tenant's rows and record the purge; the number of rows deleted."""
        ...


class SqliteRows:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def rows(self, tenant: str) -> list[tuple[Any, ...]]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return conn.execute(
                f"SELECT {', '.join(COLUMNS)} FROM usage WHERE tenant = ? ORDER BY time, rowid",
                (tenant,),
            ).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise LedgerRowsError(f"{self.path}: {exc}") from None
        finally:
            conn.close()

    def purge(self, tenant: str, audit_files: int, manifest_sha: str, operator: str) -> int:
        conn = sqlite3.connect(self.path)
        try:
            with conn:
                conn.execute(_PURGES.format(table="purges", real="REAL"))
                try:
                    deleted = conn.execute("DELETE FROM usage WHERE tenant = ?", (tenant,)).rowcount
                except sqlite3.OperationalError as exc:
                    if "no such table" not in str(exc):
                        raise
                    deleted = 0
                conn.execute(
                    "INSERT INTO purges VALUES (?, ?, ?, ?, ?, ?)",
                    (time.time(), tenant, deleted, audit_files, manifest_sha, operator),
                )
        finally:
            conn.close()
        return int(deleted)


class PostgresRows:
    def __init__(self, url: str) -> None:
        self.url = url
        self.where = redacted(url)

    def rows(self, tenant: str) -> list[tuple[Any, ...]]:
        # `estimated` as 0/1, as the SQLite ledger stores it: one export format for both.
        columns = ", ".join("estimated::int" if c == "estimated" else c for c in COLUMNS)
        query = f"SELECT {columns} FROM {TABLE} WHERE tenant = %s ORDER BY time, request_id"
        try:
            with psycopg.connect(self.url) as conn:
                if conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone() == (None,):
                    return []
                return conn.execute(query, (tenant,)).fetchall()
        except psycopg.Error as exc:
            raise LedgerRowsError(f"usage ledger {self.where}: {exc}") from None

    def purge(self, tenant: str, audit_files: int, manifest_sha: str, operator: str) -> int:
        purges = f"{TABLE}_purges"
        try:
            with psycopg.connect(self.url) as conn, conn.transaction():
                conn.execute(_PURGES.format(table=purges, real="double precision"))
                deleted = conn.execute(f"DELETE FROM {TABLE} WHERE tenant = %s", (tenant,)).rowcount
                conn.execute(
                    f"INSERT INTO {purges} VALUES (%s, %s, %s, %s, %s, %s)",
                    (time.time(), tenant, deleted, audit_files, manifest_sha, operator),
                )
        except psycopg.Error as exc:
            raise LedgerRowsError(f"usage ledger {self.where}: {exc}") from None
        return int(deleted)


def ledger_rows(loaded: LoadedConfig) -> LedgerRows:
    """The ledger ``loaded`` writes."""
    usage = loaded.model.usage
    if usage.backend == "postgres":
        return PostgresRows(usage_dsn(usage))
    return SqliteRows(resolve_usage_path(loaded))
