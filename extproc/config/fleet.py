"""Config checks for where state lives: the usage ledger's backend, and what a fleet
(``replicated: true``) may not keep per replica.

Run wherever a config is loaded (CLI, launcher, workers). Several replicas of one config must
share their counts: in-process limits would grant each replica the full limit, a SQLite ledger
would split billing and seed budgets from one replica's share after a Redis flush, and an audit
path not on a shared volume would scatter the trail over machines that come and go.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from checkstream.config.yamlsource import KeyPath, Problem, YamlDocument, format_key_path
from checkstream.ops.replica import ReplicaNameError, replica_name

if TYPE_CHECKING:
    from checkstream.config.model import CheckStreamConfig


def _at(doc: YamlDocument, key_path: KeyPath, message: str) -> Problem:
    """A problem at ``key_path``; a key left to its default is located at ``replicated``."""
    line = doc.lines.get(key_path) or doc.line_of(("replicated",))
    return Problem(str(doc.path), line, format_key_path(key_path), message)


def check_usage_backend(
    doc: YamlDocument, model: CheckStreamConfig, warnings: list[str], *, require_secrets: bool
) -> list[Problem]:
    usage = model.usage
    problems: list[Problem] = []
    if usage.backend == "sqlite":
        for key in ("url", "url_env"):
            if getattr(usage, key) is not None:
                problems.append(
                    doc.problem(("usage", key), "is for backend postgres (sqlite uses path)")
                )
        return problems
    if (usage.url is None) == (usage.url_env is None):
        problems.append(
            doc.problem(
                ("usage", "backend"),
                "backend postgres needs exactly one of usage.url and usage.url_env",
            )
        )
        return problems
    if usage.url is not None and urlsplit(usage.url).password:
        warnings.append(
            str(
                doc.problem(
                    ("usage", "url"),
                    "holds a password: put the URL in an environment variable (usage.url_env)",
                )
            )
        )
    if usage.url_env is not None and not os.environ.get(usage.url_env):
        problem = doc.problem(
            ("usage", "url_env"), f"environment variable {usage.url_env} is not set"
        )
        if require_secrets:
            problems.append(problem)
        else:
            warnings.append(str(problem))
    return problems


def replication_problems(
    doc: YamlDocument, model: CheckStreamConfig, warnings: list[str]
) -> list[Problem]:
    """What ``replicated: true`` refuses, each at its own key; a replica name from the
    environment that cannot name a file."""
    problems: list[Problem] = []
    try:
        replica_name(model.server.replica, os.environ)
    except ReplicaNameError as exc:
        problems.append(doc.problem(("server", "replica"), str(exc)))
    if not model.replicated:
        return problems
    if model.limits.backend == "memory":
        problems.append(
            _at(
                doc,
                ("limits", "backend"),
                "replicated: in-memory limits are per replica (each would grant the full "
                "limit); use limits.backend: redis",
            )
        )
    if model.usage.enabled and model.usage.backend == "sqlite":
        problems.append(
            _at(
                doc,
                ("usage", "backend"),
                "replicated: a SQLite ledger is per replica (usage would be split and budgets "
                "reseeded from one replica's share); use usage.backend: postgres",
            )
        )
    for tenant_id, tenant in model.tenants.configs.items():
        audit = tenant.audit
        if audit is not None and audit.enabled and not audit.shared:
            key: KeyPath = ("tenants", "configs", tenant_id, "audit", "shared")
            line = doc.lines.get(key) or doc.line_of(key[:-1])
            problems.append(
                Problem(
                    str(doc.path),
                    line,
                    format_key_path(key),
                    "replicated: the audit path must be a volume every replica writes; "
                    "declare it with shared: true",
                )
            )
    if model.server.replica is not None:
        warnings.append(
            str(
                doc.problem(
                    ("server", "replica"),
                    "replicated: every replica reading this file takes this name and writes "
                    "the same audit chain; set CHECKSTREAM_REPLICA per replica instead",
                )
            )
        )
    return problems
