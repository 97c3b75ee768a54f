"""Metric names and labels are a contract with dashboards; multiprocess sums are exact.

prometheus_client chooses between in-process and file-backed values when it is first
imported, from PROMETHEUS_MULTIPROC_DIR. This test process has it unset, so the
multiprocess tests run workers as real subprocesses started with the variable set, as the
launcher starts extproc workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from checkstream.ops import metrics
from checkstream.ops.metrics import model_label, render_metrics

ROOT = Path(__file__).resolve().parent.parent


def samples(body: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition body, keyed by sample name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def unique_tenant() -> str:
    # The default registry lives as long as the test process: fresh labels keep counts exact.
    return f"t-{uuid.uuid4().hex[:8]}"


def test_model_label_buckets_unknown_models() -> None:
    known = frozenset({"gpt-4o", "claude-sonnet-4"})
    assert model_label("gpt-4o", known) == "gpt-4o"
    assert model_label("gpt-4o-2099-secret-preview", known) == "other"
    assert model_label("", known) == "other"
    assert model_label("gpt-4o", frozenset()) == "other"


def test_every_metric_is_exposed_under_its_contract_name_and_labels() -> None:
    tenant = unique_tenant()
    metrics.REQUESTS.labels(tenant, "200").inc()
    metrics.LATENCY.labels(tenant, "ingress").observe(1.5)
    metrics.POLICY_TRIGGERS.labels(tenant, "no-pii", "redact").inc()
    metrics.TOKENS.labels(tenant, "gpt-4o", "input").inc(12)
    metrics.CLASSIFIER_LATENCY.labels(f"clf-{tenant}").observe(0.3)
    metrics.CLASSIFIER_ERRORS.labels(tenant, "toxicity").inc()
    metrics.RATE_LIMITED.labels(tenant, "requests_per_minute").inc()
    metrics.EXTPROC_ERRORS.labels(f"kind-{tenant}").inc()

    body, content_type = render_metrics(None)

    assert content_type.startswith("text/plain; version=0.0.4")
    got = samples(body)
    assert got[key("checkstream_requests_total", tenant=tenant, status="200")] == 1
    assert got[key("checkstream_latency_ms_count", tenant=tenant, phase="ingress")] == 1
    assert got[key("checkstream_latency_ms_sum", tenant=tenant, phase="ingress")] == 1.5
    assert (
        got[key("checkstream_policy_triggers_total", tenant=tenant, rule="no-pii", action="redact")]
        == 1
    )
    assert (
        got[key("checkstream_tokens_total", tenant=tenant, model="gpt-4o", direction="input")] == 12
    )
    assert got[key("checkstream_classifier_latency_ms_count", classifier=f"clf-{tenant}")] == 1
    assert (
        got[key("checkstream_classifier_errors_total", tenant=tenant, classifier="toxicity")] == 1
    )
    assert (
        got[key("checkstream_rate_limited_total", tenant=tenant, limit="requests_per_minute")] == 1
    )
    assert got[key("checkstream_extproc_errors_total", kind=f"kind-{tenant}")] == 1


def test_latency_buckets_span_sub_millisecond_to_long_streams() -> None:
    tenant = unique_tenant()
    for ms in (0.2, 3.0, 45_000.0):
        metrics.LATENCY.labels(tenant, "total").observe(ms)

    got = samples(render_metrics(None)[0])

    def bucket(le: str) -> float:
        return got[key("checkstream_latency_ms_bucket", tenant=tenant, phase="total", le=le)]

    assert bucket("0.25") == 1
    assert bucket("5.0") == 2
    assert bucket("30000.0") == 2
    assert bucket("60000.0") == 3
    assert bucket("+Inf") == 3


WORKER = textwrap.dedent(
    """
    import sys
    from checkstream.ops.metrics import LATENCY, REQUESTS

    count = int(sys.argv[1])
    REQUESTS.labels("acme", "200").inc(count)
    REQUESTS.labels("acme", "429").inc()
    for _ in range(count):
        LATENCY.labels("acme", "total").observe(7.0)
    """
)


def run_worker(multiproc_dir: Path, count: int) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    subprocess.run(
        [sys.executable, "-c", WORKER, str(count)], env=env, cwd=ROOT, check=True, timeout=60
    )


def test_render_metrics_sums_the_workers_files(tmp_path: Path) -> None:
    run_worker(tmp_path, 2)
    run_worker(tmp_path, 5)
    assert len(list(tmp_path.glob("*.db"))) >= 2, "each worker writes its own files"

    body, content_type = render_metrics(tmp_path)

    assert content_type.startswith("text/plain; version=0.0.4")
    got = samples(body)
    assert got[key("checkstream_requests_total", tenant="acme", status="200")] == 7
    assert got[key("checkstream_requests_total", tenant="acme", status="429")] == 2
    assert got[key("checkstream_latency_ms_count", tenant="acme", phase="total")] == 7
    assert got[key("checkstream_latency_ms_sum", tenant="acme", phase="total")] == 49.0
    bucket = key("checkstream_latency_ms_bucket", tenant="acme", phase="total", le="10.0")
    assert got[bucket] == 7


def test_render_metrics_with_a_directory_ignores_this_process(tmp_path: Path) -> None:
    tenant = unique_tenant()
    metrics.REQUESTS.labels(tenant, "200").inc()

    body, _ = render_metrics(tmp_path)

    assert tenant.encode() not in body
    assert tenant.encode() in render_metrics(None)[0]
