"""``checkstream tenants new`` as a user runs it: real processes, real files, real output."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from checkstream.config.model import load_config
from checkstream.tenants.onboarding import template_names
from checkstream.tenants.resolution import Resolved, TenantResolver

# Runs the real `checkstream` program (or its process pools) as a user would: the e2e tier.
pytestmark = pytest.mark.e2e

CONFIG = """\
# Our gateway. Comments, quoting and flow style must survive `tenants new`.
server: {host: 0.0.0.0, port: 8080}
tenants:
  resolution:                     # tried in order
    - api_key_mapping: true
  configs:
    acme-corp:
      backend_url: "https://api.openai.com/v1"   # the real one
      models: [gpt-4o, gpt-4o-mini]
# Defaults for every tenant.
pipeline:
  ingress: {enabled: true, classifiers: []}
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "checkstream", *args], capture_output=True, text=True, timeout=120
    )


def only_added(before: str, after: str) -> list[str]:
    """The lines ``after`` adds; fails if it changes or drops any line of ``before``."""
    added = []
    for line in difflib.ndiff(before.splitlines(), after.splitlines()):
        assert not line.startswith("- "), f"line changed or dropped: {line!r}"
        if line.startswith("+ "):
            added.append(line[2:])
    return added


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "checkstream.yaml"
    path.write_text(CONFIG)
    return path


def test_new_tenant_keeps_the_file_and_its_key_works(config: Path) -> None:
    done = cli(
        "tenants", "new", "shop", "-c", str(config), "--template", "internal",
        "--backend-url", "http://127.0.0.1:9001/v1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"tenant 'shop' added to {config} from template 'internal'"
    assert lines[1] == f"policy: {config.parent / 'policies' / 'shop.yaml'}"
    key = lines[3]
    assert key.startswith("sk-cs-")
    assert lines[4] == f"config check: {config}: OK (2 tenants, 1 policy file)"
    after = config.read_text()
    assert key not in after
    added = only_added(CONFIG, after)
    assert added[:3] == [
        "    # from template 'internal' (checkstream tenants new)",
        "    shop:",
        "      backend_url: http://127.0.0.1:9001/v1",
    ]
    assert all(line.startswith("      ") for line in added[3:])
    # The edited file is a valid config where the printed key binds the new tenant.
    loaded = load_config(config)
    shop = loaded.model.tenants.configs["shop"]
    assert shop.audit is not None and shop.audit.retention_days == 90
    assert [rule.name for rule in loaded.policies["shop"].model.policies] == [
        "log_prompt_injection",
        "log_toxicity",
        "log_pii",
    ]
    found = TenantResolver(loaded.model, {}).resolve("/v1/x", {"authorization": f"Bearer {key}"})
    assert isinstance(found, Resolved) and found.tenant.id == "shop"
    check = cli("config", "check", str(config))
    assert (check.returncode, check.stdout) == (0, f"{config}: OK (2 tenants, 1 policy file)\n")


@pytest.mark.parametrize("template", template_names())
def test_every_shipped_template_passes_config_check(config: Path, template: str) -> None:
    done = cli(
        "tenants", "new", f"t-{template}", "-c", str(config), "--template", template,
        "--backend-url", "https://api.anthropic.com", "--format", "anthropic",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    tenant = load_config(config).model.tenants.configs[f"t-{template}"]
    assert tenant.streaming_format == "anthropic"
    assert len(tenant.api_keys) == 1


def test_a_refused_tenant_leaves_everything_as_it_was(config: Path) -> None:
    # Managed auth, and the config resolves tenants by header: keyless access undeclared.
    config.write_text(CONFIG.replace("    - api_key_mapping: true", "    - header: X-Tenant-ID"))
    before = config.read_text()
    done = cli(
        "tenants", "new", "vault", "-c", str(config), "--template", "internal",
        "--backend-url", "https://api.openai.com/v1", "--token-env", "VAULT_KEY",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""
    assert "tenants.configs.vault.auth: tenant 'vault' has managed auth" in done.stderr
    assert "by header 'X-Tenant-ID' resolution" in done.stderr
    assert done.stderr.endswith(f"tenant 'vault' not added: {config} is as it was\n")
    assert config.read_text() == before
    assert not (config.parent / "policies" / "vault.yaml").exists()


def test_an_existing_tenant_or_unknown_template_is_refused(config: Path) -> None:
    done = cli(
        "tenants", "new", "acme-corp", "-c", str(config), "--template", "finance",
        "--backend-url", "https://api.openai.com/v1",
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"checkstream: {config}: tenant 'acme-corp' already exists\n"
    assert config.read_text() == CONFIG
    unknown = cli(
        "tenants",
        "new",
        "x",
        "-c",
        str(config),
        "--template",
        "casino",
        "--backend-url",
        "http://a",
    )
    assert unknown.returncode == 2
    assert "invalid choice: 'casino'" in unknown.stderr
    assert yaml.safe_load(config.read_text()) == yaml.safe_load(CONFIG)
