"""The console's five-minute window over real prometheus_client metrics, the health rules,
Redis-shared fleet traffic (real redis-server), and the audit digest over real trails."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from checkstream.audit.trail import append_records
from checkstream.config.model import AuditConfig
from checkstream.console.audit_digest import KEPT, AuditDigest
from checkstream.console.fleet_traffic import FleetTraffic
from checkstream.console.traffic import (
    NO_TRAFFIC,
    TrafficWindow,
    WindowStats,
    health,
    quantile,
    sample_from,
)
from checkstream.ops.metrics import LATENCY_BUCKETS_MS
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture is used by name


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "checkstream_requests_total", "", ["tenant", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "checkstream_latency_ms", "", ["tenant", "phase"],
            buckets=LATENCY_BUCKETS_MS, registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter(
            "checkstream_tokens_total", "", ["tenant", "model", "direction"], registry=self.registry
        )

    def sample(self, at: float) -> object:
        return sample_from(self.registry.collect(), at)


def test_quantile_interpolates_within_the_bucket_like_prometheus() -> None:
    bounds = len(LATENCY_BUCKETS_MS) + 1
    # 100 observations, all in the (10, 25] bucket: p95 is 95% of the way through it.
    counts = [0.0] * bounds
    index = LATENCY_BUCKETS_MS.index(25.0)
    for i in range(index, bounds):
        counts[i] = 100.0
    assert quantile(0.95, tuple(counts)) == pytest.approx(10 + 15 * 0.95)
    assert quantile(0.95, (0.0,) * bounds) is None
    # Everything above the last finite bound: the bound itself, as histogram_quantile does.
    overflow = (0.0,) * (bounds - 1) + (5.0,)
    assert quantile(0.95, overflow) == LATENCY_BUCKETS_MS[-1]


def test_the_window_is_the_difference_between_samples() -> None:
    metrics = Metrics()
    window = TrafficWindow()
    metrics.requests.labels("acme", "200").inc(1000)  # before the console started: not counted
    window.add(metrics.sample(0.0))  # type: ignore[arg-type]
    assert window.stats() == {}  # one sample is no window
    for _ in range(57):
        metrics.requests.labels("acme", "200").inc()
        metrics.latency.labels("acme", "total").observe(30.0)
        metrics.latency.labels("acme", "ingress").observe(3.0)
    for _ in range(3):
        metrics.requests.labels("acme", "503").inc()
    metrics.requests.labels("acme", "429").inc(10)  # refusals are not errors
    metrics.tokens.labels("acme", "gpt-4o", "input").inc(500)
    window.add(metrics.sample(120.0))  # type: ignore[arg-type]
    stats = window.stats()["acme"]
    assert stats.requests == 70
    assert stats.rpm == pytest.approx(35.0)
    assert stats.error_rate == pytest.approx(3 / 70)
    assert stats.p95_ms is not None and 25 < stats.p95_ms <= 50
    assert stats.p95_check_ms is not None and 2.5 < stats.p95_check_ms <= 5
    assert stats.requests_last_minute == 70  # the minute's baseline is the first sample
    assert stats.tokens_last_minute == 500


def test_the_window_keeps_five_minutes() -> None:
    metrics = Metrics()
    window = TrafficWindow(window_s=300)
    for minute in range(11):
        metrics.requests.labels("acme", "200").inc(60 if minute < 5 else 6)
        window.add(metrics.sample(minute * 60.0))  # type: ignore[arg-type]
    stats = window.stats()["acme"]
    # The last five minutes had 6 requests a minute; the busy start has left the window.
    assert stats.rpm == pytest.approx(6.0)
    assert stats.requests_last_minute == 6


def _stats(requests: float, errors: float, check_ms: float) -> WindowStats:
    metrics = Metrics()
    window = TrafficWindow()
    window.add(metrics.sample(0))  # type: ignore[arg-type]
    metrics.requests.labels("t", "200").inc(requests - errors)
    if errors:
        metrics.requests.labels("t", "500").inc(errors)
    for _ in range(int(requests)):
        metrics.latency.labels("t", "ingress").observe(check_ms)
    window.add(metrics.sample(60))  # type: ignore[arg-type]
    return window.stats()["t"]


@pytest.mark.parametrize(
    ("requests", "errors", "check_ms", "expected"),
    [
        (100, 0, 5.0, "healthy"),
        (100, 1, 5.0, "degraded"),  # 1% errors
        (100, 5, 5.0, "critical"),  # 5%
        (100, 0, 400.0, "degraded"),  # check p95 in (250, 500]
        (100, 0, 2000.0, "critical"),
        (1, 1, 5.0, "critical"),  # the only request failed
    ],
)
def test_health_thresholds(requests: float, errors: float, check_ms: float, expected: str) -> None:
    assert health(_stats(requests, errors, check_ms)) == expected


def test_no_traffic_is_idle() -> None:
    assert health(None) == "idle"
    assert health(NO_TRAFFIC) == "idle"


async def test_fleet_traffic_sums_the_replicas_through_redis(redis_server: RedisServer) -> None:
    url = redis_server.url
    a, b = FleetTraffic(url, "replica-a"), FleetTraffic(url, "replica-b")
    one = _stats(100, 1, 5.0)
    two = _stats(100, 9, 5.0)
    now = time.time()
    try:
        await a.exchange({"t": one}, now)
        totals, replicas = await b.exchange({"t": two}, now + 1)
        assert replicas == 2
        assert totals["t"].requests == 200
        assert totals["t"].error_rate == pytest.approx(0.05)
        assert totals["t"].rpm == pytest.approx(one.rpm + two.rpm)
        # A replica that stopped writing drops out of the sums.
        totals, replicas = await b.exchange({"t": two}, now + 60)
        assert replicas == 1 and totals["t"].requests == 100
    finally:
        await a.aclose()
        await b.aclose()


def _trigger(moment: datetime, rule: str, excerpt: str | None = None) -> dict[str, object]:
    record: dict[str, object] = {
        "time": moment.isoformat().replace("+00:00", "Z"), "type": "trigger",
        "phase": "ingress", "rule": rule, "action": "block", "classifier": "kw",
        "score": 0.93, "regulation": "Reg 1", "request_id": f"req-{rule}",
    }  # fmt: skip
    if excerpt is not None:
        record["excerpt"] = excerpt
    return record


def _write(trail: Path, records: list[dict[str, object]]) -> None:
    trail.mkdir(parents=True, exist_ok=True)
    append_records(trail, [(datetime.fromisoformat(str(r["time"])).date(), r) for r in records])


def test_the_digest_counts_the_last_24_hours_and_reads_only_what_is_new(tmp_path: Path) -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    trail = tmp_path / "acme"
    _write(trail, [
        _trigger(now - timedelta(hours=30), "old"),
        _trigger(now - timedelta(hours=20), "yesterday"),
        {"time": (now - timedelta(hours=1)).isoformat(), "type": "request", "status": 200},
        _trigger(now - timedelta(minutes=5), "recent", excerpt="secret prompt words"),
    ])  # fmt: skip
    dirs = {"acme": (trail, AuditConfig(include_content=False))}
    digest = AuditDigest()
    digest.refresh(dirs, now.timestamp())
    assert digest.count_24h("acme", now.timestamp()) == 2
    recent = digest.recent("acme")
    assert [t.rule for t in recent][:2] == ["recent", "yesterday"]
    assert recent[0].excerpt is None  # this tenant's audit holds no text
    assert digest.count_24h("nobody", now.timestamp()) is None

    _write(trail, [_trigger(now, "new")])
    digest.refresh(dirs, now.timestamp())
    assert digest.count_24h("acme", now.timestamp()) == 3
    assert digest.recent("acme")[0].rule == "new"
    # Hours later the first ones have left the window.
    later = (now + timedelta(hours=23)).timestamp()
    digest.refresh(dirs, later)
    assert digest.count_24h("acme", later) == 2


def test_the_digest_shows_excerpts_only_when_the_audit_includes_them(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    trail = tmp_path / "acme"
    _write(trail, [_trigger(now, "r", excerpt="about [EMAIL] and falcon")])
    digest = AuditDigest()
    digest.refresh({"acme": (trail, AuditConfig(include_content=True))}, now.timestamp())
    assert digest.recent("acme")[0].excerpt == "about [EMAIL] and falcon"


def test_the_digest_reads_every_replicas_day_files_and_keeps_a_bounded_list(
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC)
    trail = tmp_path / "acme"
    trail.mkdir()
    day = date.today().isoformat()
    for replica in ("pod-a", "pod-b"):
        lines = [json.dumps(_trigger(now, f"{replica}-{i}"), separators=(",", ":"))
                 for i in range(KEPT)]  # fmt: skip
        (trail / f"{day}.{replica}.jsonl").write_text("\n".join(lines) + "\n")
    (trail / f"{day}.partial.jsonl").write_text('{"type":"trigger","time":')  # being written
    digest = AuditDigest()
    digest.refresh({"acme": (trail, AuditConfig())}, now.timestamp())
    assert digest.count_24h("acme", now.timestamp()) == 2 * KEPT
    assert len(digest.recent("acme")) == KEPT


def test_counted_headroom_takes_the_tightest_of_the_last_minute() -> None:
    from checkstream.config.model import RateLimitConfig
    from checkstream.console.collector import counted_headroom

    metrics = Metrics()
    window = TrafficWindow()
    window.add(metrics.sample(0))  # type: ignore[arg-type]
    metrics.requests.labels("t", "200").inc(30)
    metrics.tokens.labels("t", "gpt-4o", "output").inc(9000)
    window.add(metrics.sample(60))  # type: ignore[arg-type]
    stats = window.stats()["t"]
    limits = RateLimitConfig(requests_per_minute=100, tokens_per_minute=10000)
    headroom = counted_headroom(limits, stats)
    assert headroom is not None
    assert (headroom.limit_name, headroom.remaining, headroom.exact) == (
        "tokens_per_minute",
        1000,
        False,
    )
    assert headroom.share == pytest.approx(0.1)
    assert counted_headroom(RateLimitConfig(), stats) is None  # no limit, no headroom
    idle = counted_headroom(RateLimitConfig(requests_per_minute=100), None)
    assert idle is not None and idle.share == 1.0
