"""Everything a request needs, compiled once per config load and shared by all requests."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkstream.accounting.accounts import Accounts
from checkstream.audit.trail import resolve_audit_dirs
from checkstream.config.model import AuditConfig, LoadedConfig
from checkstream.config.yamlsource import ConfigError
from checkstream.formats.texts import apply_redactions
from checkstream.gateway.mutations import Forwarding, build_forwarding
from checkstream.ledger.usage import Pricing, UsageError, period_of
from checkstream.limits.daily import DailyLimits
from checkstream.limits.decisions import NANO, LimiterUnavailable
from checkstream.ops import logs
from checkstream.policy.guardrails import Guardrails, TenantGuardrails, compile_guardrails
from checkstream.policy.large_inputs import LargeInputs
from checkstream.policy.pipeline import Checker
from checkstream.policy.registry import Registry, load_registry
from checkstream.tenants.access import AccessGate
from checkstream.tenants.resolution import Tenant, TenantResolver
from checkstream.types import Classifier

log = logs.get("checkstream.config")

# Audit excerpts (audit.include_content) keep this much of the checked text, PII redacted by
# this classifier type's spans.
EXCERPT_CHARS = 500
EXCERPT_PII_TYPE = "pii_detector"
# Below Envoy's ext_proc message_timeout (5 s), so a slow classifier meets the tenant's fail
# mode here rather than a bare 504 from Envoy.
CHECK_TIMEOUT_S = 3.0
# Sync classifiers run here, off the event loop. Two cores: more threads only contend.
CLASSIFIER_THREADS = 2


@dataclass(frozen=True)
class TenantPlan:
    """What extproc does for one tenant's requests."""

    tenant: Tenant
    guardrails: TenantGuardrails
    #: Requests are counted: usage, rate limits, budget or audit.
    tracks: bool
    #: The answer's usage is needed (counted, or midstream rules need the request's tokens).
    reads_answer_usage: bool
    budget_usd: float | None
    #: Requests take a share of rate limits or budget before they go on.
    admits: bool
    allowed_models: frozenset[str] | None
    #: Any guardrail reads this tenant's traffic: bodies it cannot read are refused.
    guarded: bool
    #: Its answers are checked (midstream or egress rules).
    checks_answers: bool
    #: Counted from Envoy's access log (``accounting: deferred``, accounting/deferred.py).
    defers: bool
    passthrough_paths: frozenset[str]
    #: Refuse prompts with images, audio or files (guarded, and the operator did not opt out).
    refuses_media: bool
    max_request_bytes: int
    max_response_bytes: int
    #: requests_per_day and daily_usd (falsy: none).
    daily: DailyLimits
    forwarding: Forwarding  # the client's own key goes upstream (auth_passthrough)
    forwarding_without_key: Forwarding  # the client's key is stripped


@dataclass
class Runtime:
    """One config generation; a reload builds a new one and requests in flight keep theirs."""

    config: LoadedConfig
    resolver: TenantResolver
    guardrails: Guardrails
    plans: dict[str, TenantPlan]
    checker: Checker
    accounts: Accounts
    pricing: Pricing
    #: Models that may appear as metric labels (allowlists and the price table).
    known_models: frozenset[str]
    #: Names this config: a hash of its effective settings (config_version).
    version: str
    #: Audited tenants' retention_days.
    audit_retention: dict[str, int]
    #: Finds the PII to hide in audit excerpts (tenants with audit.include_content).
    excerpt_pii: Classifier | None
    #: Client addresses: allowed_cidrs, keyless access from trusted_networks.
    access: AccessGate
    #: Set on SIGTERM: health turns 503 so load balancers stop sending new traffic.
    draining: bool = field(default=False)

    @classmethod
    def from_config(
        cls,
        loaded: LoadedConfig,
        registry: Registry | None = None,
        accounts: Accounts | None = None,
        executor: Executor | None = None,
        large: LargeInputs | None = None,
    ) -> Runtime:
        """Compile ``loaded``; raises ConfigError (located) or PluginError (naming the plugin).

        ``accounts`` (limits, budgets, usage, audit), ``executor`` and ``large`` (where
        classifiers run) carry over from the generation this one replaces; without, they are
        opened here (inside the serving event loop).
        """
        registry = registry or load_registry()
        guardrails = compile_guardrails(loaded, registry)
        resolver = TenantResolver(loaded.model, loaded.secrets)
        model = loaded.model
        audited = resolve_audit_dirs(loaded)
        plans = {}
        for tenant_id, tenant in resolver.tenants.items():
            cfg = tenant.config
            rails = guardrails.tenants[tenant_id]
            tracks = (
                model.usage.enabled
                or cfg.rate_limit.limited
                or cfg.budget is not None
                or tenant_id in audited
            )
            checks_answers = bool(rails.midstream.rules)
            # Counted from Envoy's access log; answers that are checked pass through
            # extproc anyway, so their tenants count them there.
            defers = tracks and cfg.accounting == "deferred" and not checks_answers
            if cfg.accounting == "deferred" and checks_answers:
                log.warning(
                    "deferred_accounting_not_used",
                    tenant=tenant_id,
                    reason="midstream rules read this tenant's answers in extproc: counted inline",
                )
            # Midstream needs the request too: to ask OpenAI backends for stream usage.
            reads_answer_usage = (tracks and not defers) or checks_answers
            needs_request_body = (
                reads_answer_usage
                or bool(rails.ingress.rules)
                or cfg.models is not None
                or (defers and bool(cfg.rate_limit.tokens_per_minute))
            )
            kw = {
                "needs_request_body": needs_request_body,
                "needs_response": reads_answer_usage,
                # Envoy's usage reader (deferred) cannot decompress either.
                "plain_answers": reads_answer_usage or defers,
            }
            plans[tenant_id] = TenantPlan(
                tenant=tenant,
                guardrails=rails,
                tracks=tracks,
                reads_answer_usage=reads_answer_usage,
                budget_usd=cfg.budget.monthly_usd if cfg.budget else None,
                admits=cfg.rate_limit.limited or cfg.budget is not None,
                allowed_models=frozenset(cfg.models) if cfg.models is not None else None,
                guarded=bool(rails.ingress.rules or rails.midstream.rules),
                checks_answers=checks_answers,
                defers=defers,
                passthrough_paths=frozenset(cfg.passthrough_paths),
                refuses_media=bool(rails.ingress.rules) and not cfg.passthrough_media,
                max_request_bytes=model.server.max_request_bytes,
                max_response_bytes=model.server.max_response_bytes,
                daily=DailyLimits.of(cfg),
                forwarding=build_forwarding(tenant, keep_client_key=True, **kw),
                forwarding_without_key=build_forwarding(tenant, keep_client_key=False, **kw),
            )
        if executor is None:
            executor = ThreadPoolExecutor(CLASSIFIER_THREADS, thread_name_prefix="classifier")
        if large is None:
            large = LargeInputs()  # no process starts before a large input (or warm())
        checker = Checker(guardrails.classifiers, executor, CHECK_TIMEOUT_S, large)
        known = set(model.pricing)
        for tenant_config in model.tenants.configs.values():
            known.update(tenant_config.models or ())
        return cls(
            loaded,
            resolver,
            guardrails,
            plans,
            checker,
            accounts if accounts is not None else Accounts.open(loaded),
            Pricing(model.pricing),
            frozenset(known),
            config_version(loaded),
            {t: cfg.retention_days for t, (_path, cfg) in audited.items()},
            _excerpt_redactor(loaded, registry, audited),
            AccessGate.from_config(model),
        )

    def excerpt(self, tenant_id: str, texts: Sequence[str]) -> str | None:
        """The checked text for an audit record, PII redacted; None unless the tenant's
        audit asks for content."""
        plan = self.plans[tenant_id]
        audit = plan.tenant.config.audit
        if self.excerpt_pii is None or audit is None or not audit.include_content:
            return None
        text = "\n".join(t for t in texts if t)[:EXCERPT_CHARS]
        found = self.excerpt_pii.classify([text])
        spans = found[0].spans if isinstance(found, Sequence) and found else ()
        return apply_redactions(text, spans)

    async def tenant_info(self, tenant_id: str) -> dict[str, Any]:
        """What a tenant may learn about itself (no secrets, nothing about other tenants)."""
        plan = self.plans[tenant_id]
        cfg = plan.tenant.config
        policy = self.config.policies.get(tenant_id)
        rails = plan.guardrails
        return {
            "tenant": tenant_id,
            "backend": cfg.backend_url,
            "streaming_format": cfg.streaming_format,
            "policy": {
                "path": cfg.policy_path,
                "name": policy.model.name if policy else None,
                "rules": [r.name for r in policy.model.policies] if policy else [],
            },
            "classifiers": {
                "ingress": list(rails.ingress.classifiers),
                "midstream": list(rails.midstream.classifiers),
            },
            "models": cfg.models,
            "rate_limit": cfg.rate_limit.model_dump(),
            "remaining": await self._remaining(tenant_id),
            "budget": await self._budget(tenant_id),
            "usage": await self._usage(tenant_id),
            "fail_mode": cfg.fail_mode,
            "config_version": self.version,
        }

    async def _remaining(self, tenant_id: str) -> dict[str, Any] | str | None:
        limits = self.plans[tenant_id].tenant.config.rate_limit
        if not limits.limited:
            return None
        try:
            decision = await self.accounts.limiter.remaining(tenant_id, limits)
        except LimiterUnavailable:
            return "unavailable"
        return {
            "limit": decision.limit_name,
            "remaining": decision.remaining,
            "of": decision.limit,
            "reset": decision.reset,
        }

    async def _budget(self, tenant_id: str) -> dict[str, Any] | None:
        budget = self.plans[tenant_id].tenant.config.budget
        if budget is None:
            return None
        period = period_of(time.time())
        try:
            spent: float | str = await self.accounts.limiter.spent(tenant_id, period) / NANO
        except LimiterUnavailable:
            spent = "unavailable"
        return {"monthly_usd": budget.monthly_usd, "period": period, "spent_usd": spent}

    async def _usage(self, tenant_id: str) -> dict[str, Any] | str | None:
        """This month's totals from the ledger (with PostgreSQL: every replica's requests)."""
        ledger = self.accounts.ledger
        if ledger is None:
            return None
        period = period_of(time.time())
        try:
            rows = await ledger.report(tenant=tenant_id, period=period, by_model=False)
        except (UsageError, OSError):
            return "unavailable"
        row = rows[0] if rows else None
        return {
            "period": period,
            "requests": row.requests if row else 0,
            "input_tokens": row.input_tokens if row else 0,
            "output_tokens": row.output_tokens if row else 0,
            # The report's exact decimal, as a JSON number (nano-dollar precision).
            "cost_usd": float(row.cost_usd) if row else 0.0,
        }


def check_config(loaded: LoadedConfig, registry: Registry | None = None) -> Guardrails:
    """Everything ``Runtime.from_config`` would refuse, without opening any store; returns
    the compiled guardrails (their classifiers are loaded)."""
    registry = registry or load_registry()
    guardrails = compile_guardrails(loaded, registry)
    TenantResolver(loaded.model, loaded.secrets)
    _excerpt_redactor(loaded, registry, resolve_audit_dirs(loaded))
    return guardrails


def _excerpt_redactor(
    loaded: LoadedConfig, registry: Registry, audited: Mapping[str, tuple[Path, AuditConfig]]
) -> Classifier | None:
    wanting = [tenant for tenant, (_path, cfg) in audited.items() if cfg.include_content]
    if not wanting:
        return None
    kind = registry.types.get(EXCERPT_PII_TYPE)
    if kind is None:
        key = ("tenants", "configs", wanting[0], "audit", "include_content")
        raise ConfigError(
            [
                loaded.doc.problem(
                    key,
                    f"needs the '{EXCERPT_PII_TYPE}' classifier type, "
                    "which redacts PII from audit excerpts, and it is not installed",
                )
            ]
        )
    return kind.factory("audit_excerpts", {})


def config_version(loaded: LoadedConfig) -> str:
    """A short hash of what decides how requests are treated, as validated (defaults
    filled in, so spelling a default out changes nothing): tenants, policies, classifiers,
    limits, pipeline defaults, thresholds and prices. Not where this replica listens or
    keeps files (``server``, ``usage``), nor the Redis URL: replicas of one fleet differ
    there and must still show one version (``checkstream fleet status``)."""
    model = loaded.model
    effective = {
        "tenants": model.tenants.model_dump(mode="json"),
        "policies": {t: p.model.model_dump(mode="json") for t, p in loaded.policies.items()},
        "classifiers": {n: c.model_dump(mode="json") for n, c in model.classifiers.items()},
        "limits": model.limits.model_dump(mode="json", exclude={"url"}),
        "pipeline": model.pipeline.model_dump(mode="json"),
        "thresholds": model.thresholds.model_dump(mode="json"),
        "pricing": {m: p.model_dump(mode="json") for m, p in model.pricing.items()},
    }
    canonical = json.dumps(effective, sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]
