"""The overview's rows and fleet totals, from the config, the suspensions and the last
refresh. Run by the admin server on every overview page (plain computation, no I/O)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from checkstream.config.model import LoadedConfig, TenantConfig
from checkstream.console.collector import Collected, Headroom
from checkstream.console.traffic import NO_TRAFFIC, WindowStats, health, quantile


@dataclass(frozen=True)
class TenantRow:
    id: str
    suspended_by: str | None  # "config" or "admin"; None when active
    health: str
    rpm: float
    error_rate: float | None
    p95_ms: float | None
    tokens_today: int
    spend_month: float
    budget_usd: float | None
    headroom: Headroom | None
    triggers_24h: int | None  # None: no audit trail
    config_version: str

    @property
    def status(self) -> str:
        return "active" if self.suspended_by is None else "suspended"

    @property
    def budget_share(self) -> float | None:
        return self.spend_month / self.budget_usd if self.budget_usd else None


@dataclass(frozen=True)
class Totals:
    tenants: int
    suspended: int
    health: Mapping[str, int]
    rpm: float
    error_rate: float | None
    p95_ms: float | None
    tokens_today: int
    spend_month: float
    triggers_24h: int


def tenant_version(loaded: LoadedConfig, tenant: str) -> str:
    """A short hash of one tenant's settings and policy: which tenants a reload changed."""
    config = loaded.model.tenants.configs[tenant]
    policy = loaded.policies.get(tenant)
    data = {
        "tenant": config.model_dump(mode="json"),
        "policy": policy.model.model_dump(mode="json") if policy is not None else None,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


class TenantVersions:
    """``tenant_version`` of every tenant, computed once per loaded config."""

    def __init__(self) -> None:
        self._loaded: LoadedConfig | None = None
        self._versions: dict[str, str] = {}

    def of(self, loaded: LoadedConfig) -> Mapping[str, str]:
        if loaded is not self._loaded:
            self._versions = {t: tenant_version(loaded, t) for t in loaded.model.tenants.configs}
            self._loaded = loaded
        return self._versions


def suspended_by(tenant: str, config: TenantConfig, admin: frozenset[str]) -> str | None:
    if config.suspended:
        return "config"
    return "admin" if tenant in admin else None


def build_rows(
    loaded: LoadedConfig,
    admin_suspended: frozenset[str],
    data: Collected,
    versions: Mapping[str, str],
    only: str | None = None,
) -> list[TenantRow]:
    """Every tenant's row, or just ``only``'s."""
    rows = []
    configs = loaded.model.tenants.configs
    chosen = configs.items() if only is None else [(only, configs[only])]
    for tenant, config in chosen:
        stats = data.traffic.get(tenant)
        rows.append(
            TenantRow(
                id=tenant,
                suspended_by=suspended_by(tenant, config, admin_suspended),
                health=health(stats),
                rpm=stats.rpm if stats else 0.0,
                error_rate=stats.error_rate if stats else None,
                p95_ms=stats.p95_ms if stats else None,
                tokens_today=data.tokens_today.get(tenant, 0),
                spend_month=data.spend_month.get(tenant, 0.0),
                budget_usd=config.budget.monthly_usd if config.budget else None,
                headroom=data.headroom.get(tenant),
                triggers_24h=data.triggers_24h.get(tenant),
                config_version=versions.get(tenant, ""),
            )
        )
    return rows


def totals(rows: list[TenantRow], traffic: Mapping[str, WindowStats]) -> Totals:
    known = {row.id for row in rows}
    fleet = NO_TRAFFIC
    for tenant, stats in traffic.items():
        if tenant in known:
            fleet = fleet + stats
    return Totals(
        tenants=len(rows),
        suspended=sum(1 for row in rows if row.suspended_by is not None),
        health=Counter(row.health for row in rows),
        rpm=fleet.rpm,
        error_rate=fleet.error_rate,
        p95_ms=quantile(0.95, fleet.total_buckets),
        tokens_today=sum(row.tokens_today for row in rows),
        spend_month=sum(row.spend_month for row in rows),
        triggers_24h=sum(row.triggers_24h or 0 for row in rows),
    )


_HEALTH_ORDER: Final = {"critical": 0, "degraded": 1, "healthy": 2, "idle": 3}


def _none_last(value: float | None) -> tuple[bool, float]:
    return (value is None, value or 0.0)


#: Sortable columns: URL name -> key.
SORT_KEYS: Final[Mapping[str, Callable[[TenantRow], Any]]] = {
    "tenant": lambda r: r.id,
    "status": lambda r: (r.status, r.suspended_by or ""),
    "health": lambda r: _HEALTH_ORDER.get(r.health, 9),
    "rpm": lambda r: r.rpm,
    "errors": lambda r: _none_last(r.error_rate),
    "p95": lambda r: _none_last(r.p95_ms),
    "tokens": lambda r: r.tokens_today,
    "spend": lambda r: r.spend_month,
    "budget": lambda r: _none_last(r.budget_share),
    "headroom": lambda r: _none_last(r.headroom.share if r.headroom else None),
    "triggers": lambda r: _none_last(None if r.triggers_24h is None else float(r.triggers_24h)),
    "version": lambda r: r.config_version,
}


def sort_rows(rows: list[TenantRow], column: str, descending: bool) -> list[TenantRow]:
    key = SORT_KEYS.get(column, SORT_KEYS["tenant"])
    return sorted(rows, key=key, reverse=descending)
