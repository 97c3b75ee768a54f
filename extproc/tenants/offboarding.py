"""A tenant's data out (export) and gone (purge): usage ledger rows and audit trail (CLI).

Export writes ``usage.csv``, ``usage.json``, ``audit/<day>.jsonl`` and ``manifest.json``
(every file's SHA-256 and size, row and record counts, the trail's verification). Purge
deletes the tenant's ledger rows and audit day files, but only what an export holds: the
ledger's rows and the trail's files must still match the manifest, so nothing written since
the export is lost. The purge itself is recorded in the ledger (its ``purges`` table), in
the same transaction as the deletion; SQLite and the fleet's PostgreSQL ledger alike
(``ledger_rows.py``).
"""

from __future__ import annotations

import csv
import getpass
import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from checkstream.audit.trail import every_day_file, lock_files
from checkstream.audit.verify import verify
from checkstream.tenants.ledger_rows import COLUMNS as _COLUMNS
from checkstream.tenants.ledger_rows import LedgerRows

MANIFEST = "manifest.json"


class OffboardingError(Exception):
    """Why an export or purge cannot go ahead; the message is for the operator."""


@dataclass(frozen=True)
class Exported:
    directory: Path
    usage_rows: int
    audit_files: int
    audit_records: int
    manifest_sha256: str


@dataclass(frozen=True)
class Purged:
    usage_rows: int
    audit_files: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _csv(rows: list[tuple[Any, ...]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_COLUMNS)
    writer.writerows(rows)
    return out.getvalue()


def export_tenant(tenant: str, ledger: LedgerRows, trail: Path | None, out: Path) -> Exported:
    if out.exists() and any(out.iterdir()):
        raise OffboardingError(f"{out} is not empty: export into a new directory")
    rows = ledger.rows(tenant)
    out.mkdir(parents=True, exist_ok=True)
    (out / "usage.csv").write_text(_csv(rows))
    records = [dict(zip(_COLUMNS, row, strict=True)) for row in rows]
    (out / "usage.json").write_text(json.dumps(records, indent=1) + "\n")
    days = every_day_file(trail) if trail is not None and trail.is_dir() else []
    check = verify(trail) if days and trail is not None else None
    if days:
        (out / "audit").mkdir()
        for _day, source in days:
            shutil.copy2(source, out / "audit" / source.name)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {
        "tenant": tenant,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "usage": {"ledger": ledger.where, "rows": len(rows)},
        "audit": {
            "trail": str(trail) if trail is not None else None,
            "files": len(days),
            "records": check.records if check else 0,
            "verified": check.ok if check else None,
            "problem": check.problem if check else None,
        },
        "files": [
            {
                "path": str(p.relative_to(out)),
                "bytes": p.stat().st_size,
                "sha256": sha256_file(p),
            }
            for p in files
        ],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Exported(
        out, len(rows), len(days), check.records if check else 0, sha256_file(out / MANIFEST)
    )


def read_manifest(export: Path, tenant: str) -> dict[str, Any]:
    path = export / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise OffboardingError(f"{path}: no export manifest there") from None
    except json.JSONDecodeError as exc:
        raise OffboardingError(f"{path}: not a manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("tenant") != tenant:
        raise OffboardingError(f"{path}: an export of another tenant, not '{tenant}'")
    for entry in manifest.get("files", []):
        copy = export / entry["path"]
        if not copy.is_file() or sha256_file(copy) != entry["sha256"]:
            raise OffboardingError(f"{copy}: missing or changed since the export")
    return manifest


def _unexported(
    manifest: dict[str, Any], rows: int, days: list[tuple[Any, Path]], export: Path
) -> str | None:
    """What the export lacks, or None when it holds everything a purge would delete."""
    if rows != manifest["usage"]["rows"]:
        return f"the ledger has {rows} rows for the tenant, the export {manifest['usage']['rows']}"
    exported = {e["path"]: e["sha256"] for e in manifest["files"]}
    for _day, source in days:
        if exported.get(f"audit/{source.name}") != sha256_file(source):
            return f"{source} is not in the export as it is now"
    return None


def _operator() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no USER variable and no passwd entry (some containers)
        return "unknown"


def purge_tenant(
    tenant: str, ledger: LedgerRows, trail: Path | None, export: Path | None
) -> Purged:
    """Delete the tenant's rows and day files; with ``export``, only if it holds them all."""
    days = every_day_file(trail) if trail is not None and trail.is_dir() else []
    manifest_sha = "none (--force)"
    if export is not None:
        manifest = read_manifest(export, tenant)
        why = _unexported(manifest, len(ledger.rows(tenant)), days, export)
        if why is not None:
            raise OffboardingError(f"export {export} is out of date: {why}; export again")
        manifest_sha = sha256_file(export / MANIFEST)
    deleted = ledger.purge(tenant, len(days), manifest_sha, _operator())
    locks = lock_files(trail) if trail is not None and trail.is_dir() else []
    for _day, path in days:
        path.unlink()
    if trail is not None and trail.is_dir():
        for lock in locks:
            lock.unlink(missing_ok=True)
        if not any(trail.iterdir()):
            trail.rmdir()
    return Purged(deleted, len(days))
