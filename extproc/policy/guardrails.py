"""Policies and classifiers compiled once per config load into a per-tenant plan.

Which classifiers run in which phase, which rules watch them and at which threshold is
decided here, with every mistake reported at its file and line; nothing is re-derived
per request.

Phases: ``ingress`` checks the prompt; ``midstream`` checks streamed answers as they flow;
``egress`` checks whole (non-streamed) answers with the midstream classifiers. Threshold
precedence: the rule's own, then the tenant's ``thresholds`` (``safety`` for ingress and
egress, ``chunk`` for midstream), then the global ones.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from checkstream.config.model import (
    CheckStreamConfig,
    GlobalPhaseConfig,
    LoadedConfig,
    MidstreamConfig,
    PhaseConfig,
)
from checkstream.config.yamlsource import (
    ConfigError,
    KeyPath,
    Problem,
    YamlDocument,
    format_key_path,
)
from checkstream.formats.texts import SOURCES
from checkstream.policy.files import Action, LoadedPolicy, RuleSpec
from checkstream.policy.registry import Registry
from checkstream.types import Classifier

#: Stronger actions win when several rules trigger at once.
STRENGTH: Mapping[str, int] = {"log": 1, "redact": 2, "block": 3, "stop": 3}


@dataclass(frozen=True)
class Rule:
    name: str
    classifier: str
    threshold: float
    action: Action
    regulation: str | None
    message: str | None


@dataclass(frozen=True)
class PhasePlan:
    classifiers: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    #: Whose plan this is: large inputs take turns per tenant (``large_inputs``).
    tenant: str = ""


@dataclass(frozen=True)
class TenantGuardrails:
    ingress: PhasePlan
    midstream: PhasePlan
    egress: PhasePlan
    window_tokens: int
    holdback_tokens: int


@dataclass(frozen=True)
class Guardrails:
    classifiers: Mapping[str, Classifier]
    tenants: Mapping[str, TenantGuardrails]


def phase_classifiers(
    tenant_phase: PhaseConfig, global_phase: GlobalPhaseConfig, everywhere: Iterable[str]
) -> tuple[str, ...]:
    """A phase's classifiers for a tenant: its own list (else the global one) plus the
    tenant's ``classifiers`` shorthand; none if the phase is disabled."""
    enabled = tenant_phase.enabled if tenant_phase.enabled is not None else global_phase.enabled
    if not enabled:
        return ()
    own = tenant_phase.classifiers
    names = list(own if own is not None else global_phase.classifiers)
    names += [n for n in everywhere if n not in names]
    return tuple(names)


def compile_guardrails(loaded: LoadedConfig, registry: Registry) -> Guardrails:
    """Build every classifier the config uses and each tenant's plan; ConfigError if wrong."""
    model = loaded.model
    doc = loaded.doc
    problems: list[Problem] = []
    classifiers, broken = _build_classifiers(loaded, registry, problems)
    # Each unknown name is reported once, at its first use; broken ones at their definition.
    reported = set(broken)
    tenants: dict[str, TenantGuardrails] = {}
    for tenant_id, cfg in model.tenants.configs.items():
        ingress = phase_classifiers(cfg.pipeline.ingress, model.pipeline.ingress, cfg.classifiers)
        midstream = phase_classifiers(
            cfg.pipeline.midstream, model.pipeline.midstream, cfg.classifiers
        )
        for name in dict.fromkeys(ingress + midstream):
            if name not in classifiers and name not in reported:
                reported.add(name)
                problems.append(
                    doc.problem(
                        _where_named(model, tenant_id, name),
                        f"unknown classifier '{name}' (built-in types: {registry.describe()}; "
                        "define others under classifiers:)",
                    )
                )
        policy = loaded.policies.get(tenant_id)
        rules = _rules(
            policy, tenant_id, set(ingress) | set(midstream), classifiers, broken, problems
        )
        thresholds = cfg.thresholds
        safety = thresholds.safety if thresholds.safety is not None else model.thresholds.safety
        chunk = thresholds.chunk if thresholds.chunk is not None else model.thresholds.chunk
        tenants[tenant_id] = TenantGuardrails(
            ingress=_phase(tenant_id, ingress, rules, safety),
            midstream=_phase(tenant_id, midstream, rules, chunk),
            egress=_phase(tenant_id, midstream, rules, safety),
            window_tokens=_midstream_setting(cfg.pipeline.midstream, model, "window_tokens"),
            holdback_tokens=_midstream_setting(cfg.pipeline.midstream, model, "holdback_tokens"),
        )
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: (p.file, p.line or 0)))
    return Guardrails(classifiers, tenants)


def _where_named(model: CheckStreamConfig, tenant_id: str, name: str) -> KeyPath:
    """The key where a tenant's use of classifier ``name`` is written, for error lines."""
    cfg = model.tenants.configs[tenant_id]
    base: KeyPath = ("tenants", "configs", tenant_id)
    if name in cfg.classifiers:
        return (*base, "classifiers", cfg.classifiers.index(name))
    for phase in ("ingress", "midstream"):
        own = getattr(cfg.pipeline, phase).classifiers or []
        if name in own:
            return (*base, "pipeline", phase, "classifiers", own.index(name))
        shared = getattr(model.pipeline, phase).classifiers
        if name in shared:
            return ("pipeline", phase, "classifiers", shared.index(name))
    return base


def _midstream_setting(tenant: MidstreamConfig, model: CheckStreamConfig, key: str) -> int:
    own = getattr(tenant, key)
    return int(own if own is not None else getattr(model.pipeline.midstream, key))


def _phase(
    tenant: str, names: tuple[str, ...], rules: list[RuleSpec], default_threshold: float
) -> PhasePlan:
    chosen = tuple(
        Rule(
            r.name,
            r.trigger.classifier,
            r.trigger.threshold if r.trigger.threshold is not None else default_threshold,
            r.action,
            r.regulation,
            r.message,
        )
        for r in rules
        if r.trigger.classifier in names
    )
    return PhasePlan(names, chosen, tenant)


def _rules(
    policy: LoadedPolicy | None,
    tenant_id: str,
    enabled: set[str],
    classifiers: Mapping[str, Classifier],
    broken: set[str],
    problems: list[Problem],
) -> list[RuleSpec]:
    """The tenant's rules that can work; each one that cannot is a located problem."""
    if policy is None:
        return []
    rules = []
    for index, rule in enumerate(policy.model.policies):
        name = rule.trigger.classifier
        at: KeyPath = ("policies", index, "trigger", "classifier")
        if name in broken:
            continue  # its definition's own error is already reported
        if name not in classifiers:
            problems.append(policy.doc.problem(at, f"unknown classifier '{name}'"))
            continue
        if name not in enabled:
            problems.append(
                policy.doc.problem(
                    at,
                    f"classifier '{name}' is not enabled for tenant '{tenant_id}' (add it to "
                    f"tenants.configs.{tenant_id}.classifiers or its pipeline)",
                )
            )
            continue
        if rule.action == "redact" and not classifiers[name].produces_spans:
            problems.append(
                policy.doc.problem(
                    ("policies", index, "action"),
                    f"classifier '{name}' reports no spans, so it cannot redact; use block, "
                    "stop or log",
                )
            )
            continue
        rules.append(rule)
    return rules


def _build_classifiers(
    loaded: LoadedConfig, registry: Registry, problems: list[Problem]
) -> tuple[dict[str, Classifier], set[str]]:
    """Every instance under ``classifiers:`` plus every built-in type named by a tenant,
    and the names of those that failed to build (their problems are reported)."""
    model = loaded.model
    doc = loaded.doc
    wanted: dict[str, tuple[str, Mapping[str, Any], KeyPath]] = {}
    for name, entry in model.classifiers.items():
        wanted[name] = (entry.type, entry.settings, ("classifiers", name))
    used: set[str] = set()
    for cfg in model.tenants.configs.values():
        used.update(cfg.classifiers)
        for phase in (cfg.pipeline.ingress, cfg.pipeline.midstream):
            used.update(phase.classifiers or [])
    used.update(model.pipeline.ingress.classifiers)
    used.update(model.pipeline.midstream.classifiers)
    for policy in loaded.policies.values():
        used.update(rule.trigger.classifier for rule in policy.model.policies)
    for name in sorted(used - set(wanted)):
        if name in registry.types:
            wanted[name] = (name, {}, ())
    built: dict[str, Classifier] = {}
    for name, (type_name, settings, at) in wanted.items():
        kind = registry.types.get(type_name)
        if kind is None:
            problems.append(
                doc.problem(
                    (*at, "type"),
                    f"unknown classifier type '{type_name}' (installed: {registry.describe()})",
                )
            )
            continue
        try:
            instance = kind.factory(name, settings)
        except pydantic.ValidationError as exc:
            problems.extend(_settings_problems(doc, at, exc))
            continue
        except ValueError as exc:
            problems.append(doc.problem(at, f"invalid settings for {type_name}: {exc}"))
            continue
        except Exception as exc:
            problems.append(
                doc.problem(
                    at,
                    f"plugin '{kind.plugin}' failed to build classifier '{name}': "
                    f"{type(exc).__name__}: {exc}",
                )
            )
            continue
        missing = [a for a in ("name", "produces_spans", "classify") if not hasattr(instance, a)]
        if missing:
            problems.append(
                doc.problem(
                    at,
                    f"plugin '{kind.plugin}' returned a classifier without {', '.join(missing)}",
                )
            )
            continue
        wrong = contract_problem(instance)
        if wrong is not None:
            problems.append(doc.problem(at, f"plugin '{kind.plugin}': classifier {wrong}"))
            continue
        built[name] = instance
    return built, set(wanted) - set(built)


def contract_problem(instance: object) -> str | None:
    """What is wrong with a classifier's optional attributes, or None: a typo such as
    ``sources = {"users"}`` would otherwise switch a guardrail off without a word."""
    inline = getattr(instance, "inline", False)
    if not isinstance(inline, bool):
        return f"'inline' must be True or False, not {inline!r}"
    sources = getattr(instance, "sources", None)
    if sources is None:
        return None
    if isinstance(sources, str) or not isinstance(sources, Collection):
        return f"'sources' must be a set of {sorted(SOURCES)}, not {sources!r}"
    unknown = sorted(str(s) for s in sources if s not in SOURCES)
    if unknown:
        return f"'sources' names unknown sources {unknown} (known: {sorted(SOURCES)})"
    if not sources:
        return "'sources' is empty: the classifier would read nothing"
    return None


def _settings_problems(
    doc: YamlDocument, at: KeyPath, exc: pydantic.ValidationError
) -> list[Problem]:
    out = []
    for item in exc.errors(include_url=False):
        loc = (*at, *(p for p in item["loc"] if isinstance(p, str | int)))
        message = "unknown key" if item["type"] == "extra_forbidden" else str(item["msg"])
        if item["type"] == "missing":
            message = "required key is missing"
        out.append(Problem(str(doc.path), doc.line_of(loc), format_key_path(loc), message))
    return out
