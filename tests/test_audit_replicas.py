"""Audit trails written by several replicas into one shared directory: one chain per replica,
each verified on its own, old single-replica trails still verified, and the trail checked
against the usage ledger (``audit verify --against-usage``)."""

from __future__ import annotations

import asyncio
import json
from datetime import date
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from checkstream.audit.completeness import check_against_ledger
from checkstream.audit.trail import GENESIS, AuditLog, chains, prune_trail
from checkstream.audit.verify import verify, verify_chains
from checkstream.cli.main import main
from checkstream.ledger.usage import UsageLedger, UsageRecord

DAY = "2026-03-01"


def summary(rid: str, at: str = f"{DAY}T12:00:00Z") -> dict[str, Any]:
    return {"time": at, "type": "request", "request_id": rid, "tenant": "acme", "status": 200}


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _write(directory: Path, replica: str, rids: list[str]) -> None:
    log = AuditLog({"acme": directory}, replica)
    # Concurrent appends, as a busy worker makes them.
    await asyncio.gather(*(log.append("acme", [summary(rid)]) for rid in rids))
    await log.aclose()


async def test_each_replica_writes_its_own_chain_into_the_shared_directory(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "acme"
    await asyncio.gather(
        _write(shared, "pod-a", [f"a{i}" for i in range(20)]),
        _write(shared, "pod-b", [f"b{i}" for i in range(30)]),
    )
    assert sorted(p.name for p in shared.iterdir()) == [
        ".pod-a.lock", ".pod-b.lock", f"{DAY}.pod-a.jsonl", f"{DAY}.pod-b.jsonl"
    ]  # fmt: skip
    for replica, count in (("pod-a", 20), ("pod-b", 30)):
        records = read(shared / f"{DAY}.{replica}.jsonl")
        assert len(records) == count
        assert {r["replica"] for r in records} == {replica}
        assert records[0]["prev"] == GENESIS  # no chain depends on another replica's
        assert all(b["prev"] == a["hash"] for a, b in pairwise(records))
    results = verify_chains(shared)
    assert {c: (r.ok, r.records, r.files) for c, r in results.items()} == {
        "pod-a": (True, 20, 1),
        "pod-b": (True, 30, 1),
    }
    assert verify(shared).records == 50


async def test_a_trail_from_before_replicas_still_verifies_beside_new_chains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "acme"
    await _write(shared, "", ["old1", "old2"])  # the single-replica layout
    assert (shared / f"{DAY}.jsonl").exists()
    assert "replica" not in read(shared / f"{DAY}.jsonl")[0]
    await _write(shared, "pod-a", ["new1"])
    assert set(chains(shared)) == {"", "pod-a"}
    assert main(["audit", "verify", str(shared)]) == 0
    assert capsys.readouterr().out == (
        "ok: 3 records in 2 files\n"
        "  single-replica trail: ok, 2 records in 1 file\n"
        "  replica pod-a: ok, 1 record in 1 file\n"
    )


async def test_a_reordered_chain_is_broken_and_the_other_replica_is_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "acme"
    await _write(shared, "pod-a", ["a1", "a2", "a3"])
    await _write(shared, "pod-b", ["b1", "b2", "b3"])
    path = shared / f"{DAY}.pod-b.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2] + lines[1])
    assert main(["audit", "verify", str(shared)]) == 1
    assert capsys.readouterr().out == (
        f"BROKEN: {path}:2: prev is not the hash of the record before it "
        "(a record was removed, moved or added)\n"
        "  replica pod-a: ok, 3 records in 1 file\n"
        "  replica pod-b: BROKEN, 1 record in 1 file\n"
    )
    results = verify_chains(shared)
    assert results["pod-a"].ok and not results["pod-b"].ok


async def test_prune_removes_every_replicas_expired_files(tmp_path: Path) -> None:
    shared = tmp_path / "acme"
    shared.mkdir()
    for name in ("2026-01-01.pod-a.jsonl", "2026-01-01.jsonl", "2026-01-01.gone-pod.jsonl",
                 "2026-03-01.pod-a.jsonl", "2026-03-01.pod-b.jsonl"):  # fmt: skip
        (shared / name).write_text("")
    removed = prune_trail(shared, 30, date(2026, 3, 2))
    assert sorted(p.name for p in removed) == [
        "2026-01-01.gone-pod.jsonl", "2026-01-01.jsonl", "2026-01-01.pod-a.jsonl"
    ]  # fmt: skip
    assert sorted(chains(shared)) == ["pod-a", "pod-b"]


# --- against the usage ledger ----------------------------------------------------------


def _usage(rid: str, at: float, tenant: str = "acme") -> UsageRecord:
    return UsageRecord(at, rid, tenant, "gpt-4o", 1, 1, False, 200, 1.0, 0.0)


async def test_against_usage_finds_requests_missing_from_every_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    noon = 1772366400.0  # 2026-03-01T12:00:00Z, the records' time
    shared = tmp_path / "audit" / "acme"
    await _write(shared, "pod-a", ["r1", "r3"])
    await _write(shared, "pod-b", ["r2"])
    config = tmp_path / "checkstream.yaml"
    config.write_text(
        "usage: {path: usage.db}\n"
        "tenants:\n  configs:\n"
        "    acme: {backend_url: 'http://h:1', audit: {path: audit/acme}}\n"
    )
    ledger = UsageLedger.open(tmp_path / "usage.db")
    rows = [
        _usage("before", noon - 3600),  # before the trail's first record: not checked
        _usage("r1", noon - 0.002),  # its ledger row is written just before its record
        _usage("r2", noon),
        _usage("r3", noon),
        _usage("lost-1", noon + 5),
        _usage("lost-2", noon + 6),
        _usage("r9", noon, tenant="beta"),  # another tenant's: never acme's business
    ]
    for row in rows:
        await ledger.record(row)
    await ledger.aclose()
    argv = ["audit", "verify", "-c", str(config), "--tenant", "acme", "--against-usage"]
    assert await asyncio.to_thread(main, argv) == 1
    out = capsys.readouterr().out
    assert out.endswith(
        "MISSING: 2 of 5 ledger requests since 2026-03-01T11:59:59.000Z have no audit "
        "request record:\n"
        "  lost-1 2026-03-01T12:00:05.000Z\n"
        "  lost-2 2026-03-01T12:00:06.000Z\n"
    ), out
    assert out.startswith("ok: 3 records in 2 files\n")

    # Once they are in the trail (any replica's chain), it is complete.
    await _write(shared, "pod-b", ["lost-1", "lost-2"])
    assert await asyncio.to_thread(main, argv) == 0
    assert capsys.readouterr().out.endswith(
        "usage: all 5 ledger requests since 2026-03-01T11:59:59.000Z are in the trail\n"
    )


def test_against_usage_needs_a_tenant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path), "--against-usage"]) == 2
    assert "--against-usage needs --tenant" in capsys.readouterr().err


def test_an_empty_trail_checks_the_whole_ledger(tmp_path: Path) -> None:
    (tmp_path / "acme").mkdir()
    found = check_against_ledger(tmp_path / "acme", lambda since: {"x": since + 1})
    assert (found.since, found.checked, found.missing) == (None, 1, (("x", 1.0),))
