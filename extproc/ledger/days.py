"""Usage per UTC day, from the SQLite usage ledger (``usage.py`` writes it).

Run by the admin server (the operator console's tenant page and its "tokens today"). A
companion to ``usage.report``, which totals whole months: same table, same read-only use,
bound parameters only.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from checkstream.ledger.usage import UsageError

_BUSY_TIMEOUT_MS = 10_000
_QUERY = (
    "SELECT tenant, date(time, 'unixepoch') AS day, model, COUNT(*), SUM(input_tokens),"
    " SUM(output_tokens), SUM(status >= 400), TOTAL(cost_usd)"
    " FROM usage WHERE time >= ?{tenant} GROUP BY tenant, day, model ORDER BY tenant, day, model"
)


@dataclass(frozen=True)
class DailyRow:
    tenant: str
    day: date  # UTC
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    errors: int  # status >= 400
    cost_usd: float


def daily_report(path: Path, *, tenant: str | None, since: date) -> list[DailyRow]:
    """Rows per tenant, day and model from the start of ``since`` (UTC) on."""
    start = datetime(since.year, since.month, since.day, tzinfo=UTC).timestamp()
    query = _QUERY.format(tenant=" AND tenant = ?" if tenant is not None else "")
    params: tuple[object, ...] = (start,) if tenant is None else (start, tenant)
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        return [
            DailyRow(row[0], date.fromisoformat(row[1]), *row[2:])
            for row in conn.execute(query, params)
        ]
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{path}: not a usage ledger ({exc})") from None
    finally:
        conn.close()
