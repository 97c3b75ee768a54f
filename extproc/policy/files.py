"""Policy files: one per tenant, rules that turn classifier scores into actions.

This module reads and validates the file format (design.md, "Policy file"); turning rules
into per-request decisions builds on it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from checkstream.config.yamlsource import (
    ConfigError,
    Problem,
    YamlDocument,
    load_yaml,
    validation_problems,
)

Action = Literal["log", "redact", "block", "stop"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TriggerSpec(_Strict):
    classifier: Annotated[str, Field(min_length=1)]
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


class RuleSpec(_Strict):
    name: Annotated[str, Field(min_length=1)]
    trigger: TriggerSpec
    action: Action
    regulation: str | None = None
    message: str | None = None


class PolicyFile(_Strict):
    version: str
    name: str
    policies: list[RuleSpec] = []


@dataclass(frozen=True)
class LoadedPolicy:
    model: PolicyFile
    doc: YamlDocument  # to report later problems (unknown classifier) at the rule's line


def load_policy_file(path: Path) -> LoadedPolicy:
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError([doc.problem((), "expected a mapping with version, name, policies")])
    try:
        policy = PolicyFile.model_validate(doc.data)
    except pydantic.ValidationError as exc:
        raise ConfigError(validation_problems(doc, exc, PolicyFile)) from None
    seen: set[str] = set()
    problems = []
    for index, rule in enumerate(policy.policies):
        if rule.name in seen:
            problems.append(
                doc.problem(("policies", index, "name"), f"duplicate rule name '{rule.name}'")
            )
        seen.add(rule.name)
    if problems:
        raise ConfigError(problems)
    return LoadedPolicy(policy, doc)


def lint_policy_file(path: Path, known_classifiers: Collection[str]) -> list[Problem]:
    """Every problem in one policy file: syntax, schema, duplicates, unknown classifiers."""
    try:
        loaded = load_policy_file(path)
    except ConfigError as exc:
        return exc.problems
    problems = []
    for index, rule in enumerate(loaded.model.policies):
        name = rule.trigger.classifier
        if name not in known_classifiers:
            problems.append(
                loaded.doc.problem(
                    ("policies", index, "trigger", "classifier"),
                    f"unknown classifier '{name}' (known: {', '.join(sorted(known_classifiers))})",
                )
            )
    return problems
