"""One tenant's hostile strings never cost another tenant its usage rows or audit records.

Real SQLite ledger and real audit trails on disk; no mocks.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from checkstream.accounting.accounts import Accounts, Tally
from checkstream.accounting.client_text import (
    REPLACEMENT,
    is_store_safe,
    store_safe,
    without_surrogates,
)
from checkstream.audit.trail import AuditLog
from checkstream.audit.verify import verify
from checkstream.config.model import Price, TenantConfig
from checkstream.formats.texts import Usage
from checkstream.ledger.usage import LedgerWriteError, Pricing, UsageLedger, UsageRecord
from checkstream.limits.memory import MemoryLimiter

LONE = "m\ud800"  # what json.loads('"m\\ud800"') gives: valid JSON, not encodable as UTF-8


def test_store_safe_replaces_what_no_store_can_hold() -> None:
    assert json.loads('"m\\ud800"') == LONE
    assert store_safe(LONE) == "m" + REPLACEMENT
    r = REPLACEMENT
    assert store_safe("a\udc80b\x00c\x1bd\x7f") == f"a{r}b{r}c{r}d{r}"
    store_safe(LONE).encode("utf-8")  # now it can be stored
    assert store_safe("gpt-4o-mini") == "gpt-4o-mini"
    assert store_safe("caf\u00e9 \U0001f600") == "caf\u00e9 \U0001f600"  # real characters stay
    assert store_safe("x" * 1000) == "x" * 256
    assert store_safe("x" * 1000, 10) == "x" * 10


def test_is_store_safe_says_whether_anything_would_change() -> None:
    assert is_store_safe("gpt-4o")
    assert is_store_safe("caf\u00e9")
    assert not is_store_safe(LONE)
    assert not is_store_safe("a\nb")
    assert not is_store_safe("x" * 257)
    assert is_store_safe("x" * 20, limit=20)


# --- the usage ledger ------------------------------------------------------------------


def _rec(tenant: str, n: int, **changes: object) -> UsageRecord:
    fields: dict[str, object] = {
        "time": 1_795_000_000.0,
        "request_id": f"{tenant}-{n}",
        "tenant": tenant,
        "model": "gpt-4o",
        "input_tokens": n,
        "output_tokens": 2 * n,
        "estimated": False,
        "status": 200,
        "latency_ms": 1.0,
        "cost_usd": 0.001,
    }
    fields.update(changes)
    return UsageRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[UsageLedger]:
    opened = UsageLedger.open(tmp_path / "usage.db")
    yield opened
    await opened.aclose()


def _stored(ledger: UsageLedger) -> list[tuple[str, str]]:
    conn = sqlite3.connect(ledger.path)
    try:
        return sorted(conn.execute("SELECT tenant, request_id FROM usage").fetchall())
    finally:
        conn.close()


async def test_bad_rows_of_one_tenant_never_cost_another_its_rows(ledger: UsageLedger) -> None:
    admin = sqlite3.connect(ledger.path, isolation_level=None)
    admin.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON usage WHEN NEW.request_id LIKE 'a-refused-%'"
        " BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
    )
    # Hold the write lock so every record below queues up and goes out in the same batches.
    admin.execute("BEGIN IMMEDIATE")
    records: list[UsageRecord] = []
    bad: set[str] = set()
    for n in range(100):
        records.append(_rec("b", n))
        if n % 3 == 0:
            # Tenant a's rows the database cannot hold: a lone surrogate (not UTF-8), an
            # integer past 64 bits, a row a constraint refuses.
            kind = ("lone", "huge", "refused")[n // 3 % 3]
            changes: dict[str, object] = {
                "lone": {"model": LONE},
                "huge": {"input_tokens": 2**70},
                "refused": {"request_id": f"a-refused-{n}"},
            }[kind]
            record = _rec("a", n, **changes)
            bad.add(record.request_id)
            records.append(record)
        elif n % 3 == 1:
            records.append(_rec("a", n))
    waiting = [asyncio.ensure_future(ledger.record(r)) for r in records]
    await asyncio.sleep(0.2)
    admin.execute("COMMIT")
    admin.close()
    outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 30)

    for record, outcome in zip(records, outcomes, strict=True):
        if record.request_id in bad:
            assert isinstance(outcome, LedgerWriteError), (record.request_id, outcome)
        else:
            assert outcome is None, (record.request_id, outcome)
    stored = _stored(ledger)
    assert [r for t, r in stored if t == "b"] == sorted(f"b-{n}" for n in range(100))
    good_a = sorted(r.request_id for r in records if r.tenant == "a" and r.request_id not in bad)
    assert [r for t, r in stored if t == "a"] == good_a
    assert len(bad) == 34
    # The rows went in a few batches, not one transaction each.
    assert ledger.commits < len(records) // 4
    assert not ledger.failing  # a row's values are not the database failing


async def test_a_lone_bad_row_fails_alone_and_the_next_batch_is_whole(
    ledger: UsageLedger,
) -> None:
    with pytest.raises(LedgerWriteError):
        await ledger.record(_rec("a", 1, model=LONE))
    await asyncio.gather(*(ledger.record(_rec("b", n)) for n in range(5)))
    assert [r for _, r in _stored(ledger)] == [f"b-{n}" for n in range(5)]


# --- the audit trail -------------------------------------------------------------------


async def test_unstorable_values_are_written_not_dropped(tmp_path: Path) -> None:
    audit = AuditLog({"a": tmp_path / "a"})
    try:
        base = {"time": "2026-12-07T12:00:00Z", "type": "trigger", "request_id": "r1"}
        await audit.append(
            "a",
            [
                {**base, "model": LONE, "labels": ["x\udc80", 1.5]},
                {**base, "score": float("nan"), "weird": object(), 7: "int key"},
                {**base, "fine": "caf\u00e9"},
            ],
        )
    finally:
        await audit.aclose()
    lines = (tmp_path / "a" / "2026-12-07.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r.get("model") for r in records] == [
        "m" + REPLACEMENT,
        None,
        None,
    ]
    assert records[0]["labels"] == ["x" + REPLACEMENT, 1.5]
    assert records[1]["score"] == "NaN"
    assert records[1]["weird"] == "<object>"
    assert records[1]["7"] == "int key"
    assert records[2]["fine"] == "caf\u00e9"
    assert verify(tmp_path / "a").ok


# --- accounting: the tally's model on its way to every store ---------------------------


async def test_a_lone_surrogate_model_reaches_every_store_replaced(tmp_path: Path) -> None:
    ledger = UsageLedger.open(tmp_path / "usage.db")
    accounts = Accounts(
        limiter=MemoryLimiter(), ledger=ledger, audit=AuditLog({"a": tmp_path / "audit-a"})
    )
    config = TenantConfig(backend_url="http://127.0.0.1:1")
    try:
        tallies = []
        for n in range(20):
            tally = Tally.start("a" if n % 2 else "b", f"req-{n}\ud800" if n == 1 else None)
            tally.model = LONE if tally.tenant == "a" else "gpt-4o"
            tally.status = 200
            tally.triggers.append(
                {"time": "2026-12-07T12:00:00Z", "type": "trigger", "model": tally.model}
            )
            tallies.append(tally)
        await asyncio.gather(
            *(accounts.finish(t, config, Pricing({}), frozenset()) for t in tallies)
        )
    finally:
        await accounts.aclose()
    conn = sqlite3.connect(tmp_path / "usage.db")
    rows = conn.execute("SELECT tenant, model, request_id FROM usage").fetchall()
    conn.close()
    assert sorted(t for t, _m, _r in rows) == ["a"] * 10 + ["b"] * 10
    assert {m for t, m, _r in rows if t == "a"} == {"m" + REPLACEMENT}
    # An id that is not short and plain is replaced by a generated one before any store.
    ids = {r for _t, _m, r in rows}
    assert len(ids) == 20 and all(r.isascii() and r.isalnum() for r in ids)
    trail = [
        json.loads(line)
        for file in sorted((tmp_path / "audit-a").glob("*.jsonl"))
        for line in file.read_text(encoding="utf-8").splitlines()
    ]
    assert len(trail) == 20  # 10 requests: a trigger and a summary each
    assert {r["model"] for r in trail} == {"m" + REPLACEMENT}
    assert verify(tmp_path / "audit-a").ok


def test_without_surrogates_keeps_line_breaks() -> None:
    assert without_surrogates("a\nb\ud800\tc") == f"a\nb{REPLACEMENT}\tc"


# --- store failure: which trail failed --------------------------------------------------


async def test_a_trail_that_cannot_be_written_is_failing_until_a_write_lands(
    tmp_path: Path,
) -> None:
    audit = AuditLog({"a": tmp_path / "a", "b": tmp_path / "b"})
    record = {"time": "2026-12-07T12:00:00Z", "type": "request"}
    try:
        await audit.append("a", [record])
        assert not audit.failing("a")
        (tmp_path / "a").rename(tmp_path / "a.aside")
        (tmp_path / "a").write_text("not a directory")
        with pytest.raises(OSError):
            await audit.append("a", [record])
        await audit.append("b", [record])
        assert (audit.failing("a"), audit.failing("b"), audit.failing("nobody")) == (
            True,
            False,
            False,
        )
        (tmp_path / "a").unlink()
        (tmp_path / "a.aside").rename(tmp_path / "a")
        await audit.append("a", [record])
        assert not audit.failing("a")
    finally:
        await audit.aclose()


async def test_absurd_token_counts_from_a_backend_cost_no_records(tmp_path: Path) -> None:
    ledger = UsageLedger.open(tmp_path / "usage.db")
    accounts = Accounts(
        limiter=MemoryLimiter(), ledger=ledger, audit=AuditLog({"a": tmp_path / "audit-a"})
    )
    config = TenantConfig.model_validate(
        {"backend_url": "http://127.0.0.1:1", "budget": {"monthly_usd": 10}}
    )
    pricing = Pricing({"gpt-4o": Price(input=2.5, output=10.0)})
    try:
        tally = Tally.start("a", "absurd")
        tally.model, tally.status, tally.billable, tally.admitted = "gpt-4o", 200, True, True
        tally.prompt_chars, tally.answer_chars = 400, 40
        # 300 digits: int * float overflows, and SQLite integers stop at 2**63.
        tally.usage = Usage(input_tokens=10**300, output_tokens=5)
        await accounts.finish(tally, config, pricing, frozenset())
    finally:
        await accounts.aclose()
    conn = sqlite3.connect(tmp_path / "usage.db")
    rows = conn.execute("SELECT input_tokens, output_tokens, estimated FROM usage").fetchall()
    conn.close()
    assert rows == [(100, 5, 1)]  # estimated from the prompt's 400 characters
    trail = [
        json.loads(line)
        for file in (tmp_path / "audit-a").glob("*.jsonl")
        for line in file.read_text().splitlines()
    ]
    assert [(r["request_id"], r["input_tokens"]) for r in trail] == [("absurd", 100)]
