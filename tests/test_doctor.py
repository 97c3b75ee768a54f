"""``checkstream doctor``: every check against real parts (the Envoy binary, a real
redis-server and PostgreSQL, the demo upstream and a recording backend, real sockets), read
from the command's own output."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from checkstream.cli.doctor import check_postgres
from checkstream.cli.main import main
from tests.postgres_server import postgres_server, postgres_url
from tests.redis_server import RedisServer, redis_server
from tests.support import (
    DemoUpstreamThread,
    RecordingUpstream,
    gateway_ports,
    refusing_port,
    write_config,
    write_policy,
)

__all__ = ["postgres_server", "postgres_url", "redis_server"]  # fixtures used by name
pytestmark = pytest.mark.e2e

SECRET = "sk-doctor-secret-value"


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoUpstreamThread]:
    up = DemoUpstreamThread().start(chunk_delay_ms=0)
    yield up
    up.stop()


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingUpstream]:
    up = RecordingUpstream("doctor").start()
    yield up
    up.stop()


def _config(tmp_path: Path, demo: DemoUpstreamThread, **extra: Any) -> dict[str, Any]:
    policy = write_policy(tmp_path, "policy.yaml", [("no_falcon", "falcon", "block")])
    return {
        # The tests' client reaches the managed tenant by header: from this machine only.
        "server": {"host": "127.0.0.1", **gateway_ports(), "trusted_networks": ["127.0.0.0/8"]},
        "classifiers": {"falcon": {"type": "keyword", "terms": ["project falcon"]}},
        "tenants": {
            "configs": {
                "open": {
                    "backend_url": f"http://127.0.0.1:{demo.port}/v1",
                    "classifiers": ["falcon", "pii_detector"],
                    "policy_path": str(policy),
                },
                "claude": {
                    "backend_url": f"http://127.0.0.1:{demo.port}",
                    "streaming_format": "anthropic",
                },
            }
        },
        **extra,
    }


def doctor(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["doctor", "-c", str(path)])
    out, err = capsys.readouterr()
    assert err == ""
    assert SECRET not in out
    return code, out.splitlines()


def line(lines: list[str], start: str) -> str:
    found = [entry for entry in lines if entry.startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


def test_a_healthy_deployment_passes_every_check(
    tmp_path: Path,
    demo: DemoUpstreamThread,
    recorder: RecordingUpstream,
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOCTOR_KEY", SECRET)
    config = _config(tmp_path, demo, limits={"backend": "redis", "url": redis_server.url})
    config["tenants"]["configs"]["managed"] = {
        "backend_url": f"http://127.0.0.1:{recorder.port}/v1",
        "auth": {"type": "bearer", "token_env": "DOCTOR_KEY"},
    }
    code, lines = doctor(write_config(tmp_path, config), capsys)
    assert code == 0, lines
    assert lines[-1].startswith("doctor: ")
    assert lines[-1].endswith(", 0 warnings, 0 failed")
    assert all(entry.startswith("ok  ") for entry in lines[:-1]), lines
    assert "Envoy 1." in line(lines, "ok    envoy:")
    line(lines, "ok    envoy bootstrap:")
    assert "3 tenants, 1 policy file" in line(lines, "ok    config:")
    assert "DOCTOR_KEY is set" in line(lines, "ok    environment:")
    assert len([e for e in lines if e.startswith("ok    port:")]) == 4
    assert f"127.0.0.1:{redis_server.port}" in line(lines, "ok    redis:")
    assert f":{demo.port}/v1/models: 200" in line(lines, "ok    backend open:")
    assert f":{demo.port}/v1/models: 200" in line(lines, "ok    backend claude:")
    assert f":{recorder.port}/v1/models: 200" in line(lines, "ok    backend managed:")
    assert "2 loaded" in line(lines, "ok    classifiers:")
    # The managed key went to the backend, in the format it expects.
    models_calls = [r for r in recorder.received if r.path == "/v1/models"]
    assert models_calls[-1].headers["authorization"] == f"Bearer {SECRET}"


def test_each_failure_is_one_line_with_its_fix(
    tmp_path: Path,
    demo: DemoUpstreamThread,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MISSING_KEY", raising=False)
    with refusing_port() as down, refusing_port() as no_redis, socket.socket() as held:
        config = _config(
            tmp_path, demo, limits={"backend": "redis", "url": f"redis://127.0.0.1:{no_redis}/0"}
        )
        config["tenants"]["configs"]["gone"] = {
            "backend_url": f"http://127.0.0.1:{down}",
            "auth": {"type": "bearer", "token_env": "MISSING_KEY"},
        }
        held.bind(("127.0.0.1", config["server"]["admin_port"]))
        held.listen()
        code, lines = doctor(write_config(tmp_path, config), capsys)
    assert code == 1
    failed = [entry for entry in lines if entry.startswith("FAIL")]
    assert all(" -> fix: " in entry for entry in failed), failed
    assert "MISSING_KEY is not set" in line(lines, "FAIL  environment:")
    assert "export MISSING_KEY=" in line(lines, "FAIL  environment:")
    admin = line(lines, "FAIL  port:")
    assert f":{config['server']['admin_port']} (server.admin_port)" in admin
    assert "change server.admin_port" in admin
    assert "does not answer PING" in line(lines, "FAIL  redis:")
    assert "cannot connect" in line(lines, "FAIL  backend gone:")
    line(lines, "ok    backend open:")
    assert lines[-1].endswith(f"{len(failed)} failed")


def test_a_backend_refusing_the_key_names_the_variable(
    tmp_path: Path,
    demo: DemoUpstreamThread,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOCTOR_KEY", SECRET)
    config = _config(tmp_path, demo)
    # The demo upstream answers with the status this header asks for: a 401, as a provider
    # refusing a key does.
    config["tenants"]["configs"]["open"]["headers"] = {"x-demo-status": "401"}
    config["tenants"]["configs"]["open"]["auth"] = {"type": "bearer", "token_env": "DOCTOR_KEY"}
    code, lines = doctor(write_config(tmp_path, config), capsys)
    assert code == 1
    refused = line(lines, "FAIL  backend open:")
    assert ": 401 " in refused
    assert "DOCTOR_KEY" in refused


def test_an_invalid_config_is_located_and_the_rest_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text("server:\n  port: -1\n")
    code, lines = doctor(path, capsys)
    assert code == 1
    assert f"{path}:2: server.port:" in line(lines, "FAIL  config:")
    line(lines, "skip  rest:")
    assert not any(entry.startswith(("ok    port", "ok    backend")) for entry in lines)


# --- PostgreSQL (usage.backend: postgres) ----------------------------------------------------

# Debian installs the server binaries off PATH, under the major version.
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
PG_BIN = PG_BINS[-1].parent if PG_BINS else Path("/nonexistent")


def test_postgres_reachable(postgres_url: str) -> None:
    started = time.monotonic()
    check = check_postgres(postgres_url)
    assert check.status == "ok", check
    assert postgres_url.rpartition("@")[2].split("/")[0] in check.detail
    assert "accepts a login" in check.detail
    assert time.monotonic() - started < 5


def test_postgres_unreachable_says_how_to_fix() -> None:
    with refusing_port() as port:
        check = check_postgres(f"postgresql://u:{SECRET}@127.0.0.1:{port}/usage")
    assert check.status == "fail"
    assert "cannot connect" in check.detail
    assert "usage.url" in check.fix
    assert SECRET not in check.line()


def test_a_missing_config_points_to_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["doctor"]) == 1
    lines = capsys.readouterr().out.splitlines()
    missing = line(lines, "FAIL  config:")
    assert "./checkstream.yaml: file not found" in missing
    assert "checkstream init" in missing
