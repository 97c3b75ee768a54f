"""deploy/grafana/checkstream.json: every query names metrics and labels the gateway exports.

The names come from extproc/ops/metrics.py's own metric objects (what ``/metrics`` serves), so
renaming a metric or a label without updating the dashboard fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter, Histogram

from checkstream.ops import metrics

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "checkstream.json"
_METRIC = re.compile(r"\bcheckstream_[a-z_]+\b")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-z_]+)\s*,\s*([a-z_]+)\s*\)")


def exported() -> dict[str, frozenset[str]]:
    """Series names /metrics serves -> their labels (``le`` on histogram buckets)."""
    found: dict[str, frozenset[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            labels = frozenset(value._labelnames)
            found[value._name + "_total"] = labels
        elif isinstance(value, Histogram):
            labels = frozenset(value._labelnames)
            found[value._name + "_bucket"] = labels | {"le"}
            found[value._name + "_sum"] = labels
            found[value._name + "_count"] = labels
    return found


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and templating query."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield (
                f"variable {variable['name']}",
                query["query"] if isinstance(query, dict) else query,
            )


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_the_dashboard_loads_and_covers_what_operators_watch() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "checkstream"
    used = {name for _, expr in queries(dashboard) for name in _METRIC.findall(expr)}
    # requests, errors, latency by phase, triggers, tokens and spend, limiter refusals
    for needed in (
        "checkstream_requests_total",
        "checkstream_latency_ms_bucket",
        "checkstream_policy_triggers_total",
        "checkstream_tokens_total",
        "checkstream_spend_usd_total",
        "checkstream_rate_limited_total",
    ):
        assert needed in used
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("where, expr", list(queries(_dashboard())))
def test_every_query_names_existing_metrics_and_labels(where: str, expr: str) -> None:
    series = exported()
    names = _METRIC.findall(expr)
    assert names, f"{where}: no checkstream metric in {expr!r}"
    for name in names:
        assert name in series, f"{where}: {name} is not exported (known: {sorted(series)})"
    # Every label the query groups by or matches on exists on each metric it reads.
    labels = set(series[names[0]]).intersection(*(series[n] for n in names))
    for group in _GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            assert label in labels, f"{where}: no label {label!r} on {names}"
    for matchers in _MATCHERS.findall(expr):
        for label in _MATCHER_LABEL.findall(matchers):
            assert label in labels, f"{where}: no label {label!r} on {names}"
    for metric, label in _LABEL_VALUES.findall(expr):
        assert label in series[metric], f"{where}: no label {label!r} on {metric}"


def test_the_checker_catches_a_wrong_name() -> None:
    with pytest.raises(AssertionError, match="not exported"):
        test_every_query_names_existing_metrics_and_labels("x", "rate(checkstream_nope_total[5m])")
    with pytest.raises(AssertionError, match="no label 'model'"):
        test_every_query_names_existing_metrics_and_labels(
            "x", "sum by (model) (rate(checkstream_requests_total[5m]))"
        )
