"""The worker's journal of open requests (accounting/journal.py) and the billing of what a
killed worker left open (accounting/killed_requests.py), with a real SQLite ledger."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from checkstream.accounting import journal as journal_module
from checkstream.accounting.accounts import Accounts, Tally
from checkstream.accounting.journal import Journal, OpenRequest, journal_path, read_open
from checkstream.accounting.killed_requests import bill_killed_requests
from checkstream.audit.trail import AuditLog
from checkstream.ledger.usage import Pricing, UsageLedger
from checkstream.limits.memory import MemoryLimiter


def _request(n: int, tenant: str = "acme") -> OpenRequest:
    return OpenRequest(tenant, f"req-{n}", "gpt-4o", 1_700_000_000.0 + n, 400 * n, 50, None)


def test_open_and_closed_requests_are_read_back(tmp_path: Path) -> None:
    path = journal_path(tmp_path, 9001)
    journal = Journal(path)
    keys = [journal.opened(_request(n)) for n in range(1, 4)]
    journal.closed(keys[1])
    journal.closed(keys[1])  # a second close is a no-op, not a second line
    # Not closed, not flushed by close(): a SIGKILL leaves exactly what was written.
    assert read_open(path) == [_request(1), _request(3)]
    assert len(path.read_text().splitlines()) == 4
    journal.closed(keys[0])
    journal.closed(keys[2])
    assert read_open(path) == []
    journal.close()


def test_a_torn_last_line_and_garbage_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    journal.opened(_request(1))
    journal.close()
    with path.open("a") as f:
        f.write("x nonsense\no {not json\nc abc\n" + _request(2).line(7)[:30])
    assert read_open(path) == [_request(1)]
    assert read_open(tmp_path / "missing.jsonl") == []


def test_compaction_keeps_only_open_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_AFTER_LINES", 10)
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    kept = journal.opened(_request(0))
    for n in range(1, 50):
        journal.closed(journal.opened(_request(n)))
    lines = path.read_text().splitlines()
    assert len(lines) <= 10 + 2 + 1  # compacted, not 99 lines
    assert read_open(path) == [_request(0)]
    # Still appending to the compacted file, and keys stay unique across compactions.
    journal.opened(_request(99))
    journal.closed(kept)
    assert read_open(path) == [_request(99)]
    journal.close()


def _accounts(tmp_path: Path, audited: bool) -> Accounts:
    ledger = UsageLedger.open(tmp_path / "usage.db")
    audit = AuditLog({"acme": tmp_path / "audit"} if audited else {}, "test")
    return Accounts(limiter=MemoryLimiter(), ledger=ledger, audit=audit)


def _rows(db: Path) -> list[tuple[str, str, int, int, int, int]]:
    with sqlite3.connect(db) as conn:
        return list(
            conn.execute(
                "SELECT request_id, tenant, status, estimated, input_tokens, output_tokens"
                " FROM usage ORDER BY request_id"
            )
        )


def test_a_restarted_worker_bills_what_its_predecessor_left_open(tmp_path: Path) -> None:
    path = journal_path(tmp_path, 9001)

    async def scenario() -> None:
        # The killed worker: two requests in flight, one finished.
        dead = Journal(path)
        dead.opened(_request(1))
        dead.closed(dead.opened(_request(2)))
        dead.opened(_request(3, tenant="other"))
        # (no close(): the process was killed)
        accounts = _accounts(tmp_path, audited=True)
        assert await bill_killed_requests(accounts, Pricing({}), path) == 2
        assert not path.exists()
        # A second start finds nothing more to bill.
        assert await bill_killed_requests(accounts, Pricing({}), path) == 0
        await accounts.aclose()

    asyncio.run(scenario())
    assert _rows(tmp_path / "usage.db") == [
        ("req-1", "acme", 499, 1, 100, 0),
        ("req-3", "other", 499, 1, 300, 0),
    ]
    trail = (tmp_path / "audit").rglob("*.jsonl")
    text = "".join(p.read_text() for p in trail)
    assert '"request_id":"req-1"' in text.replace(" ", "")
    assert "req-3" not in text  # "other" is not audited


def test_finish_closes_the_journaled_request(tmp_path: Path) -> None:
    from checkstream.config.model import TenantConfig

    path = journal_path(tmp_path, 9002)

    async def scenario() -> None:
        accounts = _accounts(tmp_path, audited=False)
        accounts.journal = Journal(path)
        done, cut = Tally.start("acme", None), Tally.start("acme", None)
        for tally in (done, cut):
            tally.model, tally.prompt_chars = "gpt-4o", 40
            accounts.journaled(tally)
        tally_config = TenantConfig.model_validate({"backend_url": "http://127.0.0.1:1/v1"})
        await accounts.finish(done, tally_config, Pricing({}), frozenset())
        assert [r.request_id for r in read_open(path)] == [cut.request_id]

    asyncio.run(scenario())
