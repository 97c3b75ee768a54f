"""``audit verify`` tells a torn last line (a write cut short) from tampering.

The torn write is made for real: a child process appends with its file size limit
(RLIMIT_FSIZE) just above the trail's size, so the kernel writes part of the batch and then
refuses with EFBIG, exactly what a full disk does to an append.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkstream.audit.trail import AuditLog
from checkstream.audit.verify import verify
from checkstream.cli.audit import AUDIT_TORN
from checkstream.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
DAY = "2026-12-07"

FULL_DISK_WRITER = """
import asyncio, resource, sys
from pathlib import Path
from checkstream.audit.trail import AuditLog

directory = Path(sys.argv[1])


def record(n):
    return {"time": "2026-12-07T12:00:00Z", "type": "request", "request_id": f"req-{n}",
            "pad": "x" * 300}


async def main():
    log = AuditLog({"t": directory})
    await log.append("t", [record(1), record(2)])
    size = (directory / "2026-12-07.jsonl").stat().st_size
    # 100 more bytes fit, then the file is full: the next record is torn there.
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
    try:
        await log.append("t", [record(3)])
    except OSError as exc:
        print(exc.errno)
    await log.aclose()


asyncio.run(main())
"""


def _write_until_full(directory: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_WRITER, str(directory)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _record(n: int, day: str = DAY) -> dict[str, object]:
    return {"time": f"{day}T12:00:00Z", "type": "request", "request_id": f"req-{n}"}


async def test_a_write_cut_by_a_full_file_is_torn_not_tampered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = tmp_path / "t"
    assert _write_until_full(trail) == str(errno.EFBIG)
    path = trail / f"{DAY}.jsonl"
    assert not path.read_bytes().endswith(b"\n")  # the kernel wrote 100 bytes of record 3

    result = verify(trail)
    assert (result.ok, result.torn, result.records) == (False, True, 2)
    assert main(["audit", "verify", str(trail)]) == AUDIT_TORN
    out = capsys.readouterr().out
    assert out.startswith(f"TORN: {path}:3: incomplete last line (100 bytes): a write cut short")
    assert "the 2 records before it verify" in out

    # Space again: the next writer cuts the torn bytes off and the chain goes on.
    log = AuditLog({"t": trail})
    await log.append("t", [_record(4)])
    await log.aclose()
    assert [json.loads(line)["request_id"] for line in path.read_text().splitlines()] == [
        "req-1",
        "req-2",
        "req-4",
    ]
    assert main(["audit", "verify", str(trail)]) == 0


async def test_tampering_before_a_torn_end_is_still_tampering(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = tmp_path / "t"
    _write_until_full(trail)
    path = trail / f"{DAY}.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b'"req-1"', b'"req-9"')
    path.write_bytes(b"\n".join(lines))

    assert main(["audit", "verify", str(trail)]) == 1
    assert capsys.readouterr().out.startswith(
        f"BROKEN: {path}:1: hash does not match the record (the record was edited)"
    )
    assert not verify(trail).torn


async def test_a_cut_line_with_records_after_it_is_tampering(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = tmp_path / "t"
    log = AuditLog({"t": trail})
    await log.append("t", [_record(1), _record(2)])
    await log.append("t", [_record(3, "2026-12-08")])
    await log.aclose()
    first = trail / f"{DAY}.jsonl"
    os.truncate(first, first.stat().st_size - 10)  # an earlier day's last record, cut

    assert main(["audit", "verify", str(trail)]) == 1
    assert capsys.readouterr().out == (
        f"BROKEN: {first}:2: incomplete line followed by more records (the files were altered)\n"
    )


async def test_a_torn_end_followed_only_by_an_empty_day_file_is_torn(tmp_path: Path) -> None:
    trail = tmp_path / "t"
    log = AuditLog({"t": trail})
    await log.append("t", [_record(1), _record(2)])
    await log.aclose()
    first = trail / f"{DAY}.jsonl"
    os.truncate(first, first.stat().st_size - 10)
    # A writer that died right after creating the next day's file.
    (trail / "2026-12-08.jsonl").touch()
    result = verify(trail)
    assert (result.torn, result.records) == (True, 1)


def test_verify_reads_a_trail_on_a_full_disk_without_writing(tmp_path: Path) -> None:
    """Verify needs no write: it works where nothing can be written (here: every write
    refused by a file size limit of one byte, in a child process)."""
    trail = tmp_path / "t"
    _write_until_full(trail)
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))\n"
        "from checkstream.cli.main import main\n"
        f"sys.exit(main(['audit', 'verify', {str(trail)!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == AUDIT_TORN, (done.stdout, done.stderr)
    assert done.stdout.startswith("TORN: ")
