"""A tenant's whole life end to end: onboarded from a template with ``checkstream tenants
new``, served through a real Envoy and extproc, exported, then purged."""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import (
    RecordingUpstream,
    gateway_ports,
    request,
    running_gateway,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "checkstream", *args], capture_output=True, text=True, timeout=120
    )


def chat(gw_url: str, key: str, prompt: str) -> int:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    reply = request(f"{gw_url}/v1/chat/completions", body, {"authorization": f"Bearer {key}"})
    return reply.status


def count_rows(db: Path, tenant: str) -> int:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT count(*) FROM usage WHERE tenant = ?", (tenant,)).fetchone()
        return int(row[0])
    finally:
        conn.close()


def test_onboard_serve_export_and_purge(tmp_path: Path) -> None:
    up = RecordingUpstream("onboarding").start()
    try:
        _lifecycle(tmp_path, up)
    finally:
        up.stop()


def _lifecycle(tmp_path: Path, up: RecordingUpstream) -> None:
    backend = f"http://127.0.0.1:{up.port}/v1"
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "usage": {"path": "./usage.db"},
        "tenants": {
            "resolution": [{"api_key_mapping": True}],
            "configs": {"keep": {"backend_url": backend, "api_keys": []}},
        },
    }
    path = write_config(tmp_path, config)
    keep_key = cli("keys", "new", "--tenant", "keep", "--name", "k").stdout.splitlines()[1]
    digest = hashlib.sha256(keep_key.encode()).hexdigest()
    config["tenants"]["configs"]["keep"]["api_keys"] = [{"name": "k", "sha256": digest}]
    write_config(tmp_path, config)

    made = cli(
        "tenants", "new", "shop", "-c", str(path), "--template", "internal",
        "--backend-url", backend,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[3]
    db = tmp_path / "usage.db"
    trail = tmp_path / "audit" / "shop"

    with running_gateway(path) as gw:
        before = len(up.received)
        assert chat(gw.url, key, "hello") == 200
        assert chat(gw.url, key, "mail me at jane.doe@example.com") == 200  # logged: PII
        assert chat(gw.url, keep_key, "hello from keep") == 200
        assert len(up.received) == before + 3
        assert key not in json.dumps(up.last().headers)
        assert wait_until(lambda: db.exists() and count_rows(db, "shop") == 2)
        assert wait_until(lambda: trail.is_dir() and any(trail.glob("*.jsonl")))

        out = tmp_path / "export"
        exported = cli("tenants", "export", "-c", str(path), "--tenant", "shop", "--out", str(out))
        assert exported.returncode == 0, exported.stderr
        assert exported.stdout.startswith(f"exported tenant 'shop' to {out}: 2 usage rows, 1 ")
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["tenant"] == "shop"
        assert manifest["usage"]["rows"] == 2
        assert manifest["audit"]["verified"] is True
        for entry in manifest["files"]:
            data = (out / entry["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
            assert len(data) == entry["bytes"]
        names = sorted(e["path"] for e in manifest["files"])
        assert names[-2:] == ["usage.csv", "usage.json"] and names[0].startswith("audit/")
        with (out / "usage.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert [r["tenant"] for r in rows] == ["shop", "shop"]
        assert {r["tenant"] for r in json.loads((out / "usage.json").read_text())} == {"shop"}
        # Traffic after the export: that export no longer holds everything.
        assert chat(gw.url, key, "one more") == 200
        assert wait_until(lambda: count_rows(db, "shop") == 3)

    # Still configured: refused. Without --yes: refused.
    args = ("tenants", "purge", "-c", str(path), "--tenant", "shop", "--export", str(out))
    still = cli(*args, "--yes")
    assert still.returncode == 1
    assert f"tenant 'shop' is still in {path}" in still.stderr
    on_disk = yaml.safe_load(path.read_text())
    del on_disk["tenants"]["configs"]["shop"]
    path.write_text(yaml.safe_dump(on_disk))
    unconfirmed = cli(*args)
    assert unconfirmed.returncode == 1 and "add --yes" in unconfirmed.stderr
    stale = cli(*args, "--yes")
    assert stale.returncode == 1
    assert "is out of date: the ledger has 3 rows for the tenant, the export 2" in stale.stderr
    assert count_rows(db, "shop") == 3

    fresh = tmp_path / "export2"
    again = cli("tenants", "export", "-c", str(path), "--tenant", "shop", "--out", str(fresh))
    assert again.returncode == 0, again.stderr
    purged = cli(
        "tenants", "purge", "-c", str(path), "--tenant", "shop", "--export", str(fresh), "--yes"
    )
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith("purged tenant 'shop': 3 usage rows, 1 audit files")
    assert count_rows(db, "shop") == 0
    assert count_rows(db, "keep") == 1  # nobody else's rows
    assert not trail.exists()
    conn = sqlite3.connect(db)
    try:
        [(tenant, rows, files, manifest_sha)] = conn.execute(
            "SELECT tenant, usage_rows, audit_files, manifest_sha256 FROM purges"
        ).fetchall()
    finally:
        conn.close()
    expected = hashlib.sha256((fresh / "manifest.json").read_bytes()).hexdigest()
    assert (tenant, rows, files, manifest_sha) == ("shop", 3, 1, expected)
