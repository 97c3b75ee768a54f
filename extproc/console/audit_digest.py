"""Recent policy triggers per tenant, read from the audit trails (``audit.py`` writes them).

Run by the admin server, in a thread (file reads). Each refresh reads only what was appended
to each day file since the last one (trails are append-only), and keeps per tenant a count of
triggers per minute for the last 24 hours and the newest ``KEPT`` trigger records. Files of
every replica are read (``<day>.jsonl`` and per-replica ``<day>.<replica>.jsonl``), so with a
shared audit volume the numbers are the fleet's.

Trigger records carry no prompt text; an ``excerpt`` (PII redacted) exists only when the
tenant's ``audit.include_content`` is on, and is shown only then.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

from checkstream.config.model import AuditConfig

KEPT: Final = 50
DAY_S: Final = 86_400
_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:\.[A-Za-z0-9_.-]+)?\.jsonl$")
# Records are written compactly (audit.py), so this finds trigger lines without parsing all.
_TRIGGER_MARK = b'"type":"trigger"'


@dataclass(frozen=True)
class TriggerRecord:
    time: str
    phase: str
    rule: str
    action: str
    classifier: str
    score: float | None
    regulation: str | None
    request_id: str | None
    excerpt: str | None  # only for tenants whose audit includes redacted excerpts


@dataclass
class _Trail:
    per_minute: Counter[int]
    recent: deque[TriggerRecord]
    include_content: bool


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _trigger(record: Mapping[str, Any], include_content: bool) -> TriggerRecord:
    score = record.get("score")
    regulation = record.get("regulation")
    request_id = record.get("request_id")
    excerpt = record.get("excerpt") if include_content else None
    return TriggerRecord(
        time=_text(record.get("time")),
        phase=_text(record.get("phase")),
        rule=_text(record.get("rule")),
        action=_text(record.get("action")),
        classifier=_text(record.get("classifier")),
        score=float(score) if isinstance(score, int | float) else None,
        regulation=regulation if isinstance(regulation, str) else None,
        request_id=request_id if isinstance(request_id, str) else None,
        excerpt=excerpt if isinstance(excerpt, str) else None,
    )


def _epoch(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    return None


class AuditDigest:
    def __init__(self) -> None:
        self._offsets: dict[Path, int] = {}
        self._trails: dict[str, _Trail] = {}

    def refresh(self, dirs: Mapping[str, tuple[Path, AuditConfig]], now: float) -> None:
        """Read what the trails of ``dirs`` (``resolve_audit_dirs``) gained since last time."""
        oldest_day = datetime.fromtimestamp(now - DAY_S, UTC).date()
        first_minute = int((now - DAY_S) // 60)
        for tenant in list(self._trails):
            if tenant not in dirs:
                del self._trails[tenant]
        for tenant, (directory, config) in dirs.items():
            trail = self._trails.get(tenant)
            if trail is None or trail.include_content != config.include_content:
                trail = _Trail(Counter(), deque(maxlen=KEPT), config.include_content)
                self._trails[tenant] = trail
                self._forget(directory)
            for path in self._day_files(directory, oldest_day):
                self._read_new(path, trail, first_minute)
            for minute in [m for m in trail.per_minute if m < first_minute]:
                del trail.per_minute[minute]
        # Offsets of files past the window are no longer needed.
        for path in [p for p in self._offsets if not _recent_file(p, oldest_day)]:
            del self._offsets[path]

    def count_24h(self, tenant: str, now: float) -> int | None:
        """Triggers in the last 24 hours, or None for a tenant without an audit trail."""
        trail = self._trails.get(tenant)
        if trail is None:
            return None
        first = int((now - DAY_S) // 60)
        return sum(n for minute, n in trail.per_minute.items() if minute >= first)

    def recent(self, tenant: str) -> list[TriggerRecord]:
        """The newest trigger records first (at most ``KEPT``)."""
        trail = self._trails.get(tenant)
        return list(reversed(trail.recent)) if trail is not None else []

    def _forget(self, directory: Path) -> None:
        for path in [p for p in self._offsets if p.parent == directory]:
            del self._offsets[path]

    @staticmethod
    def _day_files(directory: Path, oldest: date) -> list[Path]:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return []
        found = []
        for entry in entries:
            match = _DAY_FILE.match(entry.name)
            if match and match.group(1) >= oldest.isoformat():
                found.append(Path(entry.path))
        return sorted(found)

    def _read_new(self, path: Path, trail: _Trail, first_minute: int) -> None:
        start = self._offsets.get(path, 0)
        try:
            with path.open("rb") as file:
                size = file.seek(0, os.SEEK_END)
                if size < start:  # replaced (restored from a copy): read it again
                    start = 0
                file.seek(start)
                data = file.read(size - start)
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next refresh
        self._offsets[path] = start + end
        for line in data[:end].splitlines():
            if _TRIGGER_MARK not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("type") != "trigger":
                continue
            moment = _epoch(record.get("time"))
            if moment is None:
                continue
            minute = int(moment // 60)
            if minute >= first_minute:
                trail.per_minute[minute] += 1
            trail.recent.append(_trigger(record, trail.include_content))


def _recent_file(path: Path, oldest: date) -> bool:
    match = _DAY_FILE.match(path.name)
    return match is not None and match.group(1) >= oldest.isoformat()
