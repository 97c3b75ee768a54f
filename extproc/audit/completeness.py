"""Is the audit trail complete? Every request the usage ledger holds for an audited tenant
must have its audit ``request`` record (``checkstream audit verify --against-usage``).

Run by the CLI. The trail is read across every replica's chain in the tenant's directory, the
ledger is the configured one (with PostgreSQL: every replica's rows), so a request served by
any replica is found wherever its record was written. Ledger rows older than the trail's first
record are not checked: they were pruned past retention, or served before audit was enabled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from checkstream.audit.trail import chains

#: Reads a tenant's ledger request ids recorded at or after an epoch time, with their time.
LedgerTimes = Callable[[float], dict[str, float]]


@dataclass(frozen=True)
class Completeness:
    #: Epoch seconds of the trail's first record: ledger rows from here on are checked
    #: (None: the trail is empty, so every ledger row is).
    since: float | None
    checked: int  # ledger requests in the window
    missing: tuple[tuple[str, float], ...]  # (request id, ledger time), oldest first


def _epoch(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def audited_requests(directory: Path) -> tuple[set[str], float | None]:
    """Request ids with a ``request`` record in any chain, and the earliest record's time.
    Lines that are not records are skipped here: ``verify`` is what reports them."""
    found: set[str] = set()
    first: float | None = None
    for files in chains(directory).values():
        for _day, path in files:
            with path.open("rb") as stream:
                for raw in stream:
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        continue
                    if not isinstance(record, dict):
                        continue
                    moment = _epoch(record.get("time"))
                    if moment is not None and (first is None or moment < first):
                        first = moment
                    rid = record.get("request_id")
                    if record.get("type") == "request" and isinstance(rid, str):
                        found.add(rid)
    return found, first


def check_against_ledger(directory: Path, ledger_times: LedgerTimes) -> Completeness:
    audited, first = audited_requests(directory)
    # A record is written after its ledger row, a few milliseconds later: a second of slack
    # keeps the trail's very first request inside the window.
    since = first - 1.0 if first is not None else None
    recorded = ledger_times(since if since is not None else 0.0)
    missing = sorted(
        ((rid, moment) for rid, moment in recorded.items() if rid not in audited),
        key=lambda item: (item[1], item[0]),
    )
    return Completeness(since, len(recorded), tuple(missing))


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )
