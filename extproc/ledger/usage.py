"""The usage ledger: one SQLite row per finished request, with its tokens and its cost.

Budgets and the ``checkstream usage`` report both read it, so a recorded request must
survive a crash: ``record()`` returns only once the row is committed (WAL with
``synchronous=FULL`` syncs the log at every commit). An fsync per request would cap
throughput, so one writer thread per ledger drains everything queued meanwhile and commits
it as one transaction: 100 concurrent requests cost a handful of fsyncs.

Several extproc worker processes write the same file. That needs no coordination of ours:
SQLite's file locking lets one transaction write at a time, WAL lets readers go on during a
write, and ``busy_timeout`` makes a writer wait its turn instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from decimal import Decimal
from pathlib import Path
from typing import Final, Literal

from checkstream.config.model import LoadedConfig, Price

# Writes take milliseconds; this only has to outlast other workers' batches.
_BUSY_TIMEOUT_MS = 10_000
_PERIOD = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS usage (
        time REAL NOT NULL,
        period TEXT NOT NULL,
        request_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        model TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        estimated INTEGER NOT NULL,
        status INTEGER NOT NULL,
        latency_ms REAL NOT NULL,
        cost_usd REAL NOT NULL
    )""",
    # cost_usd makes it covering for month_spend, which budgets may call per request.
    "CREATE INDEX IF NOT EXISTS usage_tenant_period ON usage (tenant, period, cost_usd)",
)
_INSERT = "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


class UsageError(Exception):
    """A report that cannot be produced, in the user's terms (no ledger file, bad period)."""


class LedgerWriteError(Exception):
    """The batch holding this record failed to commit; the record was not stored."""


@dataclass(frozen=True)
class UsageRecord:
    time: float  # epoch seconds when the request finished
    request_id: str
    tenant: str
    model: str  # the model the client asked for ("" if unknown)
    input_tokens: int
    output_tokens: int
    estimated: bool  # tokens were estimated: the backend reported no usage
    status: int  # HTTP status the client got
    latency_ms: float
    cost_usd: float


#: Reports count money in whole nano-dollars (as budgets do), summed exactly.
COST_QUANTUM: Final = Decimal("0.000000001")
#: A request that succeeded without naming a model or using a token (GET /v1/models) is
#: no model's usage and costs nothing: reports leave it out. Refusals stay (they are errors).
BILLABLE: Final = "NOT (model = '' AND input_tokens = 0 AND output_tokens = 0 AND status < 400)"
#: How a report names the model of a request that stated none (refused before its body).
NO_MODEL: Final = "(no model)"


@dataclass(frozen=True)
class UsageRow:
    """One line of a report: a tenant's month, or one model of it."""

    tenant: str
    model: str  # "*" when the report is not grouped by model
    requests: int
    input_tokens: int
    output_tokens: int
    estimated_requests: int
    errors: int  # status >= 400
    cost_usd: Decimal  # exact, in whole nano-dollars


class Pricing:
    """USD per million tokens, from ``pricing`` in checkstream.yaml."""

    def __init__(self, table: Mapping[str, Price]) -> None:
        self._table = dict(table)
        # Longest first, so "gpt-4o-mini" beats "gpt-4o" for "gpt-4o-mini-2024-07-18".
        self._by_length = sorted(self._table, key=len, reverse=True)

    def _price(self, model: str) -> Price | None:
        exact = self._table.get(model)
        if exact is not None:
            return exact
        # Backends answer with a dated snapshot of the model the client asked for.
        for key in self._by_length:
            if model.startswith(key + "-"):
                return self._table[key]
        return None

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        """0.0 for a model without a price: usage is still counted, it just costs nothing."""
        price = self._price(model)
        if price is None:
            return 0.0
        return (input_tokens * price.input + output_tokens * price.output) / 1_000_000

    def knows(self, model: str) -> bool:
        return self._price(model) is not None


def period_of(epoch: float) -> str:
    """The UTC month ("YYYY-MM") a moment falls in."""
    return time.strftime("%Y-%m", time.gmtime(epoch))


def check_period(period: str) -> str:
    if not _PERIOD.match(period):
        raise UsageError(f"period {period!r}: expected YYYY-MM, e.g. 2026-03")
    return period


def resolve_usage_path(loaded: LoadedConfig) -> Path:
    """``usage.path``, relative to the config file's directory (``~`` is the user's home)."""
    return loaded.path.parent / Path(loaded.model.usage.path).expanduser()


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit: transactions are opened explicitly, and a reader's SELECT never holds
    # a snapshot open between calls.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


@dataclass(frozen=True)
class _Pending:
    record: UsageRecord
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]

    def settle(self, error: Exception | None) -> None:
        # The caller's loop may have closed (its task gone): nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, self.future, error)


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    if future.done():  # the caller was cancelled; the record was still written
        return
    if error is None:
        future.set_result(None)
    else:
        # A fresh exception per waiter: one shared instance would collect every task's
        # traceback.
        failure = LedgerWriteError(f"usage ledger write failed: {error}")
        failure.__cause__ = error
        future.set_exception(failure)


class UsageLedger:
    def __init__(self, path: Path, writer: sqlite3.Connection, reader: sqlite3.Connection) -> None:
        self.path = path
        self.commits = 0  # committed batches, for tests and metrics
        #: The last write failed for the database's sake, not a row's: until one succeeds,
        #: tenants with ``audit.on_store_failure: refuse`` are refused.
        self.failing = False
        self._writer_conn = writer
        self._reader = reader
        self._read_lock = threading.Lock()
        # Guards closing against a late record(): nothing may be queued behind the stop mark.
        self._lock = threading.Lock()
        self._closed = False
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        # Daemon: a ledger nobody closed must not keep the process alive; aclose() flushes.
        self._writer = threading.Thread(target=self._write, name="usage-ledger", daemon=True)
        self._writer.start()

    @classmethod
    def open(cls, path: str | Path) -> UsageLedger:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = _connect(path)
        try:
            for statement in _SCHEMA:
                writer.execute(statement)
            reader = _connect(path)
        except BaseException:
            writer.close()
            raise
        return cls(path, writer, reader)

    async def record(self, rec: UsageRecord) -> None:
        """Return once ``rec`` is committed; raise LedgerWriteError if its batch failed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("usage ledger is closed")
            self._queue.put(_Pending(rec, loop, future))
        await future

    async def month_spend(self, tenant: str, period: str) -> float:
        """``tenant``'s committed cost in ``period`` ("YYYY-MM", UTC), across all workers."""
        check_period(period)
        # On the loop: one covering-index lookup, read once per tenant and month.
        with self._read_lock:
            (total,) = self._reader.execute(
                "SELECT TOTAL(cost_usd) FROM usage WHERE tenant = ? AND period = ?",
                (tenant, period),
            ).fetchone()
        return float(total)

    async def day_spend(self, tenant: str, start: float) -> float:
        """``tenant``'s committed cost in the UTC day starting at epoch ``start``."""
        with self._read_lock:
            (total,) = self._reader.execute(
                "SELECT TOTAL(cost_usd) FROM usage"
                " WHERE tenant = ? AND period = ? AND time >= ? AND time < ?",
                (tenant, period_of(start), start, start + 86400),
            ).fetchone()
        return float(total)
    async def report(self, *, tenant: str | None, period: str, by_model: bool) -> list[UsageRow]:
        return await asyncio.to_thread(
            report, self.path, tenant=tenant, period=period, by_model=by_model
        )

    async def request_times(self, tenant: str, since: float) -> dict[str, float]:
        return await asyncio.to_thread(request_times, self.path, tenant, since)

    async def aclose(self) -> None:
        """Commit what is queued, stop the writer, close the connections."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        await asyncio.to_thread(self._writer.join)
        with self._read_lock:
            self._reader.close()

    def _write(self) -> None:
        try:
            while True:
                batch = [self._queue.get()]
                with contextlib.suppress(queue.Empty):
                    while True:
                        batch.append(self._queue.get_nowait())
                pending = [item for item in batch if item is not None]
                if pending:
                    self._commit(pending)
                if len(pending) < len(batch):
                    return
        finally:
            self._writer_conn.close()

    def _commit(self, batch: list[_Pending]) -> None:
        conn = self._writer_conn
        try:
            # IMMEDIATE takes the write lock up front, where busy_timeout applies.
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, [_row(p.record) for p in batch])
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback()
            if len(batch) == 1:
                self._settled(batch, exc)
            else:
                # One row the database refuses (a value it cannot hold) must not cost the
                # other requests of the batch, often other tenants', their rows.
                self._commit_each(batch)
            return
        self._settled(batch, None)

    def _commit_each(self, batch: list[_Pending]) -> None:
        """Insert row by row in one transaction: only the rows that fail are refused."""
        conn = self._writer_conn
        errors: list[Exception | None] = [None] * len(batch)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for index, pending in enumerate(batch):
                if not conn.in_transaction:
                    # SQLite ended it (disk full, I/O error): nothing more can go in.
                    raise sqlite3.OperationalError("the transaction was rolled back")
                try:
                    # A failing INSERT is undone alone (statement journal); the others stay.
                    conn.execute(_INSERT, _row(pending.record))
                except Exception as exc:
                    errors[index] = exc
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback()
            errors = [error or exc for error in errors]
        stored = [p for p, error in zip(batch, errors, strict=True) if error is None]
        if stored:
            self._settled(stored, None)
        for pending, error in zip(batch, errors, strict=True):
            if error is not None:
                self._settled([pending], error)

    def _rollback(self) -> None:
        conn = self._writer_conn
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _settled(self, batch: list[_Pending], error: Exception | None) -> None:
        if error is None:
            self.commits += 1
            self.failing = False
        elif _is_store_failure(error):
            self.failing = True
        for pending in batch:
            pending.settle(error)


def _is_store_failure(error: Exception) -> bool:
    """The database or its disk failed (full, read-only, I/O, locked), not one row's values."""
    return isinstance(error, sqlite3.OperationalError | OSError)


def _row(rec: UsageRecord) -> tuple[object, ...]:
    return (
        rec.time,
        period_of(rec.time),
        rec.request_id,
        rec.tenant,
        rec.model,
        rec.input_tokens,
        rec.output_tokens,
        int(rec.estimated),
        rec.status,
        rec.latency_ms,
        rec.cost_usd,
    )


def report(path: str | Path, *, tenant: str | None, period: str, by_model: bool) -> list[UsageRow]:
    """Totals for ``period``: per tenant (all of them when ``tenant`` is None), per model."""
    check_period(period)
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"{path}: no usage ledger (it appears with the first recorded request;"
            " check usage.path)"
        )
    # Only these fixed fragments are spliced into the SQL; values are bound.
    model = "model" if by_model else "'*'"
    where = f"period = ? AND {BILLABLE}" + (" AND tenant = ?" if tenant is not None else "")
    groups = "tenant, model" if by_model else "tenant"
    # Each row's cost rounded to whole nano-dollars before summing: the total is an exact
    # integer, with none of the float noise a sum of REALs carries.
    query = (
        f"SELECT tenant, {model}, COUNT(*), SUM(input_tokens), SUM(output_tokens),"
        f" SUM(estimated), SUM(status >= 400),"
        f" SUM(CAST(ROUND(cost_usd * 1000000000) AS INTEGER))"
        f" FROM usage WHERE {where} GROUP BY {groups} ORDER BY {groups}"
    )
    params = (period,) if tenant is None else (period, tenant)
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        return [report_row(*row) for row in conn.execute(query, params)]
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{path}: not a usage ledger ({exc})") from None
    finally:
        conn.close()


def request_times(path: str | Path, tenant: str, since: float) -> dict[str, float]:
    """A tenant's request ids recorded at or after ``since`` (epoch seconds), with their time."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no usage ledger (check usage.path)")
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        query = "SELECT request_id, time FROM usage WHERE tenant = ? AND time >= ?"
        return {str(rid): float(moment) for rid, moment in conn.execute(query, (tenant, since))}
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{path}: not a usage ledger ({exc})") from None
    finally:
        conn.close()
def report_row(
    tenant: str,
    model: str,
    requests: int,
    input_tokens: int,
    output_tokens: int,
    estimated: int,
    errors: int,
    cost_nano: int,
) -> UsageRow:
    return UsageRow(
        tenant,
        model or NO_MODEL,
        requests,
        input_tokens,
        output_tokens,
        estimated,
        errors,
        (Decimal(cost_nano) * COST_QUANTUM).quantize(COST_QUANTUM),
    )


def cost_text(cost: Decimal) -> str:
    """A cost as every report format prints it: plain decimal, nine places."""
    return format(cost.quantize(COST_QUANTUM), "f")


def _json_row(row: UsageRow) -> str:
    # Written by hand so the cost is the exact decimal text (a JSON number), not a float.
    members = (
        f"    {json.dumps(name)}: "
        + (cost_text(value) if isinstance(value, Decimal) else json.dumps(value))
        for name, value in zip((f.name for f in fields(UsageRow)), astuple(row), strict=True)
    )
    return "  {\n" + ",\n".join(members) + "\n  }"


def render(rows: Sequence[UsageRow], fmt: Literal["table", "json", "csv"]) -> str:
    """The report as text; costs read the same in all three formats."""
    names = [f.name for f in fields(UsageRow)]
    texts = [
        [cost_text(v) if isinstance(v, Decimal) else str(v) for v in astuple(row)] for row in rows
    ]
    if fmt == "json":
        return ("[\n" + ",\n".join(map(_json_row, rows)) + "\n]\n") if rows else "[]\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(texts)
        return out.getvalue()
    cells = [names, *texts]
    widths = [max(len(line[i]) for line in cells) for i in range(len(names))]
    # Text columns (tenant, model) to the left, numbers to the right.
    return "".join(
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        + "\n"
        for line in cells
    )
