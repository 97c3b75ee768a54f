"""``checkstream.config.model.load_config``: the full contract loads typed; every mistake is
located.

Each refusal is checked as ``file:line: key.path: message`` with the line computed from the
YAML text itself, so a wrong line number fails the test.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from checkstream.config.model import (
    LoadedConfig,
    load_config,
)
from checkstream.config.yamlsource import ConfigError

SECRET = "sk-upstream-SECRET-value-0042"

FULL_CONFIG = """\
server: {host: 0.0.0.0, port: 8080, admin_port: 9090, extproc_port: 50051, extproc_workers: 1,
  trusted_networks: [10.0.0.0/8]}
classifiers:
  acme_banned: {type: keyword, terms: ["project falcon", "internal only"]}
  fin_advice:  {type: topic, labels: {financial_advice: ["Which stocks should I buy?", "..."]}}
  remote_tox:  {type: remote, target: "10.0.0.7:50061", classifier: toxicity, timeout_ms: 200}
limits: {backend: memory}
usage: {path: "./checkstream-usage.db"}
pricing:
  gpt-4o-mini: {input: 0.15, output: 0.60}
tenants:
  enabled: true
  resolution:
    - header: "X-Tenant-ID"
    - path_prefix: "/tenant/"
    - api_key_mapping: true
  default_tenant: "default"
  api_key_map: {"sk-acme-prod": "acme-corp"}
  configs:
    default:
      backend_url: "http://127.0.0.1:9001/"
      auth_passthrough: true
      thresholds: {safety: 1}
    acme-corp:
      backend_url: "https://api.openai.com/v1"
      backend_timeout_ms: 30000
      streaming_format: openai
      headers: {Anthropic-Version: "2024-01-01"}
      policy_path: "./policies/acme.yaml"
      thresholds: {safety: 0.9, chunk: 0.8}
      pipeline: {ingress: {classifiers: [prompt_injection]}, midstream: {classifiers: [toxicity]}}
      classifiers: [toxicity, pii_detector]
      models: [gpt-4o, gpt-4o-mini]
      rate_limit:
        {requests_per_minute: 1000, tokens_per_minute: 100000, max_concurrent_requests: 50}
      budget: {monthly_usd: 2000}
      auth: {type: bearer, token_env: ACME_OPENAI_KEY}
      audit: {enabled: true, path: "./audit/acme", retention_days: 90}
      fail_mode: closed
      suspended: false
pipeline:
  ingress: {enabled: true, classifiers: [prompt_injection]}
  midstream: {enabled: true, classifiers: [toxicity], window_tokens: 128, holdback_tokens: 16}
"""

POLICY = """\
version: "1.0"
name: "finance-policy"
policies:
  - name: block_investment_advice
    trigger: {classifier: financial_advice, threshold: 0.7}
    action: stop             # log | redact | block | stop
    regulation: "FCA COBS 9A.2.1R"
  - name: log_banned
    trigger: {classifier: acme_banned}
    action: log
"""

# A tenant block that is valid on its own; error cases add to or alter it.
BASE = """\
tenants:
  configs:
    acme:
      backend_url: "https://api.openai.com/v1"
"""


def write(directory: Path, text: str, name: str = "checkstream.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of ``text`` containing ``needle``."""
    for number, line in enumerate(textwrap.dedent(text).splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


def refused(path: Path, *, require_secrets: bool = True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, require_secrets=require_secrets)
    return info.value


def assert_located(error: ConfigError, file: Path, line: int, key_path: str, message: str) -> None:
    """``error`` has a line ``file:line: key_path: ...message...``."""
    prefix = f"{file}:{line}: {key_path}: "
    matching = [p for p in str(error).splitlines() if p.startswith(prefix)]
    assert matching, f"no problem starting with {prefix!r} in:\n{error}"
    assert any(message in p for p in matching), f"{message!r} not in {matching}"


@pytest.fixture
def full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LoadedConfig:
    monkeypatch.setenv("ACME_OPENAI_KEY", SECRET)
    write(tmp_path, POLICY, "policies/acme.yaml")
    return load_config(write(tmp_path, FULL_CONFIG))


# -- the full contract --------------------------------------------------------------------


def test_full_config_server_and_globals_are_typed(full: LoadedConfig) -> None:
    model = full.model
    assert model.server.host == "0.0.0.0"
    assert (model.server.port, model.server.admin_port) == (8080, 9090)
    assert (model.server.extproc_port, model.server.extproc_workers) == (50051, 1)
    assert all(
        type(v) is int
        for v in (model.server.port, model.server.admin_port, model.server.extproc_port)
    )
    assert model.limits.backend == "memory" and model.limits.url is None
    assert model.usage.path == "./checkstream-usage.db"
    price = model.pricing["gpt-4o-mini"]
    assert (price.input, price.output) == (0.15, 0.60)
    assert model.pipeline.ingress.enabled is True
    assert model.pipeline.ingress.classifiers == ["prompt_injection"]
    midstream = model.pipeline.midstream
    assert midstream.classifiers == ["toxicity"]
    assert (midstream.window_tokens, midstream.holdback_tokens) == (128, 16)


def test_full_config_classifier_instances_are_typed(full: LoadedConfig) -> None:
    classifiers = full.model.classifiers
    banned = classifiers["acme_banned"]
    assert banned.type == "keyword"
    assert banned.settings == {"terms": ["project falcon", "internal only"]}
    topic = classifiers["fin_advice"]
    assert topic.type == "topic"
    assert topic.settings == {"labels": {"financial_advice": ["Which stocks should I buy?", "..."]}}
    remote = classifiers["remote_tox"]
    assert remote.type == "remote"
    assert remote.settings == {
        "target": "10.0.0.7:50061",
        "classifier": "toxicity",
        "timeout_ms": 200,
    }


def test_full_config_tenancy(full: LoadedConfig) -> None:
    tenants = full.model.tenants
    assert tenants.enabled is True
    assert [step.method for step in tenants.resolution] == [
        "header",
        "path_prefix",
        "api_key_mapping",
    ]
    assert tenants.resolution[0].header == "X-Tenant-ID"
    assert tenants.resolution[1].path_prefix == "/tenant/"
    assert tenants.default_tenant == "default"
    assert tenants.api_key_map == {"sk-acme-prod": "acme-corp"}
    assert sorted(tenants.configs) == ["acme-corp", "default"]


def test_full_config_tenant_values_are_typed(full: LoadedConfig) -> None:
    acme = full.model.tenants.configs["acme-corp"]
    assert acme.backend_url == "https://api.openai.com/v1"
    assert acme.backend_timeout_ms == 30000 and type(acme.backend_timeout_ms) is int
    assert acme.streaming_format == "openai"
    assert acme.headers == {"anthropic-version": "2024-01-01"}  # names lower-cased
    assert acme.policy_path == "./policies/acme.yaml"
    assert (acme.thresholds.safety, acme.thresholds.chunk) == (0.9, 0.8)
    assert acme.pipeline.ingress.classifiers == ["prompt_injection"]
    assert acme.pipeline.midstream.classifiers == ["toxicity"]
    assert acme.classifiers == ["toxicity", "pii_detector"]
    assert acme.models == ["gpt-4o", "gpt-4o-mini"]
    limits = acme.rate_limit
    assert (limits.requests_per_minute, limits.tokens_per_minute) == (1000, 100000)
    assert limits.max_concurrent_requests == 50
    assert acme.budget is not None
    assert acme.budget.monthly_usd == 2000.0 and type(acme.budget.monthly_usd) is float
    assert acme.auth is not None
    assert (acme.auth.type, acme.auth.token_env) == ("bearer", "ACME_OPENAI_KEY")
    assert acme.auth_passthrough is False
    assert (acme.audit.enabled, acme.audit.path, acme.audit.retention_days) == (
        True,
        "./audit/acme",
        90,
    )
    assert (acme.fail_mode, acme.suspended) == ("closed", False)


def test_full_config_defaults_and_coercions(full: LoadedConfig) -> None:
    default = full.model.tenants.configs["default"]
    assert default.backend_url == "http://127.0.0.1:9001"  # trailing slash dropped
    assert default.auth_passthrough is True and default.auth is None
    assert default.thresholds.safety == 1.0 and type(default.thresholds.safety) is float
    assert default.thresholds.chunk is None
    assert default.backend_timeout_ms == 30000
    assert default.models is None
    assert default.fail_mode == "closed"


def test_full_config_policy_secret_and_plaintext_key_warning(
    full: LoadedConfig, tmp_path: Path
) -> None:
    assert full.path == tmp_path / "checkstream.yaml"
    assert list(full.policies) == ["acme-corp"]
    policy = full.policies["acme-corp"].model
    assert (policy.version, policy.name) == ("1.0", "finance-policy")
    rule = policy.policies[0]
    assert (rule.name, rule.action, rule.regulation) == (
        "block_investment_advice",
        "stop",
        "FCA COBS 9A.2.1R",
    )
    assert (rule.trigger.classifier, rule.trigger.threshold) == ("financial_advice", 0.7)
    assert policy.policies[1].trigger.threshold is None
    assert full.secrets == {"acme-corp": SECRET}
    line = line_of(FULL_CONFIG, "api_key_map:")
    assert full.warnings == (
        f"{full.path}:{line}: tenants.api_key_map: holds plaintext keys: move them to the "
        "tenants' api_keys as SHA-256 digests (`checkstream keys new`)",
    )


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, ""))
    assert loaded.model.server.port == 8080
    assert loaded.model.tenants.configs == {}
    assert loaded.policies == {} and loaded.secrets == {}


# -- refusals -------------------------------------------------------------------------------


def test_unknown_key_with_did_you_mean(tmp_path: Path) -> None:
    text = BASE + '      backend_ulr: "http://x"\n'
    path = write(tmp_path, text)
    error = refused(path)
    assert_located(
        error,
        path,
        line_of(text, "backend_ulr"),
        "tenants.configs.acme.backend_ulr",
        "unknown key (did you mean 'backend_url'?)",
    )
    assert len(error.problems) == 1


def test_unknown_top_level_key(tmp_path: Path) -> None:
    text = BASE + "pipline: {}\n"
    path = write(tmp_path, text)
    assert_located(
        refused(path), path, line_of(text, "pipline"), "pipline", "did you mean 'pipeline'?"
    )


def test_wrong_type(tmp_path: Path) -> None:
    text = BASE + '      backend_timeout_ms: "fast"\n'
    path = write(tmp_path, text)
    assert_located(
        refused(path),
        path,
        line_of(text, "backend_timeout_ms"),
        "tenants.configs.acme.backend_timeout_ms",
        "valid integer",
    )


def test_log_format_is_json_or_text(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "server: {log_format: text}\n")).model.server.log_format == (
        "text"
    )
    text = "server:\n  log_format: xml\n"
    path = write(tmp_path, text)
    assert_located(
        refused(path), path, line_of(text, "log_format"), "server.log_format", "'json' or 'text'"
    )


def test_rate_limit_out_of_range(tmp_path: Path) -> None:
    text = BASE + "      rate_limit: {requests_per_minute: 0}\n"
    path = write(tmp_path, text)
    assert_located(
        refused(path),
        path,
        line_of(text, "rate_limit"),
        "tenants.configs.acme.rate_limit.requests_per_minute",
        "greater than 0",
    )


def test_threshold_out_of_range(tmp_path: Path) -> None:
    text = BASE + "      thresholds:\n        chunk: 0.5\n        safety: 1.5\n"
    path = write(tmp_path, text)
    error = refused(path)
    assert_located(
        error,
        path,
        line_of(text, "safety: 1.5"),
        "tenants.configs.acme.thresholds.safety",
        "less than or equal to 1",
    )
    assert len(error.problems) == 1


def test_missing_policy_file_points_at_policy_path(tmp_path: Path) -> None:
    text = BASE + "      policy_path: policies/nope.yaml\n      models: [a]\n"
    path = write(tmp_path, text)
    error = refused(path)
    assert_located(
        error,
        path,
        line_of(text, "policy_path"),
        "tenants.configs.acme.policy_path",
        "file not found",
    )
    assert str(tmp_path / "policies" / "nope.yaml") in str(error)


def test_api_key_map_unknown_tenant_never_prints_the_key(tmp_path: Path) -> None:
    key = "sk-very-secret-4242"
    text = BASE.replace("tenants:\n", f'tenants:\n  api_key_map:\n    "{key}": ghost\n')
    path = write(tmp_path, text)
    error = refused(path)
    assert_located(
        error,
        path,
        line_of(text, key),
        "tenants.api_key_map[entry 1]",
        "tenant 'ghost' has no entry in tenants.configs",
    )
    assert key not in str(error)
    assert all(key not in p.path and key not in p.message for p in error.problems)


def test_api_key_map_bad_value_type_never_prints_the_key(tmp_path: Path) -> None:
    key = "sk-another-secret-777"
    text = BASE.replace("tenants:\n", f'tenants:\n  api_key_map:\n    "{key}": [a, b]\n')
    path = write(tmp_path, text)
    error = refused(path)
    assert_located(error, path, line_of(text, key), "tenants.api_key_map.<key>", "valid string")
    assert key not in str(error)


def test_default_tenant_unknown(tmp_path: Path) -> None:
    text = BASE + "  default_tenant: nobody\n"
    path = write(tmp_path, text)
    assert_located(
        refused(path),
        path,
        line_of(text, "default_tenant"),
        "tenants.default_tenant",
        "tenant 'nobody' has no entry in tenants.configs",
    )


def test_tenancy_disabled_needs_default(tmp_path: Path) -> None:
    text = BASE + "  enabled: false\n"
    path = write(tmp_path, text)
    assert_located(
        refused(path), path, line_of(text, "enabled"), "tenants.enabled", "set default_tenant"
    )


def test_yaml_syntax_error_reports_line(tmp_path: Path) -> None:
    text = "server:\n  port: 8080\n  host: [a, b\ntenants: {}\n"
    path = write(tmp_path, text)
    error = refused(path)
    assert len(error.problems) == 1
    problem = error.problems[0]
    assert problem.line == 4
    assert str(error).startswith(f"{path}:4: server.host: invalid YAML: ")  # the open list


def test_yaml_bad_indentation_reports_line(tmp_path: Path) -> None:
    text = "server:\n  port: 8080\n host: x\n"
    path = write(tmp_path, text)
    error = refused(path)
    assert str(error).startswith(f"{path}:3: invalid YAML: ")


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    assert str(refused(path)) == f"{path}:1: expected a mapping at the top level"


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert str(refused(path)) == f"{path}: file not found"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://files.example.com/v1", "expected an http:// or https:// URL with a host"),
        ("api.openai.com/v1", "expected an http:// or https:// URL with a host"),
        ("http:///v1", "expected an http:// or https:// URL with a host"),
        ("https://api.example.com/v1?x=1", "must not have a query or fragment"),
        ("http://h:99999", "invalid port"),
    ],
)
def test_backend_url_must_be_http(tmp_path: Path, url: str, message: str) -> None:
    text = BASE.replace("https://api.openai.com/v1", url)
    path = write(tmp_path, text)
    assert_located(
        refused(path),
        path,
        line_of(text, "backend_url"),
        "tenants.configs.acme.backend_url",
        message,
    )


def test_backend_url_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    text = BASE.replace("https://", "https://svc:hunter2-pw@")
    path = write(tmp_path, text)
    error = refused(path)
    assert_located(
        error,
        path,
        line_of(text, "backend_url"),
        "tenants.configs.acme.backend_url",
        "must not carry credentials",
    )
    assert "hunter2" not in str(error)


MANAGED = """\
server: {trusted_networks: [10.0.0.0/8]}
tenants:
  configs:
    acme:
      backend_url: "https://api.openai.com/v1"
      auth: {type: bearer, token_env: CS_TEST_SET_KEY}
    beta:
      backend_url: "https://api.anthropic.com"
      streaming_format: anthropic
      auth:
        type: bearer
        token_env: CS_TEST_UNSET_KEY
"""


def test_managed_auth_unset_env_is_an_error_when_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CS_TEST_SET_KEY", SECRET)
    monkeypatch.delenv("CS_TEST_UNSET_KEY", raising=False)
    path = write(tmp_path, MANAGED)
    error = refused(path, require_secrets=True)
    assert_located(
        error,
        path,
        line_of(MANAGED, "CS_TEST_UNSET_KEY"),
        "tenants.configs.beta.auth.token_env",
        "environment variable CS_TEST_UNSET_KEY is not set",
    )
    assert len(error.problems) == 1
    assert SECRET not in str(error)


def test_managed_auth_unset_env_is_a_warning_for_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CS_TEST_SET_KEY", SECRET)
    monkeypatch.delenv("CS_TEST_UNSET_KEY", raising=False)
    path = write(tmp_path, MANAGED)
    loaded = load_config(path, require_secrets=False)
    line = line_of(MANAGED, "CS_TEST_UNSET_KEY")
    assert loaded.warnings == (
        f"{path}:{line}: tenants.configs.beta.auth.token_env: "
        "environment variable CS_TEST_UNSET_KEY is not set",
    )
    assert loaded.secrets == {"acme": SECRET}
    assert all(SECRET not in w for w in loaded.warnings)


def test_managed_auth_empty_env_counts_as_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CS_TEST_SET_KEY", "")
    monkeypatch.setenv("CS_TEST_UNSET_KEY", "x")
    path = write(tmp_path, MANAGED)
    error = refused(path)
    assert [p.path for p in error.problems] == ["tenants.configs.acme.auth.token_env"]


def test_auth_and_passthrough_exclude_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CS_TEST_SET_KEY", SECRET)
    text = (
        BASE
        + "      auth: {type: bearer, token_env: CS_TEST_SET_KEY}\n"
        + "      auth_passthrough: true\n"
    )
    path = write(tmp_path, text)
    error = refused(path)
    assert_located(
        error,
        path,
        line_of(text, "auth_passthrough"),
        "tenants.configs.acme.auth_passthrough",
        "exclude each other",
    )
    assert SECRET not in str(error)


WORKERS = """\
server:
  extproc_workers: 2
{limits}tenants:
  configs:
    acme:
      backend_url: "https://api.openai.com/v1"
{extra}"""


def test_workers_with_memory_limits_and_rate_limit_refused(tmp_path: Path) -> None:
    text = WORKERS.format(limits="", extra="      rate_limit: {requests_per_minute: 10}\n")
    path = write(tmp_path, text)
    assert_located(
        refused(path),
        path,
        line_of(text, "extproc_workers"),
        "server.extproc_workers",
        "in-memory limits are exact only with one worker",
    )


def test_workers_with_memory_limits_and_budget_refused(tmp_path: Path) -> None:
    text = WORKERS.format(limits="", extra="      budget: {monthly_usd: 5}\n")
    path = write(tmp_path, text)
    assert [p.path for p in refused(path).problems] == ["server.extproc_workers"]


@pytest.mark.parametrize(
    ("limits", "extra"),
    [
        ("", ""),  # nothing counted: nothing to get wrong
        (
            "limits: {backend: redis, url: 'redis://127.0.0.1:6379/0'}\n",
            "      rate_limit: {requests_per_minute: 10}\n",
        ),
    ],
)
def test_workers_accepted_when_counts_stay_exact(tmp_path: Path, limits: str, extra: str) -> None:
    loaded = load_config(write(tmp_path, WORKERS.format(limits=limits, extra=extra)))
    assert loaded.model.server.extproc_workers == 2


def test_redis_needs_url(tmp_path: Path) -> None:
    text = BASE + "limits: {backend: redis}\n"
    path = write(tmp_path, text)
    assert_located(
        refused(path), path, line_of(text, "limits"), "limits.backend", "needs limits.url"
    )


def test_port_clash_with_extra_worker(tmp_path: Path) -> None:
    text = "server: {admin_port: 50052, extproc_port: 50051, extproc_workers: 2}\n"
    path = write(tmp_path, text)
    assert_located(
        refused(path),
        path,
        1,
        "server.extproc_port",
        "port 50052 is also used by server.admin_port",
    )


def test_invalid_tenant_id(tmp_path: Path) -> None:
    text = BASE + '    "../evil":\n      backend_url: "http://x"\n'
    path = write(tmp_path, text)
    error = refused(path)
    assert_located(error, path, line_of(text, "../evil"), "tenants.configs.../evil", "invalid name")
    assert len(error.problems) == 1
    assert "[key]" not in str(error)


def test_resolution_step_with_two_methods(tmp_path: Path) -> None:
    text = (
        BASE
        + "  resolution:\n    - api_key_mapping: true\n    - header: X\n      path_prefix: /t/\n"
    )
    path = write(tmp_path, text)
    assert_located(
        refused(path),
        path,
        line_of(text, "- header: X"),
        "tenants.resolution[1]",
        "each step names exactly one of header, path_prefix, api_key_mapping",
    )


def test_resolution_method_twice(tmp_path: Path) -> None:
    text = BASE + "  resolution:\n    - header: X\n    - header: Y\n"
    path = write(tmp_path, text)
    assert_located(
        refused(path),
        path,
        line_of(text, "resolution"),
        "tenants.resolution",
        "each resolution method may appear once",
    )


def test_path_prefix_must_start_with_slash(tmp_path: Path) -> None:
    text = BASE + "  resolution:\n    - path_prefix: tenant/\n"
    path = write(tmp_path, text)
    assert_located(
        refused(path),
        path,
        line_of(text, "path_prefix"),
        "tenants.resolution[0].path_prefix",
        "must start with '/'",
    )


BAD_ACTION = """\
version: "1.0"
name: p
policies:
  - name: first
    trigger: {classifier: toxicity, threshold: 0.5}
    action: log
  - name: second
    trigger: {classifier: toxicity}
    action: explode
"""

DUPLICATE = """\
version: "1.0"
name: p
policies:
  - name: twice
    trigger: {classifier: toxicity}
    action: log
  - name: other
    trigger: {classifier: pii_detector}
    action: redact
  - name: twice
    trigger: {classifier: toxicity, threshold: 0.9}
    action: block
"""


@pytest.mark.parametrize(
    ("policy", "needle", "key_path", "message"),
    [
        (BAD_ACTION, "explode", "policies[1].action", "'log', 'redact', 'block' or 'stop'"),
        (DUPLICATE, "block", "policies[2].name", "duplicate rule name 'twice'"),
    ],
    ids=["unknown-action", "duplicate-name"],
)
def test_policy_file_errors_use_the_policy_file_location(
    tmp_path: Path, policy: str, needle: str, key_path: str, message: str
) -> None:
    policy_file = write(tmp_path, policy, "policies/acme.yaml")
    path = write(tmp_path, BASE + "      policy_path: ./policies/acme.yaml\n")
    error = refused(path)
    if needle == "block":  # the duplicate is reported on its own name line
        line = [i for i, s in enumerate(policy.splitlines(), 1) if "name: twice" in s][1]
    else:
        line = line_of(policy, needle)
    assert_located(error, policy_file, line, key_path, message)
    assert len(error.problems) == 1


def test_every_problem_is_reported_sorted_by_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CS_TEST_UNSET_KEY", raising=False)
    text = (
        "tenants:\n"
        "  default_tenant: nobody\n"
        "  configs:\n"
        "    acme:\n"
        '      backend_url: "https://api.openai.com/v1"\n'
        "      auth: {token_env: CS_TEST_UNSET_KEY}\n"
        "      auth_passthrough: true\n"
        "      allow_unauthenticated: true\n"
    )
    path = write(tmp_path, text)
    error = refused(path)
    assert [(p.line, p.path) for p in error.problems] == [
        (2, "tenants.default_tenant"),
        (6, "tenants.configs.acme.auth.token_env"),
        (7, "tenants.configs.acme.auth_passthrough"),
    ]


def test_redis_url_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "limits: {backend: redis, url_env: FLEET_REDIS_URL}\n"
    path = write(tmp_path, text)
    monkeypatch.setenv("FLEET_REDIS_URL", "redis://:pw@10.0.0.5:6379/0")
    assert load_config(path).model.limits.url == "redis://:pw@10.0.0.5:6379/0"
    monkeypatch.delenv("FLEET_REDIS_URL")
    assert_located(
        refused(path), path, 1, "limits.url_env", "environment variable FLEET_REDIS_URL is not set"
    )
    # config check (no secrets needed) only warns.
    assert load_config(path, require_secrets=False).warnings
    both = write(tmp_path, "limits: {backend: redis, url: 'redis://x', url_env: X}\n")
    assert "not both" in str(refused(both))
    neither = write(tmp_path, "limits: {backend: redis}\n")
    assert "limits.url or limits.url_env" in str(refused(neither))


def test_audit_on_store_failure_is_serve_or_refuse(tmp_path: Path) -> None:
    text = """\
tenants:
  configs:
    acme:
      backend_url: "http://127.0.0.1:9001"
      audit: {enabled: true, on_store_failure: refuse}
    beta:
      backend_url: "http://127.0.0.1:9001"
      audit: {enabled: true}
"""
    path = tmp_path / "checkstream.yaml"
    path.write_text(text)
    configs = load_config(path).model.tenants.configs
    assert [c.audit.on_store_failure for c in configs.values() if c.audit] == ["refuse", "serve"]
    path.write_text(text.replace("on_store_failure: refuse", "on_store_failure: sometimes"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}:5: tenants.configs.acme.audit.on_store_failure" in str(caught.value)
