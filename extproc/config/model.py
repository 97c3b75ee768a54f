"""The CheckStream configuration: typed model and loading.

``checkstream.yaml`` plus one policy file per tenant (``../shared/design.md`` is the contract).
Everything a user can get wrong is refused at start with the file, the line and the key path;
nothing is re-validated per request. Key names are the public contract: keep them. The checks
across keys live in ``checks.py``. Run wherever a config is loaded (CLI, launcher, workers,
classifier server).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from checkstream.config.checks import API_KEY_MAP, cross_check
from checkstream.config.yamlsource import (
    ConfigError,
    KeyPath,
    YamlDocument,
    load_yaml,
    validation_problems,
)
from checkstream.policy.files import LoadedPolicy, load_policy_file

PositiveInt = Annotated[int, Field(gt=0)]
Port = Annotated[int, Field(ge=0, le=65535)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
# Tenant ids appear in URLs, headers and file paths (audit trails): keep them plain.
TenantId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
# Replica names appear in audit file names (<day>.<replica>.jsonl).
ReplicaName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
# Classifier names appear in metrics labels and audit records.
ClassifierName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(Strict):
    host: str = "0.0.0.0"
    port: Port = 8080
    admin_port: Port = 9090
    extproc_port: Port = 50051
    extproc_workers: Annotated[int, Field(ge=1, le=64)] = 1
    # Envoy's own admin interface (readiness, draining); always bound to 127.0.0.1.
    envoy_admin_port: Port = 9901
    # How long SIGTERM waits for in-flight streams before stopping Envoy and extproc.
    drain_timeout_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    # Largest request body accepted (the prompt is buffered to classify it); more gets 413.
    max_request_bytes: PositiveInt = 8 * 1024 * 1024
    # A whole (non-streamed) answer is held while it is checked: beyond this it is refused
    # (502 in the tenant's format) rather than held without bound or released unchecked.
    max_response_bytes: PositiveInt = 16 * 1024 * 1024
    # /metrics and /readyz through the listener too (always on admin_port). Metrics name every
    # tenant and its volumes: turn this off where tenants can reach the listener.
    metrics_on_listener: bool = True
    # Peers whose X-Forwarded-For is believed when finding a client's address (access.py).
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    # Clients that may reach managed-auth tenants by header or path, without a key.
    trusted_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    # This replica's name in audit records and chain files. CHECKSTREAM_REPLICA overrides it;
    # absent, POD_NAME, else the host name (extproc/ops/replica.py).
    replica: ReplicaName | None = None
    # json: one JSON object per line for log shippers; text: for a person. Unset: text
    # when stdout is a terminal, json otherwise (logs.py).
    log_format: Literal["json", "text"] | None = None
    # The operator console (/ui/) through the listener too (always on admin_port). Off: the
    # listener is where tenants are; the console belongs on the private admin port.
    console_on_listener: bool = False

    @property
    def local_host(self) -> str:
        """Where a client on this machine reaches what binds ``host``: loopback for a
        wildcard address."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def local_url(self, port: int, host: str | None = None) -> str:
        """``http://`` URL of ``port`` as a local client reaches it (``host`` defaults to
        this server's)."""
        name = self.local_host if host is None else host
        return f"http://[{name}]:{port}" if ":" in name else f"http://{name}:{port}"


class ResolutionStep(Strict):
    """One way to find the tenant; a list of these is tried in order."""

    header: Annotated[str, Field(min_length=1)] | None = None
    path_prefix: Annotated[str, Field(min_length=2)] | None = None
    api_key_mapping: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ResolutionStep:
        chosen = [
            k for k in ("header", "path_prefix", "api_key_mapping") if getattr(self, k) is not None
        ]
        if len(chosen) != 1:
            raise ValueError("each step names exactly one of header, path_prefix, api_key_mapping")
        return self

    @field_validator("path_prefix")
    @classmethod
    def _slashes(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value if value.endswith("/") else value + "/"

    @property
    def method(self) -> str:
        if self.header is not None:
            return "header"
        return "path_prefix" if self.path_prefix is not None else "api_key_mapping"


class Thresholds(Strict):
    safety: Fraction | None = None
    chunk: Fraction | None = None


class GlobalThresholds(Strict):
    """The last word on thresholds: ``safety`` for prompts and whole answers, ``chunk`` for
    midstream windows (rules and tenants may set their own)."""

    safety: Fraction = 0.9
    chunk: Fraction = 0.8


class PhaseConfig(Strict):
    enabled: bool | None = None
    classifiers: list[str] | None = None


class MidstreamConfig(PhaseConfig):
    window_tokens: PositiveInt | None = None
    holdback_tokens: PositiveInt | None = None


class PipelineConfig(Strict):
    ingress: PhaseConfig = PhaseConfig()
    midstream: MidstreamConfig = MidstreamConfig()


class RateLimitConfig(Strict):
    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    max_concurrent_requests: PositiveInt | None = None
    # Per UTC day (00:00 to 00:00), exact across replicas with limits.backend: redis.
    requests_per_day: PositiveInt | None = None
    # Reserved for the answer when a request names no max_tokens (tokens_per_minute pre-pays).
    default_max_tokens: PositiveInt = 1024

    @property
    def limited(self) -> bool:
        return bool(
            self.requests_per_minute
            or self.tokens_per_minute
            or self.max_concurrent_requests
            or self.requests_per_day
        )


class ApiKeyEntry(Strict):
    """A CheckStream key stored as its SHA-256 digest (``checkstream keys new`` makes one)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    # A date: the key works through that day (UTC). A datetime without zone is UTC. Date
    # first: a quoted "2027-06-30" is a date, not midnight at its start.
    expires: date | datetime | None = None


class BudgetAlerts(Strict):
    """One POST per threshold crossed per budget period (budget_alerts.py)."""

    webhook_url: str
    at_percent: Annotated[list[Annotated[int, Field(gt=0, le=1000)]], Field(min_length=1)] = [
        50,
        80,
        100,
    ]

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host")
        return value


class BudgetConfig(Strict):
    monthly_usd: Annotated[float, Field(gt=0)] | None = None
    # Per UTC day, next to the month's; refused with its own message (daily_quotas.py).
    daily_usd: Annotated[float, Field(gt=0)] | None = None
    alerts: BudgetAlerts | None = None

    @model_validator(mode="after")
    def _some_budget(self) -> BudgetConfig:
        if self.monthly_usd is None and self.daily_usd is None:
            raise ValueError("set monthly_usd, daily_usd or both")
        return self


class ManagedAuth(Strict):
    type: Literal["bearer"] = "bearer"
    token_env: Annotated[str, Field(min_length=1)]


class AuditConfig(Strict):
    enabled: bool = True
    # Relative to the config file; absent: ./audit/<tenant id>.
    path: str | None = None
    retention_days: PositiveInt = 90
    # Add the matched excerpt (PII redacted) to trigger records; off: no text at all.
    include_content: bool = False
    # The path is a volume every replica writes (each its own chain): required when
    # ``replicated: true``.
    shared: bool = False
    # When this tenant's audit trail or the usage ledger cannot be written: serve and count
    # the failure, or refuse the tenant's requests (503) until a write succeeds again.
    on_store_failure: Literal["serve", "refuse"] = "serve"


class TenantConfig(Strict):
    backend_url: str
    backend_timeout_ms: PositiveInt = 30000
    streaming_format: Literal["openai", "anthropic"] = "openai"
    headers: dict[str, str] = {}
    policy_path: str | None = None
    thresholds: Thresholds = Thresholds()
    pipeline: PipelineConfig = PipelineConfig()
    classifiers: list[str] = []
    models: list[str] | None = None
    rate_limit: RateLimitConfig = RateLimitConfig()
    budget: BudgetConfig | None = None
    # Forward the client's own provider key. Off by default: a key is never sent upstream
    # unless the operator asked for it.
    auth_passthrough: bool = False
    auth: ManagedAuth | None = None
    audit: AuditConfig | None = None  # absent: no audit trail
    fail_mode: Literal["closed", "open"] = "closed"
    suspended: bool = False
    api_keys: list[ApiKeyEntry] = []
    # Client addresses allowed to use this tenant; absent: any.
    allowed_cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None
    # A managed-auth tenant reachable without a key says so here (or server.trusted_networks).
    allow_unauthenticated: bool = False
    # Paths (after any /tenant/<id> prefix) whose bodies no guardrail can read, forwarded
    # unchecked because the operator named them; any other unknown endpoint is refused.
    passthrough_paths: list[str] = []
    # Images, audio and files in prompts cannot be read by text classifiers: a guarded
    # tenant refuses them unless the operator accepts that they pass unchecked.
    passthrough_media: bool = False
    # When this tenant's requests are counted: "inline" (extproc reads the answer's end and
    # the usage row and audit records are durable before the client's last byte) or
    # "deferred" (Envoy reads the usage as the answer passes and reports it in its gRPC
    # access log: one or two blocking ext_proc messages per request instead of five; the
    # row lands a flush interval after the answer). Tenants whose answers are checked
    # (midstream rules) are always inline: extproc reads those answers anyway.
    accounting: Literal["inline", "deferred"] = "inline"

    @field_validator("passthrough_paths")
    @classmethod
    def _absolute_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/") or "?" in path:
                raise ValueError(f"{path!r}: expected an absolute path without a query")
        return value

    @field_validator("backend_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials: use auth.token_env")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            raise ValueError("invalid port") from None
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name or name.startswith(":") or any(c in name for c in " \t\r\n:"):
                raise ValueError(f"invalid header name {name!r}")
        return {name.lower(): v for name, v in value.items()}


class TenantsConfig(Strict):
    enabled: bool = True
    resolution: list[ResolutionStep] = [
        ResolutionStep(header="X-Tenant-ID"),
        ResolutionStep(path_prefix="/tenant/"),
        ResolutionStep(api_key_mapping=True),
    ]
    default_tenant: str | None = None
    api_key_map: dict[str, str] = {}
    configs: dict[TenantId, TenantConfig] = {}


class ClassifierEntry(BaseModel):
    """A named classifier instance: its ``type`` plus settings that type's factory checks."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: Annotated[str, Field(min_length=1)]

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LimitsConfig(Strict):
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None
    # The environment variable holding the URL (a Secret on Kubernetes: it may carry a
    # password). Read at load time into ``url``.
    url_env: str | None = None
    # Concurrency slots are leases renewed while their request lives: a dead replica's slots
    # free within this many seconds (limits/base.py).
    lease_s: Annotated[float, Field(ge=1, le=3600)] = 30.0


class UsageConfig(Strict):
    enabled: bool = True
    # sqlite: one file per machine (``path``); postgres: one ledger for every replica.
    backend: Literal["sqlite", "postgres"] = "sqlite"
    # SQLite only; relative to the config file.
    path: str = "./checkstream-usage.db"
    # PostgreSQL only: the connection URL, or the environment variable holding it (a URL
    # with a password is a secret).
    url: str | None = None
    url_env: Annotated[str, Field(min_length=1)] | None = None

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("expected a postgresql:// URL")
        return value


class Price(Strict):
    input: Annotated[float, Field(ge=0)]
    output: Annotated[float, Field(ge=0)]


class GlobalPhaseConfig(Strict):
    enabled: bool = True
    classifiers: list[str] = []


class GlobalMidstreamConfig(GlobalPhaseConfig):
    window_tokens: PositiveInt = 128
    holdback_tokens: PositiveInt = 16


class GlobalPipeline(Strict):
    """Defaults for every tenant; a tenant's own ``pipeline`` keys override them."""

    ingress: GlobalPhaseConfig = GlobalPhaseConfig()
    midstream: GlobalMidstreamConfig = GlobalMidstreamConfig()


class CheckStreamConfig(Strict):
    # Several replicas serve this config: refuse state that would be per replica.
    replicated: bool = False
    server: ServerConfig = ServerConfig()
    tenants: TenantsConfig = TenantsConfig()
    pipeline: GlobalPipeline = GlobalPipeline()
    thresholds: GlobalThresholds = GlobalThresholds()
    classifiers: dict[ClassifierName, ClassifierEntry] = {}
    limits: LimitsConfig = LimitsConfig()
    usage: UsageConfig = UsageConfig()
    pricing: dict[str, Price] = {}


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with its policies read, paths resolved and secrets looked up."""

    path: Path
    model: CheckStreamConfig
    doc: YamlDocument  # kept to locate later problems (classifier settings) by line
    policies: dict[str, LoadedPolicy]  # tenant id -> its policy file
    secrets: dict[str, str]  # tenant id -> managed backend key (never logged)
    warnings: tuple[str, ...] = ()


def load_config(path: str | Path, *, require_secrets: bool = True) -> LoadedConfig:
    """Load and cross-check ``path``; raise ConfigError listing every problem found.

    ``require_secrets``: a managed key whose environment variable is unset is an error when
    serving, but only a warning for ``config check`` (CI pipelines rarely hold the secrets).
    """
    doc = load_yaml(Path(path))
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError([doc.problem((), "expected a mapping at the top level")])
    try:
        model = CheckStreamConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(
            validation_problems(doc, exc, CheckStreamConfig, redact=[API_KEY_MAP])
        ) from None
    problems, warnings = cross_check(doc, model, require_secrets=require_secrets)
    policies: dict[str, LoadedPolicy] = {}
    secrets: dict[str, str] = {}
    base = doc.path.parent
    for tenant_id, tenant in model.tenants.configs.items():
        where: KeyPath = ("tenants", "configs", tenant_id)
        if tenant.policy_path is not None:
            try:
                policies[tenant_id] = load_policy_file(base / tenant.policy_path)
            except ConfigError as exc:
                problems.extend(
                    doc.problem((*where, "policy_path"), f"policy file {p}")
                    if p.message == "file not found"
                    else p
                    for p in exc.problems
                )
        if tenant.auth is not None:
            secret = os.environ.get(tenant.auth.token_env)
            if secret:
                secrets[tenant_id] = secret
            else:
                note = f"environment variable {tenant.auth.token_env} is not set"
                if require_secrets:
                    problems.append(doc.problem((*where, "auth", "token_env"), note))
                else:
                    warnings.append(str(doc.problem((*where, "auth", "token_env"), note)))
    url_env = model.limits.url_env
    if url_env is not None and not problems:
        url = os.environ.get(url_env)
        if url:
            model = model.model_copy(
                update={"limits": model.limits.model_copy(update={"url": url})}
            )
        else:
            note = f"environment variable {url_env} is not set"
            if require_secrets:
                problems.append(doc.problem(("limits", "url_env"), note))
            else:
                warnings.append(str(doc.problem(("limits", "url_env"), note)))
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: (p.file, p.line or 0)))
    return LoadedConfig(doc.path, model, doc, policies, secrets, tuple(warnings))
