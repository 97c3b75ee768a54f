"""The CLI a new user meets first: ``--version``, one ``-c FILE`` grammar with help on every
option, ``init``, ``run`` without a config, and the demo's per-run state. Output is read from
the real command (a subprocess, or ``main`` with the real streams captured)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from checkstream.cli.init import STARTER_CONFIG
from checkstream.cli.main import build_parser, main
from checkstream.config.model import load_config
from checkstream.demo.state import demo_config_path, new_demo_state
from checkstream.ledger.usage import resolve_usage_path
from checkstream.tenants.keyindex import digest_of

# Runs the real `checkstream` program (or its process pools) as a user would: the e2e tier.
pytestmark = pytest.mark.e2e


def checkstream(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "checkstream", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**env, "PYTHONPATH": str(Path(__file__).parent.parent)},
        timeout=120,
    )


def test_version() -> None:
    done = checkstream("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"checkstream {version('checkstream')}"


def _parsers(parser: argparse.ArgumentParser, name: str = "checkstream") -> list[tuple[str, Any]]:
    """Every (command name, parser) in the CLI, nested commands included."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _parsers(sub, f"{name} {sub_name}")
    return found


def test_every_option_and_command_has_help() -> None:
    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._SubParsersAction):
                missing += [
                    f"{name} {choice.dest}" for choice in action._choices_actions if not choice.help
                ]
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


CONFIG_COMMANDS = [
    ["run"],
    ["doctor"],
    ["serve"],
    ["classifiers", "serve"],
    ["envoy", "render"],
    ["config", "check"],
    ["policy", "lint", "p.yaml"],
    ["usage", "--all-tenants", "--period", "2026-11"],
    ["audit", "verify", "--tenant", "t"],
    ["audit", "prune"],
]


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("flag", ["-c", "--config"])
def test_every_command_that_reads_a_config_takes_dash_c(command: list[str], flag: str) -> None:
    args = build_parser().parse_args([*command, flag, "x.yaml"])
    assert args.config == "x.yaml"


@pytest.fixture
def starter_dir(tmp_path: Path) -> Path:
    done = checkstream("init", str(tmp_path / "new"))
    assert done.returncode == 0, done.stderr
    return tmp_path / "new"


def test_config_check_takes_the_file_positionally_or_with_dash_c(starter_dir: Path) -> None:
    config = str(starter_dir / "checkstream.yaml")
    for args in (["config", "check", config], ["config", "check", "-c", config]):
        done = checkstream(*args)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"{config}: OK (1 tenant, 1 policy file)\n"
    # Without either: ./checkstream.yaml.
    done = checkstream("config", "check", cwd=starter_dir)
    assert done.stdout == "./checkstream.yaml: OK (1 tenant, 1 policy file)\n"


def test_config_check_refuses_two_different_files(
    starter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(starter_dir / "checkstream.yaml")
    assert main(["config", "check", config, "-c", "other.yaml"]) == 2
    assert "give the config once" in capsys.readouterr().err


def test_init_writes_a_commented_starter_that_passes_config_check(starter_dir: Path) -> None:
    config_path = starter_dir / "checkstream.yaml"
    policy_path = starter_dir / "policies" / "default.yaml"
    text = config_path.read_text()
    # The starter as shipped, with the SHA-256 of the key init printed (never the key).
    assert re.fullmatch(re.escape(STARTER_CONFIG).replace(r"\$DIGEST", "[0-9a-f]{64}"), text)
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 5
    assert "#" in policy_path.read_text()
    # What the starter promises: one tenant on an OpenAI-compatible backend, a PII redact
    # rule, a keyword rule, usage on.
    loaded = load_config(config_path, require_secrets=False)
    (tenant_id,) = loaded.model.tenants.configs
    tenant = loaded.model.tenants.configs[tenant_id]
    assert tenant.streaming_format == "openai"
    assert tenant.auth is not None
    assert tenant.auth.token_env == "OPENAI_API_KEY"
    assert loaded.model.usage.enabled
    rules = {(r.trigger.classifier, r.action) for r in loaded.policies[tenant_id].model.policies}
    keyword = [n for n, c in loaded.model.classifiers.items() if c.type == "keyword"]
    assert ("pii_detector", "redact") in rules
    assert (keyword[0], "block") in rules
    # config check passes; the unset key is only a warning there.
    done = checkstream("config", "check", "-c", str(config_path))
    assert done.returncode == 0, done.stderr
    assert "OPENAI_API_KEY is not set" in done.stderr


def test_init_never_overwrites_without_force(starter_dir: Path) -> None:
    config_path = starter_dir / "checkstream.yaml"
    config_path.write_text("# mine\n")
    done = checkstream("init", str(starter_dir))
    assert done.returncode == 1
    assert "already exists" in done.stderr
    assert "--force" in done.stderr
    assert config_path.read_text() == "# mine\n"
    done = checkstream("init", "--force", str(starter_dir))
    assert done.returncode == 0
    key = done.stdout.split("stored): ")[1].split()[0]
    assert key.startswith("sk-cs-") and key not in config_path.read_text()
    assert digest_of(key) in config_path.read_text()


def test_init_defaults_to_the_working_directory(tmp_path: Path) -> None:
    done = checkstream("init", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "checkstream.yaml").is_file()
    assert (tmp_path / "policies" / "default.yaml").is_file()
    assert "checkstream run -c" in done.stdout


def test_run_without_a_config_points_to_demo_and_init(tmp_path: Path) -> None:
    done = checkstream("run", cwd=tmp_path)
    assert done.returncode == 1
    assert "./checkstream.yaml: file not found" in done.stderr
    assert "checkstream run --demo" in done.stderr
    assert "checkstream init" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_with_a_missing_file_says_the_same(tmp_path: Path) -> None:
    done = checkstream("run", "-c", "nowhere.yaml", cwd=tmp_path)
    assert done.returncode == 1
    assert "nowhere.yaml: file not found" in done.stderr
    assert "--demo" in done.stderr


def test_each_demo_run_gets_its_own_state_directory() -> None:
    first, second = new_demo_state(), new_demo_state(9123)
    try:
        assert first.parent != second.parent
        assert first.read_text() == demo_config_path().read_text()
        ledger = resolve_usage_path(load_config(first))
        assert ledger.parent == first.parent
        assert ledger != resolve_usage_path(load_config(second))
        # --demo-port moves the tenants' backend with the demo upstream.
        backends = {t.backend_url for t in load_config(second).model.tenants.configs.values()}
        assert backends == {"http://127.0.0.1:9123/v1", "http://127.0.0.1:9123"}
    finally:
        for path in (first, second):
            path.unlink()
            path.parent.rmdir()
