"""``replicated: true``, the usage backend keys and replica names: refused at ``config check``
with file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkstream.cli.main import main
from checkstream.config.model import load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.ops.replica import ReplicaNameError, replica_name

FLEET = """\
replicated: true
limits: {backend: redis, url: "redis://127.0.0.1:6379/0"}
usage: {backend: postgres, url_env: FLEET_TEST_DSN}
tenants:
  configs:
    acme:
      backend_url: "http://127.0.0.1:9001"
      audit: {path: /mnt/shared/audit/acme, shared: true}
    beta:
      backend_url: "http://127.0.0.1:9002"
"""

SINGLE_MACHINE = """\
replicated: true
tenants:
  configs:
    acme:
      backend_url: "http://127.0.0.1:9001"
      audit: {path: ./audit/acme}
    beta:
      backend_url: "http://127.0.0.1:9002"
      audit: {enabled: false}
"""


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHECKSTREAM_REPLICA", raising=False)
    monkeypatch.setenv("FLEET_TEST_DSN", "postgresql://u@127.0.0.1:1/db")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "checkstream.yaml"
    path.write_text(text)
    return path


def test_a_fleet_config_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(_write(tmp_path, FLEET))]) == 0
    assert "OK (2 tenants" in capsys.readouterr().out


def test_replicated_refuses_each_per_replica_store_at_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, SINGLE_MACHINE)
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err
    # Keys left to their defaults are located at `replicated` (line 1).
    assert f"{path}:1: limits.backend: replicated: in-memory limits are per replica" in err
    assert f"{path}:1: usage.backend: replicated: a SQLite ledger is per replica" in err
    assert (
        f"{path}:6: tenants.configs.acme.audit.shared: replicated: the audit path must be a "
        "volume every replica writes" in err
    )
    assert "tenants.configs.beta" not in err  # audit disabled: nothing to share


def test_replicated_names_the_line_of_a_key_that_is_set(tmp_path: Path) -> None:
    text = FLEET.replace("backend: redis, url", "backend: memory, url").replace(
        "usage: {backend: postgres, url_env: FLEET_TEST_DSN}", "usage:\n  backend: sqlite"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    found = {(p.path, p.line) for p in caught.value.problems}
    assert found == {("limits.backend", 2), ("usage.backend", 4)}


def test_without_replicated_a_single_machine_config_is_fine(tmp_path: Path) -> None:
    load_config(_write(tmp_path, SINGLE_MACHINE.replace("replicated: true\n", "")))


def test_server_replica_in_a_fleet_config_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "server: {replica: pod-a}\n" + FLEET)
    assert main(["config", "check", str(path)]) == 0
    assert "server.replica: replicated: every replica reading this file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("usage", "key", "message"),
    [
        ("{backend: postgres}", "usage.backend", "exactly one of usage.url and usage.url_env"),
        (
            "{backend: postgres, url: 'postgresql://h/db', url_env: X}",
            "usage.backend",
            "exactly one of",
        ),
        ("{backend: postgres, url: 'mysql://h/db'}", "usage.url", "expected a postgresql://"),
        ("{url: 'postgresql://h/db'}", "usage.url", "is for backend postgres"),
        ("{backend: mongo}", "usage.backend", "'sqlite' or 'postgres'"),
        ("{backend: postgres, url_env: FLEET_UNSET_DSN}", "usage.url_env", "is not set"),
    ],
)
def test_usage_backend_keys_are_checked(tmp_path: Path, usage: str, key: str, message: str) -> None:
    text = f"usage: {usage}\ntenants:\n  configs:\n    acme: {{backend_url: 'http://h:1'}}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    (problem,) = caught.value.problems
    assert (problem.path, problem.line) == (key, 1)
    assert message in problem.message


def test_an_unset_url_env_is_only_a_warning_for_config_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = FLEET.replace("FLEET_TEST_DSN", "FLEET_UNSET_DSN")
    assert main(["config", "check", str(_write(tmp_path, text))]) == 0
    assert "usage.url_env: environment variable FLEET_UNSET_DSN is not set" in (
        capsys.readouterr().err
    )


def test_a_password_in_usage_url_is_warned_about_and_not_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = FLEET.replace("url_env: FLEET_TEST_DSN", "url: 'postgresql://u:hunter2@db/usage'")
    assert main(["config", "check", str(_write(tmp_path, text))]) == 0
    captured = capsys.readouterr()
    assert "usage.url: holds a password: put the URL in an environment variable" in captured.err
    assert "hunter2" not in captured.err + captured.out


# --- replica names ---------------------------------------------------------------------


def test_replica_name_precedence() -> None:
    env = {"POD_NAME": "checkstream-7d9f-abcde", "CHECKSTREAM_REPLICA": "r1"}
    assert replica_name("from-config", env) == "r1"
    del env["CHECKSTREAM_REPLICA"]
    assert replica_name("from-config", env) == "from-config"
    assert replica_name(None, env) == "checkstream-7d9f-abcde"
    assert replica_name(None, {}) != ""  # the host name


def test_pod_and_host_names_are_made_file_name_safe() -> None:
    assert replica_name(None, {"POD_NAME": "pod a/../b"}) == "pod-a-..-b"
    assert replica_name(None, {"POD_NAME": "///"}) == "replica"


def test_a_bad_replica_name_from_the_environment_is_refused_with_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ReplicaNameError):
        replica_name(None, {"CHECKSTREAM_REPLICA": "../etc"})
    monkeypatch.setenv("CHECKSTREAM_REPLICA", "../etc")
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, FLEET))
    (problem,) = caught.value.problems
    assert problem.path == "server.replica"
    assert "CHECKSTREAM_REPLICA='../etc'" in problem.message


def test_a_bad_server_replica_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, "server: {replica: 'a b'}\n" + FLEET))
    assert caught.value.problems[0].path == "server.replica"
