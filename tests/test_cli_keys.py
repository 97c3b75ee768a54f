"""``checkstream keys new|list`` as a user runs them: a real process, its real output."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from checkstream.config.model import load_config
from checkstream.tenants.resolution import Resolved, TenantResolver

# Runs the real `checkstream` program (or its process pools) as a user would: the e2e tier.
pytestmark = pytest.mark.e2e

CONFIG = """\
# Tenants of the keys tests.
tenants:
  resolution: [{api_key_mapping: true}]
  api_key_map: {"sk-cs-legacy": beta}
  configs:
    acme:
      backend_url: "http://127.0.0.1:9001/v1"
    beta:
      backend_url: "http://127.0.0.1:9001/v1"
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "checkstream", *args], capture_output=True, text=True, timeout=60
    )


def test_keys_new_prints_the_key_once_and_an_entry_that_works(tmp_path: Path) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(CONFIG)
    expires = (datetime.now(UTC) + timedelta(days=30)).date()
    done = cli("keys", "new", "--tenant", "acme", "--name", "ci", "--expires", str(expires))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "API key for tenant 'acme' (shown once, stored nowhere):"
    key = lines[1]
    assert key.startswith("sk-cs-") and len(key) > 40
    assert lines[3] == "Add this entry to tenants.configs.acme.api_keys:"
    [entry] = yaml.safe_load("\n".join(lines[4:]))
    assert entry["name"] == "ci" and entry["expires"] == expires
    assert key not in "\n".join(lines[2:])  # the entry holds the digest only
    # Pasted into the config, the key resolves its tenant.
    config = yaml.safe_load(CONFIG)
    config["tenants"]["configs"]["acme"]["api_keys"] = [entry]
    path.write_text(yaml.safe_dump(config))
    resolver = TenantResolver(load_config(path).model, {})
    found = resolver.resolve("/v1/chat/completions", {"authorization": f"Bearer {key}"})
    assert isinstance(found, Resolved) and found.tenant.id == "acme"
    # Two runs, two keys.
    again = cli("keys", "new", "--tenant", "acme", "--name", "ci2").stdout.splitlines()[1]
    assert again != key


def test_keys_new_checks_against_a_config(tmp_path: Path) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(CONFIG)
    done = cli("keys", "new", "--tenant", "ghost", "--name", "ci", "-c", str(path))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"checkstream: unknown tenant 'ghost' in {path}\n"
    past = cli("keys", "new", "--tenant", "acme", "--name", "ci", "--expires", "2001-01-01")
    assert past.returncode == 2 and "2001-01-01 is in the past" in past.stderr
    assert past.stdout == ""


def test_keys_list_shows_names_expiry_and_never_a_whole_digest(tmp_path: Path) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(CONFIG)
    config = yaml.safe_load(CONFIG)
    ci, old = "a" * 64, "b" * 64
    config["tenants"]["configs"]["acme"]["api_keys"] = [
        {"name": "ci", "sha256": ci, "expires": "2999-12-31"},
        {"name": "old", "sha256": old, "expires": "2020-01-01T12:30:00Z"},
    ]
    path.write_text(yaml.safe_dump(config))
    done = cli("keys", "list", "-c", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "TENANT  NAME                  STORED     EXPIRES                STATUS   DIGEST",
        "acme    ci                    sha256     end of 2999-12-31 UTC  active   aaaaaaaa…",
        "acme    old                   sha256     2020-01-01 12:30 UTC   expired  bbbbbbbb…",
        "beta    api_key_map[entry 1]  plaintext  never                  active   -",
    ]
    assert ci not in done.stdout and old not in done.stdout
    assert "sk-cs-legacy" not in done.stdout + done.stderr
