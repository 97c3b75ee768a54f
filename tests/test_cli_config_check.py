"""``checkstream config check`` and ``checkstream envoy render`` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from checkstream.cli.main import main

# Runs the real `checkstream` program (or its process pools) as a user would: the e2e tier.
pytestmark = pytest.mark.e2e

GOOD = """\
tenants:
  default_tenant: acme
  enabled: true
  configs:
    acme:
      backend_url: "https://api.openai.com/v1"
      policy_path: policy.yaml
      classifiers: [pii_detector]
      auth: {type: bearer, token_env: CS_CLI_TEST_KEY}
      allow_unauthenticated: true
      api_keys: # sk-cs-acme, hashed
        - name: app
          sha256: bbfc5e8679b22ff4e686263f965d5a2c679079bd4b7c01875bf50565065417a4
    beta:
      backend_url: "http://127.0.0.1:9001"
      streaming_format: anthropic
"""

POLICY = """\
version: "1.0"
name: p
policies:
  - name: r
    trigger: {classifier: pii_detector, threshold: 0.5}
    action: block
"""

UNKNOWN_CLASSIFIER_POLICY = """\
version: "1.0"
name: p
policies:
  - name: r
    trigger: {classifier: toxicty}
    action: block
"""

BAD = """\
tenants:
  configs:
    acme:
      backend_url: "https://api.openai.com/v1"
      backend_timeout_ms: fast
"""


@pytest.fixture(autouse=True)
def _no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CS_CLI_TEST_KEY", raising=False)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    (tmp_path / "policy.yaml").write_text(POLICY)
    path = tmp_path / "checkstream.yaml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    return path


def test_config_check_ok(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(good)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{good}: OK (2 tenants, 1 policy file)\n"
    # The managed key's variable is unset: a warning, not a failure, for a check.
    assert err == (
        f"warning: {good}:9: tenants.configs.acme.auth.token_env: "
        "environment variable CS_CLI_TEST_KEY is not set\n"
    )


def test_config_check_ok_with_secret_has_no_warning_and_no_secret(
    good: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CS_CLI_TEST_KEY", "sk-live-DO-NOT-PRINT")
    assert main(["config", "check", str(good)]) == 0
    out, err = capsys.readouterr()
    assert "OK" in out
    assert err == ""
    assert "DO-NOT-PRINT" not in out + err


def test_config_check_bad(bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{bad}:5: tenants.configs.acme.backend_timeout_ms: " in err
    assert "valid integer" in err
    assert "Traceback" not in err


def test_config_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.yaml"
    assert main(["config", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert f"{path}: file not found" in err
    assert "Traceback" not in out + err


def test_config_check_bad_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("tenants:\n  configs: {a: [\n")
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3: tenants.configs.a: invalid YAML" in err
    assert "Traceback" not in err


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CS_CLI_TEST_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "checkstream", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_config_check_as_a_process(good: Path, bad: Path) -> None:
    ok = _run("config", "check", str(good))
    assert ok.returncode == 0, ok.stderr
    assert f"{good}: OK" in ok.stdout
    failed = _run("config", "check", str(bad))
    assert failed.returncode == 1
    assert f"{bad}:5: tenants.configs.acme.backend_timeout_ms: " in failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr


# -- envoy render ------------------------------------------------------------------------------

RENDER = """\
tenants:
  configs:
    acme:
      backend_url: "https://api.openai.com/v1"
      backend_timeout_ms: 45000
      auth: {type: bearer, token_env: CS_CLI_TEST_KEY}
      allow_unauthenticated: true
    globex:
      backend_url: "https://api.openai.com"
      auth_passthrough: true
    local:
      backend_url: "http://127.0.0.1:9001/v1"
      streaming_format: anthropic
"""


def _render(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["envoy", "render", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(out)
    assert isinstance(data, dict)
    return data


def _routes(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes: list[dict[str, Any]] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def test_envoy_render_clusters_and_routes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(RENDER)
    bootstrap = _render(path, capsys)
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    assert sorted(clusters) == [
        "backend_http_127_0_0_1_9001",
        "backend_https_api_openai_com_443",
        "checkstream_admin",
        "checkstream_extproc",
    ]
    routes = {r["name"]: r for r in _routes(bootstrap)}
    assert sorted(routes) == [
        "admin",
        "tenant:acme",
        "tenant:globex",
        "tenant:local",
        "unrouted",
    ]
    assert routes["admin"]["match"]["headers"] == [
        {"name": "x-checkstream-route", "string_match": {"exact": "_admin"}}
    ]
    assert routes["admin"]["route"]["cluster"] == "checkstream_admin"
    for tenant in ("acme", "globex", "local"):
        match = routes[f"tenant:{tenant}"]["match"]
        assert match["headers"] == [
            {"name": "x-checkstream-route", "string_match": {"exact": tenant}}
        ]
    openai = "backend_https_api_openai_com_443"
    assert routes["tenant:acme"]["route"]["cluster"] == openai
    assert routes["tenant:globex"]["route"]["cluster"] == openai
    assert routes["tenant:local"]["route"]["cluster"] == "backend_http_127_0_0_1_9001"
    assert routes["tenant:acme"]["route"]["host_rewrite_literal"] == "api.openai.com"
    assert routes["tenant:local"]["route"]["host_rewrite_literal"] == "127.0.0.1:9001"
    assert routes["tenant:acme"]["route"]["idle_timeout"] == "45s"
    # The catch-all comes last, so no request reaches a backend without a tenant.
    assert _routes(bootstrap)[-1]["name"] == "unrouted"
    assert _routes(bootstrap)[-1]["direct_response"]["status"] == 503


def test_envoy_render_tls_for_https_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(RENDER)
    clusters = {c["name"]: c for c in _render(path, capsys)["static_resources"]["clusters"]}
    tls = clusters["backend_https_api_openai_com_443"]["transport_socket"]
    assert tls["name"] == "envoy.transport_sockets.tls"
    assert tls["typed_config"]["sni"] == "api.openai.com"
    sans = tls["typed_config"]["common_tls_context"]["validation_context"][
        "match_typed_subject_alt_names"
    ]
    assert sans == [{"san_type": "DNS", "matcher": {"exact": "api.openai.com"}}]
    assert clusters["backend_https_api_openai_com_443"]["type"] == "STRICT_DNS"
    plain = clusters["backend_http_127_0_0_1_9001"]
    assert "transport_socket" not in plain
    assert plain["type"] == "STATIC"
    endpoint = plain["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9001}


def test_envoy_render_similar_hosts_get_their_own_clusters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(
        "tenants:\n  configs:\n"
        "    a: {backend_url: 'http://my-host:8000'}\n"
        "    b: {backend_url: 'http://my.host:8000'}\n"
    )
    bootstrap = _render(path, capsys)
    routes = {r["name"]: r for r in _routes(bootstrap)}
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    for tenant, host in (("a", "my-host"), ("b", "my.host")):
        cluster = clusters[routes[f"tenant:{tenant}"]["route"]["cluster"]]
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"]["socket_address"]["address"] == host


def test_envoy_render_extproc_endpoints_per_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text("server: {extproc_port: 6000, extproc_workers: 3}\n" + RENDER)
    clusters = {c["name"]: c for c in _render(path, capsys)["static_resources"]["clusters"]}
    endpoints = clusters["checkstream_extproc"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]
    assert ports == [6000, 6001, 6002]


def test_envoy_render_bad_config(bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envoy", "render", "-c", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{bad}:5: tenants.configs.acme.backend_timeout_ms: " in err


def test_config_check_reports_rule_on_unknown_classifier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "policy.yaml").write_text(UNKNOWN_CLASSIFIER_POLICY)
    path = tmp_path / "checkstream.yaml"
    path.write_text(GOOD)
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err
    expected = "policy.yaml:5: policies[0].trigger.classifier: unknown classifier 'toxicty'"
    assert f"{tmp_path}/{expected}" in err


def test_config_check_reports_rule_on_classifier_not_enabled_for_tenant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    path = tmp_path / "checkstream.yaml"
    path.write_text(GOOD.replace("      classifiers: [pii_detector]\n", ""))
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert (
        "policy.yaml:5: policies[0].trigger.classifier: classifier 'pii_detector' is not enabled"
        in err
    )
    assert "tenant 'acme'" in err


def test_policy_lint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good_policy = tmp_path / "good.yaml"
    good_policy.write_text(POLICY)
    assert main(["policy", "lint", str(good_policy)]) == 0
    assert capsys.readouterr().out == f"{good_policy}: OK\n"
    bad_policies = {
        "unknown.yaml": (
            UNKNOWN_CLASSIFIER_POLICY,
            ":5: policies[0].trigger.classifier: unknown classifier 'toxicty'",
        ),
        "threshold.yaml": (POLICY.replace("0.5", "1.5"), ":5: policies[0].trigger.threshold:"),
        "action.yaml": (
            POLICY.replace("action: block", "action: explode"),
            ":6: policies[0].action:",
        ),
        "duplicate.yaml": (
            POLICY + "  - name: r\n    trigger: {classifier: pii_detector}\n    action: log\n",
            ":7: policies[1].name: duplicate rule name 'r'",
        ),
        "syntax.yaml": (
            "version: '1.0'\npolicies: [\n  {name: x\n",
            ":4: policies[0]: invalid YAML:",
        ),
    }
    paths = []
    for name, (text, _) in bad_policies.items():
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    assert main(["policy", "lint", str(good_policy), *paths]) == 1
    captured = capsys.readouterr()
    for name, (_, expected) in bad_policies.items():
        assert f"{tmp_path / name}{expected}" in captured.err, captured.err
    assert "Traceback" not in captured.err


def test_policy_lint_accepts_config_instances(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY.replace("pii_detector", "acme_banned"))
    assert main(["policy", "lint", str(policy)]) == 1
    config = tmp_path / "checkstream.yaml"
    config.write_text("classifiers:\n  acme_banned: {type: keyword, terms: [falcon]}\n")
    assert main(["policy", "lint", "-c", str(config), str(policy)]) == 0
