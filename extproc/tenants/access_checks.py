"""Config cross-checks on who may reach a tenant: hashed keys, plaintext keys, keyless access.

Run by ``load_config`` (every process that loads a config: launcher, worker, CLI).
"""

from __future__ import annotations

from checkstream.config.model import CheckStreamConfig
from checkstream.config.yamlsource import KeyPath, Problem, YamlDocument


def check_access(doc: YamlDocument, model: CheckStreamConfig) -> tuple[list[Problem], list[str]]:
    problems: list[Problem] = []
    warnings: list[str] = []
    tenants = model.tenants
    if tenants.api_key_map:
        warnings.append(
            str(
                doc.problem(
                    ("tenants", "api_key_map"),
                    "holds plaintext keys: move them to the tenants' api_keys as SHA-256 "
                    "digests (`checkstream keys new`)",
                )
            )
        )
    owners: dict[str, str] = {}
    for tenant_id, cfg in tenants.configs.items():
        names: set[str] = set()
        for index, entry in enumerate(cfg.api_keys):
            where: KeyPath = ("tenants", "configs", tenant_id, "api_keys", index)
            if entry.name in names:
                problems.append(
                    doc.problem((*where, "name"), f"key name '{entry.name}' is used twice")
                )
            names.add(entry.name)
            owner = owners.get(entry.sha256)
            if owner is not None:
                # One key, two entries: which one binds would depend on file order.
                problems.append(
                    doc.problem((*where, "sha256"), f"the same key is also listed for '{owner}'")
                )
            owners.setdefault(entry.sha256, tenant_id)
    problems.extend(_keyless(doc, model))
    return problems, warnings


def _keyless(doc: YamlDocument, model: CheckStreamConfig) -> list[Problem]:
    """Managed-auth tenants spend the operator's provider key: reaching one without a
    CheckStream key must be a decision written in the config, not a default."""
    if model.server.trusted_networks:
        return []  # who may go keyless is said there, and enforced per request
    tenants = model.tenants
    methods: list[str] = []
    if tenants.enabled:
        for step in tenants.resolution:
            if step.header is not None:
                methods.append(f"header '{step.header}'")
            elif step.path_prefix is not None:
                methods.append(f"path_prefix '{step.path_prefix}'")
    problems = []
    for tenant_id, cfg in tenants.configs.items():
        if cfg.auth is None or cfg.allow_unauthenticated:
            continue
        reached = list(methods)
        if tenants.default_tenant == tenant_id:
            reached.append("default_tenant")
        if not reached:
            continue
        problems.append(
            doc.problem(
                ("tenants", "configs", tenant_id, "auth"),
                f"tenant '{tenant_id}' has managed auth and can be reached without a key by "
                f"{' and '.join(reached)} resolution: list who may in server.trusted_networks, "
                "or set allow_unauthenticated: true on the tenant",
            )
        )
    return problems
