"""The usage ledger in PostgreSQL: one ledger for every replica of a fleet.

Run by extproc workers (recording, budget seeds, tenant-info) and the CLI (reports, audit
completeness). Same guarantee as the SQLite ledger (``extproc/ledger/usage.py``): ``record()``
returns only once its row is committed (PostgreSQL's default ``synchronous_commit = on``
flushes the WAL at commit). Rows wait while a batch commits and then go as the next batch:
one ``INSERT ... SELECT FROM unnest(...)`` statement, one round trip and one commit per batch,
not per request.

A request id is recorded once per tenant (``ON CONFLICT DO NOTHING``): finishing a request
again, from a retry or a second path, cannot bill it twice; the key includes the tenant, so
one tenant's ids never suppress another's rows.

The schema is CheckStream's: ``migrate`` creates and upgrades it under a transaction-scoped
advisory lock, so replicas starting together apply each migration once. It runs from a plain
blocking connection while the worker starts (a wrong URL or a server that is down fails the
start with a clear message rather than the first request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg_pool import AsyncConnectionPool

from checkstream.ledger.days import DailyRow
from checkstream.ledger.usage import (
    BILLABLE,
    LedgerWriteError,
    UsageError,
    UsageRecord,
    UsageRow,
    check_period,
    period_of,
    report_row,
)

TABLE = "checkstream_usage"
# Any constant shared by every CheckStream: replicas migrating together take turns.
_MIGRATION_LOCK = 0x63_6B_73_74_72_6D  # "ckstrm"
_CONNECT_TIMEOUT_S = 5
# A batch that takes longer than this has a hung server behind it: its requests are told
# (logged, counted) instead of waiting forever.
_COMMIT_TIMEOUT_S = 15.0
# Reads seed budgets inside a request: below Envoy's ext_proc message timeout (5 s), so the
# tenant's fail mode answers rather than Envoy.
_READ_TIMEOUT_S = 3.0
_MAX_BATCH = 1000
# Batches committing at once, each on its own pooled connection. One: rows that arrive during
# a commit make the next, larger batch, which costs less CPU per request where CPU is what
# runs out (bench/ledger.py, 2 cores); more would help where PostgreSQL's latency is the limit.
_WRITERS = 1

#: Version n is reached by running _MIGRATIONS[n - 1]; never edit one that has shipped.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE {TABLE} (
            tenant text NOT NULL,
            request_id text NOT NULL,
            time double precision NOT NULL,
            period text NOT NULL,
            model text NOT NULL,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            estimated boolean NOT NULL,
            status integer NOT NULL,
            latency_ms double precision NOT NULL,
            cost_usd double precision NOT NULL,
            PRIMARY KEY (tenant, request_id)
        )""",
        # Covering for month_spend, which seeds budgets.
        f"CREATE INDEX {TABLE}_tenant_period ON {TABLE} (tenant, period) INCLUDE (cost_usd)",
    ),
    # Audit completeness reads a tenant's ids by time.
    (f"CREATE INDEX {TABLE}_tenant_time ON {TABLE} (tenant, time)",),
)
SCHEMA_VERSION = len(_MIGRATIONS)

# A whole batch is one statement (one column array per parameter): one round trip, and as
# a single statement in autocommit mode it is its own transaction, all rows or none.
_INSERT = (
    f"INSERT INTO {TABLE} (time, period, request_id, tenant, model, input_tokens,"
    " output_tokens, estimated, status, latency_ms, cost_usd)"
    " SELECT * FROM unnest(%s::float8[], %s::text[], %s::text[], %s::text[], %s::text[],"
    " %s::int8[], %s::int8[], %s::bool[], %s::int4[], %s::float8[], %s::float8[])"
    " ON CONFLICT (tenant, request_id) DO NOTHING"
)


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class LedgerUnavailable(OSError):
    """The PostgreSQL ledger cannot be reached or set up; the message names it (no password)."""


def migrate(url: str) -> int:
    """Create or upgrade the schema; returns the version it is at. Blocking (worker start, CLI)."""
    try:
        with psycopg.connect(url, connect_timeout=_CONNECT_TIMEOUT_S) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS checkstream_schema"
                " (component text PRIMARY KEY, version integer NOT NULL)"
            )
            row = conn.execute(
                "SELECT version FROM checkstream_schema WHERE component = 'usage'"
            ).fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise LedgerUnavailable(
                    f"usage ledger {redacted(url)} has schema version {version}, newer than "
                    f"this CheckStream's {SCHEMA_VERSION}: upgrade CheckStream"
                )
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO checkstream_schema VALUES ('usage', %s)"
                " ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                (SCHEMA_VERSION,),
            )
    except psycopg.Error as exc:
        raise LedgerUnavailable(f"usage ledger {redacted(url)} is unavailable: {exc}") from None
    return SCHEMA_VERSION


@dataclass(frozen=True)
class _Pending:
    record: UsageRecord
    future: asyncio.Future[None]


def _columns(records: Iterable[UsageRecord]) -> list[list[object]]:
    """The batch as one list per column, the parameters of ``_INSERT``."""
    rows = [_row(rec) for rec in records]
    return [list(column) for column in zip(*rows, strict=True)]


def _row(rec: UsageRecord) -> tuple[object, ...]:
    return (
        rec.time,
        period_of(rec.time),
        rec.request_id,
        rec.tenant,
        rec.model,
        rec.input_tokens,
        rec.output_tokens,
        rec.estimated,
        rec.status,
        rec.latency_ms,
        rec.cost_usd,
    )


class PostgresLedger:
    """One process's connection pool to the shared ledger and its batching writer."""

    def __init__(self, url: str) -> None:
        self.url = redacted(url)
        self.commits = 0  # committed batches, for tests and the bench
        #: The last batch failed (audit.on_store_failure: refuse reads it).
        self.failing = False
        self._dsn = url
        # Opened on first use, inside the event loop that uses it.
        self._pool: AsyncConnectionPool | None = None
        self._pending: list[_Pending] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._start_scheduled = False
        self._closed = False

    @classmethod
    def open(cls, url: str) -> PostgresLedger:
        """Check the server and bring the schema up to date (blocking), then build the ledger."""
        migrate(url)
        return cls(url)

    async def _connections(self) -> AsyncConnectionPool:
        if self._pool is None:
            pool = AsyncConnectionPool(
                self._dsn,
                min_size=1,
                max_size=4,
                open=False,
                timeout=_CONNECT_TIMEOUT_S,
                kwargs={"autocommit": True, "connect_timeout": _CONNECT_TIMEOUT_S},
                name="checkstream-usage",
            )
            self._pool = pool
            await pool.open(wait=False)
        return self._pool

    async def record(self, rec: UsageRecord) -> None:
        """Return once ``rec`` is committed; raise LedgerWriteError if its batch failed. A
        cancelled caller's row is still written."""
        if self._closed:
            raise RuntimeError("usage ledger is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(rec, future))
        if not self._start_scheduled and len(self._writers) < _WRITERS:
            # Next loop turn: records of requests ending in this turn join the same batch.
            self._start_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_writer)
        await asyncio.shield(future)

    def _start_writer(self) -> None:
        self._start_scheduled = False
        if self._pending and len(self._writers) < _WRITERS:
            task = asyncio.get_running_loop().create_task(self._write())
            self._writers.add(task)
            task.add_done_callback(self._writers.discard)

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
            error: Exception | None = None
            try:
                async with asyncio.timeout(_COMMIT_TIMEOUT_S):
                    pool = await self._connections()
                    async with pool.connection() as conn:
                        await conn.execute(_INSERT, _columns(p.record for p in batch))
                self.commits += 1
                self.failing = False
            except Exception as exc:
                error = exc
                self.failing = True
            for pending in batch:
                _settle(pending.future, error, self.url)

    async def month_spend(self, tenant: str, period: str) -> float:
        """``tenant``'s committed cost in ``period`` ("YYYY-MM", UTC), by every replica."""
        check_period(period)
        rows = await self._query(
            f"SELECT COALESCE(SUM(cost_usd), 0) FROM {TABLE} WHERE tenant = %s AND period = %s",
            (tenant, period),
        )
        return float(rows[0][0])

    async def day_spend(self, tenant: str, start: float) -> float:
        """``tenant``'s committed cost in the UTC day starting at epoch ``start``, by every
        replica."""
        rows = await self._query(
            f"SELECT COALESCE(SUM(cost_usd), 0) FROM {TABLE}"
            " WHERE tenant = %s AND time >= %s AND time < %s",
            (tenant, start, start + 86400),
        )
        return float(rows[0][0])

    async def report(self, *, tenant: str | None, period: str, by_model: bool) -> list[UsageRow]:
        query, params = report_query(tenant=tenant, period=period, by_model=by_model)
        return [_usage_row(row) for row in await self._query(query, params)]

    async def request_times(self, tenant: str, since: float) -> dict[str, float]:
        rows = await self._query(
            f"SELECT request_id, time FROM {TABLE} WHERE tenant = %s AND time >= %s",
            (tenant, since),
        )
        return {str(rid): float(moment) for rid, moment in rows}

    async def _query(self, query: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                pool = await self._connections()
                async with pool.connection() as conn, conn.cursor() as cur:
                    await cur.execute(query, params)
                    return await cur.fetchall()
        except (psycopg.Error, OSError) as exc:  # TimeoutError is an OSError
            raise LedgerUnavailable(f"usage ledger {self.url} is unavailable: {exc}") from None

    async def aclose(self) -> None:
        """Commit what is queued, then close the pool."""
        self._closed = True
        while self._writers or self._start_scheduled:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._writers)
            await asyncio.sleep(0)
        if self._pool is not None:
            await self._pool.close()


def _settle(future: asyncio.Future[None], error: Exception | None, url: str) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        failure = LedgerWriteError(f"usage ledger {url} write failed: {error!r}")
        failure.__cause__ = error
        future.set_exception(failure)


def report_query(*, tenant: str | None, period: str, by_model: bool) -> tuple[str, list[object]]:
    check_period(period)
    # Only these fixed fragments are spliced into the SQL; values are bound.
    model = "model" if by_model else "'*'"
    where = f"period = %s AND {BILLABLE}" + (" AND tenant = %s" if tenant is not None else "")
    groups = "tenant, model" if by_model else "tenant"
    query = (
        f"SELECT tenant, {model}, COUNT(*), SUM(input_tokens), SUM(output_tokens),"
        f" SUM(estimated::int), SUM((status >= 400)::int),"
        # Each row's cost in whole nano-dollars before summing, as the SQLite ledger does.
        f" COALESCE(SUM(ROUND(cost_usd * 1000000000)::bigint), 0)"
        f" FROM {TABLE} WHERE {where} GROUP BY {groups} ORDER BY {groups}"
    )
    return query, [period] if tenant is None else [period, tenant]


def _usage_row(row: tuple[Any, ...]) -> UsageRow:
    tenant, model, requests, tokens_in, tokens_out, estimated, errors, cost_nano = row
    return report_row(
        str(tenant),
        str(model),
        int(requests),
        int(tokens_in),
        int(tokens_out),
        int(estimated),
        int(errors),
        int(cost_nano),
    )


def report(url: str, *, tenant: str | None, period: str, by_model: bool) -> list[UsageRow]:
    """``checkstream usage`` from the shared ledger (blocking, for the CLI)."""
    query, params = report_query(tenant=tenant, period=period, by_model=by_model)
    return [_usage_row(row) for row in _read(url, query, params)]


def daily_report(url: str, *, tenant: str | None, since: date) -> list[DailyRow]:
    """Per tenant, UTC day and model from ``since`` on, from every replica (the console)."""
    start = datetime(since.year, since.month, since.day, tzinfo=UTC).timestamp()
    query = (
        "SELECT tenant, to_char(to_timestamp(time) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day,"
        " model, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM((status >= 400)::int),"
        f" COALESCE(SUM(cost_usd), 0) FROM {TABLE} WHERE time >= %s"
        + (" AND tenant = %s" if tenant is not None else "")
        + " GROUP BY tenant, day, model ORDER BY tenant, day, model"
    )
    params: list[object] = [start] if tenant is None else [start, tenant]
    return [_daily_row(row) for row in _read(url, query, params)]


def _daily_row(row: tuple[Any, ...]) -> DailyRow:
    tenant, day, model, requests, tokens_in, tokens_out, errors, cost = row
    return DailyRow(
        str(tenant),
        date.fromisoformat(day),
        str(model),
        int(requests),
        int(tokens_in),
        int(tokens_out),
        int(errors),
        float(cost),
    )


def request_times(url: str, tenant: str, since: float) -> dict[str, float]:
    """A tenant's request ids recorded at or after ``since`` (epoch seconds), with their time."""
    rows = _read(
        url, f"SELECT request_id, time FROM {TABLE} WHERE tenant = %s AND time >= %s",
        [tenant, since],
    )  # fmt: skip
    return {str(rid): float(moment) for rid, moment in rows}


def _read(url: str, query: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
    try:
        with psycopg.connect(url, connect_timeout=_CONNECT_TIMEOUT_S) as conn:
            exists = conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone()
            if exists is None or exists[0] is None:
                raise UsageError(
                    f"usage ledger {redacted(url)} has no {TABLE} table yet (it is created "
                    "when a gateway starts with this ledger)"
                )
            return conn.execute(query, params).fetchall()
    except psycopg.Error as exc:
        raise UsageError(f"usage ledger {redacted(url)} is unavailable: {exc}") from None
