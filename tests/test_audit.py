"""Audit trails on real files: chaining, tamper detection, isolation, durability, retention."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from checkstream.audit.trail import (
    GENESIS,
    AuditError,
    AuditLog,
    prune_trail,
    record_hash,
    resolve_audit_dirs,
)
from checkstream.audit.verify import VerifyResult, verify
from checkstream.cli.main import main
from checkstream.config.model import load_config
from checkstream.config.yamlsource import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DAY = "2026-03-01"

# Appends to tenant "acme"'s trail in argv[1], ten concurrent requests at a time, printing how
# many records are acknowledged (fsynced); argv[2] < 0 means forever.
WRITER = """
import asyncio, sys
from pathlib import Path
from checkstream.audit.trail import AuditLog

async def main(directory: str, count: int, tag: str) -> None:
    log = AuditLog({"acme": Path(directory)})
    done = 0
    while count < 0 or done < count:
        records = [
            [{"time": "2026-03-01T12:00:00Z", "request_id": f"{tag}-{done + i}"}] for i in range(10)
        ]
        await asyncio.gather(*(log.append("acme", r) for r in records))
        done += 10
        print(done, flush=True)
    await log.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


def trigger(n: int, tenant: str = "acme", time: str | float = f"{DAY}T12:00:00Z") -> dict[str, Any]:
    return {
        "time": time,
        "request_id": f"req-{n}",
        "tenant": tenant,
        "phase": "ingress",
        "rule": "block_pii",
        "action": "block",
        "classifier": "pii_detector",
        "score": 0.97,
        "regulation": "GDPR",
        "model": "gpt-4o-mini",
    }


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def writer(directory: Path, count: int, tag: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), str(count), tag],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditLog]:
    log = AuditLog({"acme": tmp_path / "acme", "beta": tmp_path / "beta"})
    yield log
    await log.aclose()


async def test_records_are_chained_and_private(audit: AuditLog, tmp_path: Path) -> None:
    await audit.append("acme", [trigger(1), trigger(2)])
    await audit.append("acme", [trigger(3)])

    trail = tmp_path / "acme"
    records = read(trail / f"{DAY}.jsonl")
    assert [r["request_id"] for r in records] == ["req-1", "req-2", "req-3"]
    assert records[0]["prev"] == GENESIS
    assert [r["prev"] for r in records[1:]] == [r["hash"] for r in records[:-1]]
    assert all(record_hash(r) == r["hash"] for r in records)
    assert verify(trail) == VerifyResult(True, 3, 1)
    assert stat.S_IMODE(trail.stat().st_mode) == 0o700
    assert stat.S_IMODE((trail / f"{DAY}.jsonl").stat().st_mode) == 0o600


async def _four_line_trail(audit: AuditLog, tmp_path: Path) -> tuple[Path, list[str]]:
    await audit.append("acme", [trigger(n) for n in range(1, 5)])
    path = tmp_path / "acme" / f"{DAY}.jsonl"
    return path, path.read_text().splitlines(keepends=True)


async def test_editing_a_field_is_reported_at_that_line(audit: AuditLog, tmp_path: Path) -> None:
    path, lines = await _four_line_trail(audit, tmp_path)
    lines[2] = lines[2].replace('"score":0.97', '"score":0.12')
    path.write_text("".join(lines))

    result = verify(tmp_path / "acme")
    assert not result.ok
    assert result.problem is not None
    assert result.problem.startswith(f"{path}:3: ")
    assert "edited" in result.problem


async def test_rehashing_an_edit_breaks_the_next_link(audit: AuditLog, tmp_path: Path) -> None:
    path, lines = await _four_line_trail(audit, tmp_path)
    record = json.loads(lines[1])
    record["action"] = "allow"
    record["hash"] = record_hash(record)
    lines[1] = json.dumps(record) + "\n"
    path.write_text("".join(lines))

    result = verify(tmp_path / "acme")
    assert not result.ok and result.problem is not None
    assert result.problem.startswith(f"{path}:3: prev is not the hash")


@pytest.mark.parametrize(
    ("tamper", "line"),
    [
        (lambda lines: lines[:1] + lines[2:], 2),  # delete the second line
        (lambda lines: [lines[0], lines[2], lines[1], lines[3]], 2),  # swap two lines
        (lambda lines: [*lines[:2], lines[1], *lines[2:]], 3),  # duplicate a line
    ],
    ids=["delete", "swap", "duplicate"],
)
async def test_removed_or_moved_lines_are_detected(
    audit: AuditLog, tmp_path: Path, tamper: Any, line: int
) -> None:
    path, lines = await _four_line_trail(audit, tmp_path)
    path.write_text("".join(tamper(lines)))

    result = verify(tmp_path / "acme")
    assert not result.ok and result.problem is not None
    assert result.problem.startswith(f"{path}:{line}: prev is not the hash")


async def test_a_tenant_never_finds_another_tenants_records(
    audit: AuditLog, tmp_path: Path
) -> None:
    await asyncio.gather(
        *(audit.append(t, [trigger(n, tenant=t)]) for n in range(50) for t in ("acme", "beta"))
    )
    await audit.append("gamma", [trigger(1, tenant="gamma")])  # not audited: nothing written

    for tenant in ("acme", "beta"):
        records = read(tmp_path / tenant / f"{DAY}.jsonl")
        assert len(records) == 50
        assert {r["tenant"] for r in records} == {tenant}
        assert verify(tmp_path / tenant).ok
    assert not audit.audits("gamma")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme", "beta"]


async def test_the_chain_runs_across_day_files(audit: AuditLog, tmp_path: Path) -> None:
    await audit.append("acme", [trigger(1, time="2026-03-01T23:59:59Z")])
    await audit.append("acme", [trigger(2, time="2026-03-02T00:00:01+00:00")])
    # Stamped before midnight but written after: stays in the newest file, the chain in order.
    await audit.append("acme", [trigger(3, time="2026-03-01T23:59:59.5Z")])
    # Epoch seconds work too.
    await audit.append("acme", [trigger(4, time=datetime(2026, 3, 3, tzinfo=UTC).timestamp())])

    trail = tmp_path / "acme"
    first, second, third = (read(trail / f"2026-03-0{d}.jsonl") for d in (1, 2, 3))
    assert [r["request_id"] for r in second] == ["req-2", "req-3"]
    assert second[0]["prev"] == first[-1]["hash"]
    assert third[0]["prev"] == second[-1]["hash"]
    assert verify(trail) == VerifyResult(True, 4, 3)


async def test_prune_removes_only_old_files_and_the_rest_verifies(
    audit: AuditLog, tmp_path: Path
) -> None:
    for day in range(1, 11):
        await audit.append("acme", [trigger(day, time=f"2026-01-{day:02d}T08:00:00Z")])
        await audit.append("beta", [trigger(day, "beta", time=f"2026-01-{day:02d}T08:00:00Z")])

    removed = prune_trail(tmp_path / "acme", 3, date(2026, 1, 10))
    assert [p.name for p in removed] == [f"2026-01-0{d}.jsonl" for d in range(1, 7)]
    result = verify(tmp_path / "acme")
    assert (result.ok, result.records, result.files) == (True, 4, 4)

    removed = await asyncio.to_thread(
        audit.prune, {"acme": 3, "beta": 8, "gamma": 1}, date(2026, 1, 10)
    )
    assert [p.name for p in removed] == ["2026-01-01.jsonl"]
    assert verify(tmp_path / "beta").records == 9
    # Writing goes on from the pruned trail's last record.
    await audit.append("acme", [trigger(11, time="2026-01-11T08:00:00Z")])
    assert verify(tmp_path / "acme").records == 5


async def test_concurrent_appends_share_fsyncs(audit: AuditLog, tmp_path: Path) -> None:
    await asyncio.gather(*(audit.append("acme", [trigger(n)]) for n in range(200)))

    records = read(tmp_path / "acme" / f"{DAY}.jsonl")
    assert sorted(r["request_id"] for r in records) == sorted(f"req-{n}" for n in range(200))
    assert verify(tmp_path / "acme").ok
    assert audit.fsyncs <= 20, audit.fsyncs


async def test_bad_records_are_refused_before_queueing(audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="time"):
        await audit.append("acme", [{"request_id": "r"}])
    with pytest.raises(ValueError, match="prev and hash"):
        await audit.append("acme", [{**trigger(1), "hash": "x"}])
    await audit.append("acme", [{**trigger(1), "labels": ("pii", "email"), "note": "caf\u00e9"}])
    assert verify(audit.trails["acme"]).records == 1
    await audit.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await audit.append("acme", [trigger(1)])


async def test_an_unreadable_trail_fails_its_waiters_only(audit: AuditLog, tmp_path: Path) -> None:
    await audit.append("acme", [trigger(1)])
    with (tmp_path / "acme" / f"{DAY}.jsonl").open("a") as file:
        file.write("not json\n")

    with pytest.raises(AuditError, match="audit verify"):
        await asyncio.wait_for(audit.append("acme", [trigger(2)]), 10)
    await asyncio.wait_for(audit.append("beta", [trigger(1, "beta")]), 10)
    assert verify(tmp_path / "beta").ok


async def test_a_torn_last_line_is_reported_then_cut_by_the_next_writer(
    audit: AuditLog, tmp_path: Path
) -> None:
    await audit.append("acme", [trigger(1), trigger(2)])
    path = tmp_path / "acme" / f"{DAY}.jsonl"
    with path.open("a") as file:
        file.write('{"time":"2026-03-01T12:00:00Z","request_id":"req-3","ten')

    result = verify(tmp_path / "acme")
    assert (result.ok, result.torn, result.records) == (False, True, 2)
    assert result.problem is not None
    assert result.problem.startswith(f"{path}:3: incomplete last line (56 bytes)")

    await audit.append("acme", [trigger(4)])
    assert [r["request_id"] for r in read(path)] == ["req-1", "req-2", "req-4"]
    assert verify(tmp_path / "acme").ok


def test_two_processes_share_one_chain(tmp_path: Path) -> None:
    writers = [writer(tmp_path / "acme", 300, tag) for tag in ("a", "b")]
    for process in writers:
        assert process.wait(timeout=120) == 0

    result = verify(tmp_path / "acme")
    assert (result.ok, result.records) == (True, 600), result.problem


def test_sigkill_mid_write_leaves_a_trail_that_verifies(tmp_path: Path) -> None:
    acknowledged = 0
    for round_ in range(3):  # each new writer must carry on from what the killed one left
        process = writer(tmp_path / "acme", -1, f"round{round_}")
        assert process.stdout is not None
        for line in process.stdout:
            if int(line) >= 100:
                acknowledged += int(line)
                break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()

        result = verify(tmp_path / "acme")
        assert result.ok, result.problem
        assert result.records >= acknowledged


def _config(tmp_path: Path, tenants: dict[str, Any]) -> Path:
    configs = {
        tenant: {"backend_url": "http://127.0.0.1:9001", **({"audit": a} if a is not None else {})}
        for tenant, a in tenants.items()
    }
    path = tmp_path / "checkstream.yaml"
    path.write_text(yaml.safe_dump({"tenants": {"default_tenant": "acme", "configs": configs}}))
    return path


def test_resolve_audit_dirs(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        {
            "acme": {"path": "./trails/acme", "retention_days": 30},
            "beta": {},
            "gamma": {"enabled": False},
            "delta": None,
            "omega": {"path": str(tmp_path / "elsewhere")},
        },
    )
    dirs = resolve_audit_dirs(load_config(config, require_secrets=False))

    assert {t: d for t, (d, _) in dirs.items()} == {
        "acme": tmp_path / "trails" / "acme",
        "beta": tmp_path / "audit" / "beta",
        "omega": tmp_path / "elsewhere",
    }
    assert dirs["acme"][1].retention_days == 30


def test_resolve_audit_dirs_refuses_a_shared_directory(tmp_path: Path) -> None:
    config = _config(tmp_path, {"acme": {"path": "audit/x"}, "beta": {"path": "./audit/x/"}})
    with pytest.raises(ConfigError) as caught:
        resolve_audit_dirs(load_config(config, require_secrets=False))
    assert "tenants.configs.beta.audit.path" in str(caught.value)
    assert "tenant 'acme'" in str(caught.value)


async def test_cli_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, {"acme": {"path": "trails/acme"}, "beta": None, "quiet": {}})
    log = AuditLog({"acme": tmp_path / "trails" / "acme"})
    await log.append("acme", [trigger(n) for n in range(3)])
    await log.aclose()

    assert main(["audit", "verify", "-c", str(config), "--tenant", "acme"]) == 0
    assert capsys.readouterr().out == "ok: 3 records in 1 file\n"
    assert main(["audit", "verify", str(tmp_path / "trails" / "acme")]) == 0
    assert capsys.readouterr().out == "ok: 3 records in 1 file\n"

    path = tmp_path / "trails" / "acme" / f"{DAY}.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2])
    assert main(["audit", "verify", "-c", str(config), "--tenant", "acme"]) == 1
    assert capsys.readouterr().out.startswith(f"BROKEN: {path}:2: prev is not the hash")

    assert main(["audit", "verify", "-c", str(config), "--tenant", "nobody"]) == 1
    assert "tenant 'nobody' is unknown" in capsys.readouterr().err
    assert main(["audit", "verify", "-c", str(config), "--tenant", "beta"]) == 1
    assert "tenant 'beta' has no audit trail" in capsys.readouterr().err
    assert main(["audit", "verify", "-c", str(config), "--tenant", "quiet"]) == 1
    assert "no audit trail at" in capsys.readouterr().err
    (tmp_path / "audit" / "quiet").mkdir(parents=True)
    assert main(["audit", "verify", "-c", str(config), "--tenant", "quiet"]) == 0
    assert capsys.readouterr().out == "ok: 0 records in 0 files\n"
    with pytest.raises(SystemExit):
        main(["audit", "verify", str(tmp_path), "--tenant", "acme"])


async def test_cli_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, {"acme": {"retention_days": 7}, "beta": {}, "quiet": {}})
    today = datetime.now(UTC)
    log = AuditLog({t: tmp_path / "audit" / t for t in ("acme", "beta")})
    for age in (30, 8, 6, 0):
        stamp = (today - timedelta(days=age)).isoformat()
        await log.append("acme", [trigger(age, time=stamp)])
        await log.append("beta", [trigger(age, "beta", time=stamp)])
    await log.aclose()

    assert main(["audit", "prune", "-c", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    old = [(today - timedelta(days=age)).date().isoformat() for age in (30, 8)]
    assert out == [
        *(f"acme: removed {tmp_path / 'audit' / 'acme' / f'{d}.jsonl'}" for d in old),
        "pruned 2 files from 3 audited tenants",
    ]
    assert verify(tmp_path / "audit" / "acme").records == 2
    assert verify(tmp_path / "audit" / "beta").records == 4
