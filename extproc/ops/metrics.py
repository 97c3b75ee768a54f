"""Prometheus metrics. Labels carry tenant ids, rule, model and classifier names: never secrets.

One Envoy talks to several extproc worker processes, so the numbers live in those workers
while ``/metrics`` is served by the launcher. prometheus_client's multiprocess mode joins
them:

- The launcher creates a fresh, empty directory per run and puts it in every worker's
  environment as ``PROMETHEUS_MULTIPROC_DIR`` before starting it. prometheus_client picks
  its value class when it is first imported and opens the directory when a labelled
  child is first used, so setting the variable later inside a worker does nothing.
- Workers record as usual; each writes ``<type>_<pid>.db`` files into the directory.
- The launcher answers ``/metrics`` with ``render_metrics(directory)``, which sums those
  files. Files of workers that exited stay and keep counting, which is what keeps counters
  monotonic across a worker restart; a directory reused across runs would add up stale
  numbers, hence fresh per run (and removed at exit).
- Counters and histograms sum correctly across processes. A Gauge must be given a
  ``multiprocess_mode`` (``livesum``, ``max``...), and the ``live*`` modes need
  ``prometheus_client.multiprocess.mark_process_dead(pid, directory)`` when a worker dies.
  ``checkstream_budget_used_ratio`` uses ``mostrecent``: the last value any worker set.
- The process_* and python_* default collectors do not exist in multiprocess output.

Without the variable (``checkstream serve`` alone, tests), metrics stay in the process
and ``render_metrics(None)`` reads the default registry.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

# The format generate_latest writes; CONTENT_TYPE_LATEST names other formats in newer
# prometheus_client releases.
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A request phase is often well under a millisecond, while a streamed completion keeps the
# exchange open for tens of seconds.
LATENCY_BUCKETS_MS = (
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1_000.0, 2_500.0, 5_000.0, 10_000.0, 30_000.0, 60_000.0, 120_000.0,
)  # fmt: skip
# Local classifiers take fractions of a millisecond to tens; remote ones up to their timeout.
CLASSIFIER_BUCKETS_MS = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1_000.0, 2_500.0, 5_000.0,
)  # fmt: skip

REQUESTS = Counter(
    "checkstream_requests_total",
    "Requests answered, by tenant and HTTP status code.",
    ["tenant", "status"],
)
LATENCY = Histogram(
    "checkstream_latency_ms",
    "Time spent by the gateway in milliseconds, by tenant and phase "
    "(ingress, midstream, egress, total).",
    ["tenant", "phase"],
    buckets=LATENCY_BUCKETS_MS,
)
POLICY_TRIGGERS = Counter(
    "checkstream_policy_triggers_total",
    "Policy rules triggered, by tenant, rule and action.",
    ["tenant", "rule", "action"],
)
TOKENS = Counter(
    "checkstream_tokens_total",
    "Tokens seen, by tenant, model (unknown models as 'other') and direction (input, output).",
    ["tenant", "model", "direction"],
)
SPEND = Counter(
    "checkstream_spend_usd_total",
    "Cost of the tokens in USD from the price table, by tenant and model (as for tokens).",
    ["tenant", "model"],
)
CLASSIFIER_LATENCY = Histogram(
    "checkstream_classifier_latency_ms",
    "Classifier run time in milliseconds, by classifier.",
    ["classifier"],
    buckets=CLASSIFIER_BUCKETS_MS,
)
CLASSIFIER_ERRORS = Counter(
    "checkstream_classifier_errors_total",
    "Classifier failures (raised, timed out, malformed result), by tenant and classifier.",
    ["tenant", "classifier"],
)
RATE_LIMITED = Counter(
    "checkstream_rate_limited_total",
    "Requests refused by a rate limit, by tenant and limit.",
    ["tenant", "limit"],
)
ACCESS_REFUSED = Counter(
    "checkstream_access_refused_total",
    "Requests refused for where they came from, by tenant and reason "
    "(address_not_allowed, key_required).",
    ["tenant", "reason"],
)
# Every worker sees the same shared spend (Redis) or is the only one (memory): the value
# set last is the one to show.
BUDGET_USED = Gauge(
    "checkstream_budget_used_ratio",
    "Share of the budget spent in the current period, by tenant and budget (monthly, daily).",
    ["tenant", "budget"],
    multiprocess_mode="mostrecent",
)
EXTPROC_ERRORS = Counter(
    "checkstream_extproc_errors_total",
    "Failures inside the ext_proc service, by kind.",
    ["kind"],
)

OTHER_MODEL = "other"


def model_label(model: str, known: frozenset[str]) -> str:
    """The model name if configured, else "other": clients choose the string, and every
    distinct label value is a new time series kept for good."""
    return model if model in known else OTHER_MODEL


def render_metrics(multiproc_dir: Path | None) -> tuple[bytes, str]:
    """The exposition body and its content type: summed over the workers' files in
    ``multiproc_dir``, or this process's default registry when it is None."""
    if multiproc_dir is None:
        return generate_latest(REGISTRY), TEXT_CONTENT_TYPE
    # A registry per scrape: the collector reads the files anew each time.
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
    return generate_latest(registry), TEXT_CONTENT_TYPE


def metric_families(multiproc_dir: Path | None) -> list[Metric]:
    """The families ``render_metrics`` would expose, as objects (the operator console reads
    them without formatting and parsing the text)."""
    if multiproc_dir is None:
        return list(REGISTRY.collect())
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
    return list(registry.collect())
