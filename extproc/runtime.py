"""Everything a request needs, compiled once per config load and shared by all requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from extproc.config import LoadedConfig
from extproc.guardrails import Guardrails, TenantGuardrails, compile_guardrails
from extproc.mutations import Forwarding, build_forwarding
from extproc.pipeline import Checker
from extproc.registry import Registry, load_registry
from extproc.tenancy import Tenant, TenantResolver

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
    needs_request_body: bool
    needs_response: bool
    allowed_models: frozenset[str] | None
    forwarding: Forwarding  # the client's own key goes upstream (auth_passthrough)
    forwarding_without_key: Forwarding  # the client's key is stripped


@dataclass
class Runtime:
    config: LoadedConfig
    resolver: TenantResolver
    guardrails: Guardrails
    plans: dict[str, TenantPlan]
    checker: Checker
    #: Set on SIGTERM: health turns 503 so load balancers stop sending new traffic.
    draining: bool = field(default=False)

    @classmethod
    def from_config(cls, loaded: LoadedConfig, registry: Registry | None = None) -> Runtime:
        """Compile ``loaded``; raises ConfigError (located) or PluginError (naming the plugin)."""
        guardrails = compile_guardrails(loaded, registry or load_registry())
        resolver = TenantResolver(loaded.model, loaded.secrets)
        plans = {}
        for tenant_id, tenant in resolver.tenants.items():
            cfg = tenant.config
            rails = guardrails.tenants[tenant_id]
            # Midstream needs the request too: to ask OpenAI backends for stream usage.
            needs_request_body = (
                bool(rails.ingress.rules or rails.midstream.rules) or cfg.models is not None
            )
            needs_response = bool(rails.midstream.rules)
            kw = {"needs_request_body": needs_request_body, "needs_response": needs_response}
            plans[tenant_id] = TenantPlan(
                tenant=tenant,
                guardrails=rails,
                needs_request_body=needs_request_body,
                needs_response=needs_response,
                allowed_models=frozenset(cfg.models) if cfg.models is not None else None,
                forwarding=build_forwarding(tenant, keep_client_key=True, **kw),
                forwarding_without_key=build_forwarding(tenant, keep_client_key=False, **kw),
            )
        executor = ThreadPoolExecutor(CLASSIFIER_THREADS, thread_name_prefix="classifier")
        checker = Checker(guardrails.classifiers, executor, CHECK_TIMEOUT_S)
        return cls(loaded, resolver, guardrails, plans, checker)

    def tenant_info(self, tenant_id: str) -> dict[str, Any]:
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
            "budget": cfg.budget.model_dump() if cfg.budget else None,
            "fail_mode": cfg.fail_mode,
        }
