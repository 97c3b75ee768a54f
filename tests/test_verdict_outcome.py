"""One decision for every phase: what ingress, egress and midstream do with a verdict."""

from __future__ import annotations

import pytest

from checkstream.policy.guardrails import Rule
from checkstream.policy.pipeline import Trigger, Verdict


def _verdict(action: str | None) -> Verdict:
    if action is None:
        return Verdict()
    rule = Rule("r", "c", 0.5, action, None, None)  # type: ignore[arg-type]
    return Verdict(action=action, triggers=(Trigger(rule, 0.9),))


@pytest.mark.parametrize(
    ("action", "expected"),
    [(None, "pass"), ("log", "pass"), ("redact", "redact"), ("block", "block"), ("stop", "block")],
)
@pytest.mark.parametrize("fail_open", [False, True])
def test_each_action_has_one_outcome(action: str | None, expected: str, fail_open: bool) -> None:
    assert _verdict(action).outcome(fail_open=fail_open) == expected


def test_a_failed_check_follows_the_fail_mode() -> None:
    failed = Verdict(failure="classifier 'c': boom", failed_classifier="c")
    assert failed.outcome(fail_open=False) == "fail"
    assert failed.outcome(fail_open=True) == "pass"
