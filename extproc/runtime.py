"""Everything a request needs, compiled once per config load and shared by all requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extproc.config import LoadedConfig
from extproc.mutations import Forwarding, build_forwarding
from extproc.tenancy import Tenant, TenantResolver


@dataclass(frozen=True)
class TenantPlan:
    """What extproc does for one tenant's requests."""

    tenant: Tenant
    needs_request_body: bool
    needs_response: bool
    allowed_models: frozenset[str] | None
    forwarding: Forwarding  # the client's own key goes upstream (auth_passthrough)
    forwarding_without_key: Forwarding  # the client's key is stripped


@dataclass
class Runtime:
    config: LoadedConfig
    resolver: TenantResolver
    plans: dict[str, TenantPlan]
    #: Set on SIGTERM: health turns 503 so load balancers stop sending new traffic.
    draining: bool = field(default=False)

    @classmethod
    def from_config(cls, loaded: LoadedConfig) -> Runtime:
        model = loaded.model
        resolver = TenantResolver(model, loaded.secrets)
        plans = {}
        for tenant_id, tenant in resolver.tenants.items():
            cfg = tenant.config
            ingress = _phase_classifiers(cfg.pipeline.ingress, model.pipeline.ingress)
            midstream = _phase_classifiers(cfg.pipeline.midstream, model.pipeline.midstream)
            egress = _phase_classifiers(cfg.pipeline.egress, model.pipeline.egress)
            needs_request_body = bool(ingress or cfg.classifiers) or cfg.models is not None
            needs_response = bool(midstream or egress or cfg.classifiers)
            kw = {"needs_request_body": needs_request_body, "needs_response": needs_response}
            plans[tenant_id] = TenantPlan(
                tenant=tenant,
                needs_request_body=needs_request_body,
                needs_response=needs_response,
                allowed_models=frozenset(cfg.models) if cfg.models is not None else None,
                forwarding=build_forwarding(tenant, keep_client_key=True, **kw),
                forwarding_without_key=build_forwarding(tenant, keep_client_key=False, **kw),
            )
        return cls(loaded, resolver, plans)

    def tenant_info(self, tenant_id: str) -> dict[str, Any]:
        """What a tenant may learn about itself (no secrets, nothing about other tenants)."""
        plan = self.plans[tenant_id]
        cfg = plan.tenant.config
        policy = self.config.policies.get(tenant_id)
        return {
            "tenant": tenant_id,
            "backend": cfg.backend_url,
            "streaming_format": cfg.streaming_format,
            "policy": {"path": cfg.policy_path, "name": policy.name if policy else None},
            "models": cfg.models,
            "rate_limit": cfg.rate_limit.model_dump(),
            "budget": cfg.budget.model_dump() if cfg.budget else None,
            "fail_mode": cfg.fail_mode,
        }


def _phase_classifiers(tenant_phase: Any, global_phase: Any) -> list[str]:
    """The classifiers a phase runs for a tenant: its own setting, else the global one."""
    enabled = tenant_phase.enabled if tenant_phase.enabled is not None else global_phase.enabled
    if not enabled:
        return []
    own = tenant_phase.classifiers
    return list(own if own is not None else (global_phase.classifiers or []))
