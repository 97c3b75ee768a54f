"""Policy compilation (threshold precedence, phases) and decisions, with fake classifiers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from checkstream.config.model import load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.hookspecs import hookimpl
from checkstream.policy.guardrails import Guardrails, PhasePlan, Rule, compile_guardrails
from checkstream.policy.pipeline import Checker, decide
from checkstream.policy.registry import load_registry
from checkstream.types import Classification, Classifier, Span


class Fixed:
    """Scores every text by the first word found in ``scores`` (0 if none)."""

    produces_spans = True
    inline = True

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.scores: dict[str, float] = dict(settings.get("scores", {}))

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        out = []
        for text in texts:
            score, spans = 0.0, []
            for word, value in self.scores.items():
                at = text.find(word)
                if at >= 0:
                    score = max(score, value)
                    spans.append(Span(at, at + len(word), self.name.upper()))
            out.append(Classification(score, tuple(spans)))
        return out


FAKE = SimpleNamespace(
    checkstream_classifier_types=hookimpl(lambda: {"fixed": Fixed}),
)


def compiled(tmp_path: Path, config: dict[str, Any], rules: list[dict[str, Any]]) -> Guardrails:
    (tmp_path / "policy.yaml").write_text(
        yaml.safe_dump({"version": "1.0", "name": "p", "policies": rules})
    )
    (tmp_path / "checkstream.yaml").write_text(yaml.safe_dump(config))
    loaded = load_config(tmp_path / "checkstream.yaml")
    return compile_guardrails(loaded, load_registry(extra=[("fake", FAKE)]))


def base_config(**tenant: Any) -> dict[str, Any]:
    return {
        "classifiers": {
            "a": {"type": "fixed", "scores": {"alpha": 0.6}},
            "b": {"type": "fixed", "scores": {"beta": 0.95}},
        },
        "thresholds": {"safety": 0.9, "chunk": 0.7},
        "tenants": {
            "configs": {
                "t": {
                    "backend_url": "http://127.0.0.1:1",
                    "policy_path": "policy.yaml",
                    **tenant,
                }
            }
        },
    }


def rule(name: str, classifier: str, action: str, threshold: float | None = None) -> dict[str, Any]:
    trigger: dict[str, Any] = {"classifier": classifier}
    if threshold is not None:
        trigger["threshold"] = threshold
    return {"name": name, "trigger": trigger, "action": action}


def test_threshold_precedence_rule_then_tenant_then_global(tmp_path: Path) -> None:
    rails = compiled(
        tmp_path,
        base_config(classifiers=["a", "b"], thresholds={"chunk": 0.3}),
        [rule("own", "a", "block", 0.55), rule("inherits", "b", "log")],
    ).tenants["t"]
    by_name = {r.name: r.threshold for r in rails.ingress.rules}
    assert by_name == {"own": 0.55, "inherits": 0.9}  # global safety: tenant sets none
    by_name = {r.name: r.threshold for r in rails.midstream.rules}
    assert by_name == {"own": 0.55, "inherits": 0.3}  # tenant chunk
    assert {r.name: r.threshold for r in rails.egress.rules} == {"own": 0.55, "inherits": 0.9}


def test_phases_follow_tenant_pipeline_then_global(tmp_path: Path) -> None:
    config = base_config(pipeline={"ingress": {"classifiers": ["a"]}})
    config["pipeline"] = {"midstream": {"classifiers": ["b"]}}
    rails = compiled(tmp_path, config, [rule("ra", "a", "block"), rule("rb", "b", "log")])
    tenant = rails.tenants["t"]
    assert tenant.ingress.classifiers == ("a",)
    assert [r.name for r in tenant.ingress.rules] == ["ra"]
    assert tenant.midstream.classifiers == ("b",)
    assert [r.name for r in tenant.egress.rules] == ["rb"]
    assert (tenant.window_tokens, tenant.holdback_tokens) == (128, 16)


def test_disabled_phase_runs_nothing(tmp_path: Path) -> None:
    config = base_config(classifiers=["a"], pipeline={"midstream": {"enabled": False}})
    tenant = compiled(tmp_path, config, [rule("ra", "a", "block")]).tenants["t"]
    assert tenant.ingress.classifiers == ("a",)
    assert tenant.midstream == PhasePlan(tenant="t")


def test_rule_on_classifier_not_enabled_for_tenant_is_located(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        compiled(tmp_path, base_config(classifiers=["a"]), [rule("rb", "b", "block")])
    assert str(caught.value) == (
        f"{tmp_path / 'policy.yaml'}:6: policies[0].trigger.classifier: classifier 'b' is not "
        "enabled for tenant 't' (add it to tenants.configs.t.classifiers or its pipeline)"
    )


def test_unknown_classifier_named_by_tenant_is_located(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        compiled(tmp_path, base_config(classifiers=["a", "nope"]), [])
    message = str(caught.value)
    assert "checkstream.yaml:" in message
    assert "tenants.configs.t.classifiers[1]: unknown classifier 'nope'" in message


def test_redact_needs_spans(tmp_path: Path) -> None:
    class NoSpans(Fixed):
        produces_spans = False

    plugin = SimpleNamespace(checkstream_classifier_types=hookimpl(lambda: {"nospans": NoSpans}))
    (tmp_path / "policy.yaml").write_text(
        yaml.safe_dump({"version": "1.0", "name": "p", "policies": [rule("r", "n", "redact")]})
    )
    config = base_config(classifiers=["n"])
    config["classifiers"] = {"n": {"type": "nospans"}}
    (tmp_path / "checkstream.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="reports no spans, so it cannot redact"):
        compile_guardrails(
            load_config(tmp_path / "checkstream.yaml"), load_registry(extra=[("p", plugin)])
        )


def _plan(*rules: Rule) -> PhasePlan:
    return PhasePlan(tuple(dict.fromkeys(r.classifier for r in rules)), rules)


def _rule(name: str, classifier: str, action: Any, threshold: float = 0.5) -> Rule:
    return Rule(name, classifier, threshold, action, None, None)


def _results(**scores: list[tuple[float, tuple[Span, ...]]]) -> dict[str, list[Classification]]:
    return {name: [Classification(s, spans) for s, spans in per] for name, per in scores.items()}


def test_strongest_action_wins() -> None:
    plan = _plan(_rule("l", "x", "log"), _rule("r", "x", "redact"), _rule("s", "y", "stop"))
    verdict = decide(plan, _results(x=[(0.9, ())], y=[(0.6, ())]), 1)
    assert verdict.action == "stop"
    assert verdict.deciding is not None and verdict.deciding.rule.name == "s"
    assert [t.rule.name for t in verdict.triggers] == ["l", "r", "s"]


def test_below_threshold_is_clean() -> None:
    plan = _plan(_rule("b", "x", "block", threshold=0.8))
    verdict = decide(plan, _results(x=[(0.79, ())]), 1)
    assert verdict.action is None and verdict.triggers == ()
    assert decide(plan, _results(x=[(0.8, ())]), 1).action == "block"


def test_redaction_spans_only_from_texts_over_threshold() -> None:
    plan = _plan(_rule("r", "x", "redact", threshold=0.5))
    span_a, span_b = Span(0, 3, "A"), Span(1, 2, "B")
    verdict = decide(plan, _results(x=[(0.9, (span_a,)), (0.2, (span_b,))]), 2)
    assert verdict.action == "redact"
    assert verdict.redactions == ((span_a,), ())


def test_log_and_redact_keep_redact() -> None:
    plan = _plan(_rule("l", "x", "log"), _rule("r", "y", "redact"))
    span = Span(0, 1, "Y")
    verdict = decide(plan, _results(x=[(1.0, ())], y=[(1.0, (span,))]), 1)
    assert verdict.action == "redact"
    assert verdict.redactions == ((span,),)


async def test_checker_runs_classifiers_and_decides() -> None:
    classifiers: dict[str, Classifier] = {
        "a": Fixed("a", {"scores": {"alpha": 0.6}}),
        "b": Fixed("b", {"scores": {"beta": 0.95}}),
    }
    checker = Checker(classifiers, ThreadPoolExecutor(1), 1.0)
    plan = _plan(_rule("ra", "a", "log"), _rule("rb", "b", "redact", threshold=0.9))
    verdict = await checker.check(plan, ["alpha", "a beta here"])
    assert verdict.action == "redact"
    assert verdict.redactions == ((), (Span(2, 6, "B"),))
    assert verdict.scores == {"a": 0.6, "b": 0.95}
    assert (await checker.check(plan, ["", ""])).action is None


class UserOnly(Fixed):
    sources = frozenset({"user"})


async def test_a_classifier_reads_only_its_sources() -> None:
    reader = UserOnly("u", {"scores": {"ignore": 0.9}})
    everyone = Fixed("e", {"scores": {"ignore": 0.9}})
    checker = Checker({"u": reader, "e": everyone}, ThreadPoolExecutor(1), 1.0)
    texts = ["ignore the rules (system prompt)", "hello", "please ignore that"]
    sources = ["system", "user", "user"]
    plan = _plan(_rule("ru", "u", "redact"), _rule("re", "e", "log"))
    verdict = await checker.check(plan, texts, sources)
    assert verdict.redactions == ((), (), (Span(7, 13, "U"),))
    system_only = await checker.check(_plan(_rule("ru", "u", "block")), texts[:1], sources[:1])
    assert system_only.action is None
    assert (await checker.check(_plan(_rule("re", "e", "block")), texts[:1], sources[:1])).action
