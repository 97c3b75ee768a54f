"""Checking a tenant's audit trail: every replica's hash chain, read-only.

Run by the CLI (``checkstream audit verify``, tenant offboarding) and by tests; never by a
worker. What a chain shows and what it cannot is in ``trail.py``'s docstring. A trail is read
from a snapshot of its files' sizes taken under the writers' shared lock, so a batch being
appended is either wholly in or wholly out; an incomplete line at the very end is ``torn``
(a write cut short, never acknowledged), anywhere else it is tampering.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from checkstream.audit.trail import chains, day_files, lock_name, record_hash


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    files: int
    problem: str | None = None  # "<file>:<line>: <why>" for the first broken record
    #: The only problem is an incomplete last line at the very end of the trail: a write cut
    #: short (crash, full disk), never acknowledged; every record before it verifies.
    torn: bool = False


def verify(path: Path) -> VerifyResult:
    """Check every hash chain of the trail in directory ``path``: ok when all are, else the
    first problem found (``verify_chains`` reports per replica)."""
    if not path.is_dir():
        return VerifyResult(False, 0, 0, f"{path}: not a directory")
    results = verify_chains(path).values()
    broken = [result for result in results if not result.ok]
    return VerifyResult(
        not broken,
        sum(result.records for result in results),
        sum(result.files for result in results),
        broken[0].problem if broken else None,
        torn=bool(broken) and all(result.torn for result in broken),
    )


def verify_chains(path: Path) -> dict[str, VerifyResult]:
    """Each replica's chain in directory ``path`` checked on its own ("" is a trail from
    before replicas); empty when the directory holds no day file."""
    return {chain: verify_chain(path, chain) for chain in chains(path)}


def verify_chain(path: Path, chain: str = "") -> VerifyResult:
    """Check one hash chain of the trail in directory ``path``; stops at the first problem.

    The first record's ``prev`` is taken as given (``"0" * 64`` unless older files were
    pruned); see the module docstring for what a chain cannot show.
    """
    snapshot = _snapshot(path, chain)
    records = 0
    prev: str | None = None
    for index, (file, size) in enumerate(snapshot):
        try:
            for number, raw in enumerate(_lines(file, size), start=1):
                if not raw.endswith(b"\n") and all(s == 0 for _, s in snapshot[index + 1 :]):
                    # Only the trail's last bytes can be a torn write: the next append cuts
                    # them off. Anywhere else a cut line means the files were altered.
                    problem = (
                        f"{file}:{number}: incomplete last line ({len(raw)} bytes): a write "
                        "cut short by a crash or a full disk, never acknowledged; the "
                        f"{records} records before it verify and the next append removes it"
                    )
                    return VerifyResult(False, records, len(snapshot), problem, torn=True)
                try:
                    prev = _checked_hash(raw, prev)
                except _Broken as broken:
                    problem = f"{file}:{number}: {broken}"
                    return VerifyResult(False, records, len(snapshot), problem)
                records += 1
        except FileNotFoundError:
            problem = f"{file}: removed while verifying (pruned?); run verify again"
            return VerifyResult(False, records, len(snapshot), problem)
    return VerifyResult(True, records, len(snapshot))


def _snapshot(path: Path, chain: str) -> list[tuple[Path, int]]:
    """A chain's day files and their sizes, taken under a shared lock so no batch is
    half-written. Read-only copies of a trail (no usable lock file) are checked without it.
    """
    try:
        fd = os.open(path / lock_name(chain), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        return [(file, file.stat().st_size) for _, file in day_files(path, chain)]
    finally:
        if fd is not None:
            os.close(fd)


def _lines(file: Path, size: int) -> Iterator[bytes]:
    """Lines of the first ``size`` bytes of ``file`` (later appends are not in the snapshot)."""
    left = size
    with file.open("rb") as stream:
        for raw in stream:
            if left <= 0:
                return
            yield raw[:left]
            left -= len(raw)


class _Broken(Exception):
    pass


def _checked_hash(raw: bytes, prev: str | None) -> str:
    """The hash of the record on line ``raw`` once it proves to follow ``prev``."""
    if not raw.endswith(b"\n"):
        raise _Broken("incomplete line followed by more records (the files were altered)")
    try:
        record = json.loads(raw)
    except ValueError:
        raise _Broken("not valid JSON") from None
    if not isinstance(record, dict):
        raise _Broken("not a JSON object")
    claimed, link = record.get("hash"), record.get("prev")
    if not isinstance(claimed, str) or not isinstance(link, str):
        raise _Broken("missing hash or prev")
    if record_hash(record) != claimed:
        raise _Broken("hash does not match the record (the record was edited)")
    if prev is not None and link != prev:
        raise _Broken(
            "prev is not the hash of the record before it (a record was removed, moved or added)"
        )
    return claimed
