"""Checks across keys, run once the typed config is built: what one key says about another
(tenant references, auth, limits backend, ports, access, usage backend, fleet).

Run wherever a config is loaded (CLI, launcher, workers, classifier server), by
``model.load_config``; each problem names the file, the line and the key path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from checkstream.config.fleet import check_usage_backend, replication_problems
from checkstream.config.yamlsource import KeyPath, Problem, YamlDocument

if TYPE_CHECKING:
    from checkstream.config.model import CheckStreamConfig

# Its keys are credentials: validation messages redact them, checks locate them by line.
API_KEY_MAP: KeyPath = ("tenants", "api_key_map")


def cross_check(
    doc: YamlDocument, model: CheckStreamConfig, *, require_secrets: bool
) -> tuple[list[Problem], list[str]]:
    """Every problem and warning the typed model cannot see on its own."""
    # access_checks imports the config models, which import this module.
    from checkstream.tenants.access_checks import check_access

    problems, warnings = _references(doc, model)
    access_problems, access_warnings = check_access(doc, model)
    problems += access_problems
    warnings += access_warnings
    problems += check_usage_backend(doc, model, warnings, require_secrets=require_secrets)
    problems += replication_problems(doc, model, warnings)
    return problems, warnings


def _references(doc: YamlDocument, model: CheckStreamConfig) -> tuple[list[Problem], list[str]]:
    """Tenant references, resolution order, auth, limits backend and port clashes."""
    problems: list[Problem] = []
    warnings: list[str] = []
    tenants = model.tenants
    known = tenants.configs
    if tenants.default_tenant is not None and tenants.default_tenant not in known:
        problems.append(
            doc.problem(
                ("tenants", "default_tenant"),
                f"tenant '{tenants.default_tenant}' has no entry in tenants.configs",
            )
        )
    if not tenants.enabled and tenants.default_tenant is None:
        problems.append(
            doc.problem(("tenants", "enabled"), "tenancy is disabled: set default_tenant")
        )
    for index, (key, tenant_id) in enumerate(tenants.api_key_map.items()):
        if tenant_id not in known:
            # The key itself is a credential: locate it by line, never print it.
            line = doc.line_of((*API_KEY_MAP, key))
            problems.append(
                Problem(
                    str(doc.path),
                    line,
                    f"tenants.api_key_map[entry {index + 1}]",
                    f"tenant '{tenant_id}' has no entry in tenants.configs",
                )
            )
    kinds = [step.method for step in tenants.resolution]
    for kind in set(kinds):
        if kinds.count(kind) > 1:
            problems.append(
                doc.problem(("tenants", "resolution"), "each resolution method may appear once")
            )
    for tenant_id, tenant in known.items():
        where: KeyPath = ("tenants", "configs", tenant_id)
        if tenant.auth is not None and tenant.auth_passthrough:
            problems.append(
                doc.problem(
                    (*where, "auth_passthrough"),
                    "auth_passthrough and managed auth exclude each other: choose one",
                )
            )
    if model.limits.url and model.limits.url_env:
        problems.append(
            doc.problem(("limits", "url_env"), "give limits.url or limits.url_env, not both")
        )
    elif model.limits.backend == "redis" and not (model.limits.url or model.limits.url_env):
        problems.append(
            doc.problem(("limits", "backend"), "backend redis needs limits.url or limits.url_env")
        )
    shared_counts = any(t.rate_limit.limited or t.budget is not None for t in known.values())
    if model.server.extproc_workers > 1 and model.limits.backend == "memory" and shared_counts:
        problems.append(
            doc.problem(
                ("server", "extproc_workers"),
                "in-memory limits are exact only with one worker; use limits.backend: redis "
                "or extproc_workers: 1 (otherwise each worker would grant the full limit)",
            )
        )
    ports = model.server
    used = [("port", ports.port), ("admin_port", ports.admin_port)]
    used += [("envoy_admin_port", ports.envoy_admin_port)]
    used += [("extproc_port", ports.extproc_port + i) for i in range(ports.extproc_workers)]
    seen: dict[int, str] = {}
    for name, number in used:
        if number and number in seen:
            problems.append(
                doc.problem(
                    ("server", name), f"port {number} is also used by server.{seen[number]}"
                )
            )
        seen.setdefault(number, name)
    return problems, warnings
