"""The README's configuration example is a config ``config check`` accepts, and its keyless
header access is accepted only because it says who may use it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from checkstream.config.model import load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.tenants.keyindex import digest_of

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_config() -> str:
    section = README.read_text().split("## Configuration", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    return block.group(1).replace("<from checkstream keys new>", digest_of("sk-cs-readme"))


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "acme.yaml").write_text('version: "1.0"\nname: p\npolicies: []\n')
    path = tmp_path / "checkstream.yaml"
    path.write_text(text)
    return path


def test_the_readme_example_passes_config_check(tmp_path: Path) -> None:
    loaded = load_config(_write(tmp_path, readme_config()), require_secrets=False)
    acme = loaded.model.tenants.configs["acme-corp"]
    assert acme.budget is not None and acme.budget.daily_usd == 150
    assert [str(n) for n in loaded.model.server.trusted_networks] == ["10.0.0.0/8"]


def test_without_trusted_networks_the_readme_example_is_refused(tmp_path: Path) -> None:
    text = readme_config().replace(', trusted_networks: ["10.0.0.0/8"]', "")
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text), require_secrets=False)
    assert "tenant 'acme-corp' has managed auth and can be reached without a key by header " in (
        str(caught.value)
    )
