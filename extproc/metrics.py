"""Prometheus metrics. Labels carry tenant ids, rule and classifier names: never secrets."""

from __future__ import annotations

from prometheus_client import Counter

POLICY_TRIGGERS = Counter(
    "checkstream_policy_triggers_total",
    "Policy rules triggered, by tenant, rule and action.",
    ["tenant", "rule", "action"],
)
CLASSIFIER_ERRORS = Counter(
    "checkstream_classifier_errors_total",
    "Classifier failures (raised, timed out, malformed result), by tenant and classifier.",
    ["tenant", "classifier"],
)
