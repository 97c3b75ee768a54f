"""Daily quotas and budget alerts end to end: two replicas (each its own Envoy, extproc and
usage ledger) sharing one real redis-server, the demo upstream reporting usage, and a
recording webhook receiver."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.redis_server import RedisServer, redis_server
from tests.support import (
    DemoUpstreamThread,
    Gateway,
    RecordingUpstream,
    Reply,
    gateway_ports,
    request,
    start_gateway,
    wait_until,
    write_config,
)

__all__ = ["redis_server"]
pytestmark = pytest.mark.e2e

# One token of "budget-model" costs $0.10; the demo upstream reports "hi" as 1 prompt token
# and one answer piece (x-demo-chunks: 1) as 1 output token: $0.20 per request.
PRICING = {"budget-model": {"input": 100_000.0, "output": 100_000.0}}


@dataclass(frozen=True)
class Fleet:
    replicas: tuple[Gateway, Gateway]
    admin_ports: tuple[int, int]
    hooks: RecordingUpstream
    trails: tuple[Path, Path]
    suffix: str


def chat(gw: Gateway, tenant: str) -> Reply:
    body = {"model": "budget-model", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"X-Tenant-ID": tenant, "x-demo-chunks": "1"}
    return request(f"{gw.url}/v1/chat/completions", body, headers)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Fleet]:
    demo = DemoUpstreamThread().start(chunk_delay_ms=1)
    hooks = RecordingUpstream("hooks").start()
    # Fresh tenant names: the Redis server lives for the whole session.
    suffix = uuid.uuid4().hex[:6]
    backend = f"http://127.0.0.1:{demo.port}/v1"

    def config() -> dict[str, Any]:
        ports = gateway_ports()
        return {
            "server": {"host": "127.0.0.1", **ports},
            "limits": {"backend": "redis", "url": redis_server.url},
            "usage": {"path": "./usage.db"},
            "pricing": PRICING,
            "tenants": {
                "resolution": [{"header": "X-Tenant-ID"}],
                "configs": {
                    f"daily-{suffix}": {
                        "backend_url": backend,
                        "rate_limit": {"requests_per_day": 5, "requests_per_minute": 1000},
                    },
                    f"spender-{suffix}": {
                        "backend_url": backend,
                        "budget": {
                            "monthly_usd": 100,
                            "daily_usd": 0.5,
                            "alerts": {
                                "webhook_url": f"http://127.0.0.1:{hooks.port}/alerts/t0ken",
                                "at_percent": [50, 100],
                            },
                        },
                        "audit": {"enabled": True, "path": "./trail"},
                    },
                },
            },
        }

    dirs = [tmp_path_factory.mktemp("day-a"), tmp_path_factory.mktemp("day-b")]
    configs = [config(), config()]
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(
            lambda d_c: start_gateway(write_config(d_c[0], d_c[1])), zip(dirs, configs, strict=True)
        )
    try:
        yield Fleet(
            (a, b),
            (configs[0]["server"]["admin_port"], configs[1]["server"]["admin_port"]),
            hooks,
            (dirs[0] / "trail", dirs[1] / "trail"),
            suffix,
        )
    finally:
        for gw in (a, b):
            assert gw.stop() == 0, gw.log()
            assert "t0ken" not in gw.log()
        hooks.stop()
        demo.stop()


def test_requests_per_day_exact_across_replicas_with_the_tightest_headers(fleet: Fleet) -> None:
    tenant = f"daily-{fleet.suffix}"
    replies = [chat(fleet.replicas[i % 2], tenant) for i in range(8)]
    assert [r.status for r in replies] == [200] * 5 + [429] * 3
    # The day's 5 is a smaller share left than the minute's 1000: its headers.
    assert [r.headers["x-ratelimit-limit"] for r in replies[:5]] == ["5"] * 5
    assert [r.headers["x-ratelimit-remaining"] for r in replies[:5]] == ["4", "3", "2", "1", "0"]
    midnight = (int(time.time()) // 86400 + 1) * 86400
    for refused in replies[5:]:
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded"
        assert "(requests_per_day)" in error["message"]
        assert int(refused.headers["x-ratelimit-reset"]) == midnight
        assert abs(int(refused.headers["retry-after"]) - (midnight - time.time())) <= 5


def _gauge(admin_port: int, tenant: str) -> float | None:
    body = request(f"http://127.0.0.1:{admin_port}/metrics").body.decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "checkstream_budget_used_ratio" and sample.labels == {
                "tenant": tenant,
                "budget": "daily",
            }:
                return float(sample.value)
    return None


def _alert_records(trails: tuple[Path, Path]) -> list[dict[str, Any]]:
    found = []
    for trail in trails:
        for file in sorted(trail.glob("*.jsonl")):
            for line in file.read_text().splitlines():
                record = json.loads(line)
                if record["type"] == "budget_alert":
                    found.append(record)
    return found


def test_daily_budget_refuses_naming_it_and_alerts_once_per_threshold(fleet: Fleet) -> None:
    tenant = f"spender-{fleet.suffix}"
    a, b = fleet.replicas
    # $0.20 each: 0.2, 0.4 (50% crossed), 0.6 (100% crossed), then the day's $0.50 is spent.
    statuses = [chat(gw, tenant).status for gw in (a, b, a)]
    assert statuses == [200, 200, 200]
    refused = chat(b, tenant)
    assert refused.status == 429
    error = refused.json()["error"]
    assert (error["code"], error["message"]) == (
        "budget_exceeded",
        "the tenant's daily budget (daily_usd $0.5) is spent",
    )
    assert chat(a, tenant).status == 429
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert wait_until(lambda: len(fleet.hooks.received) >= 2, 20)
    time.sleep(0.5)  # a duplicate would arrive by now
    posts = [json.loads(r.body) for r in fleet.hooks.received]
    assert sorted(p["percent"] for p in posts) == [50, 100]
    for post in posts:
        assert (post["tenant"], post["period"], post["budget"]) == (tenant, day, 0.5)
    assert sorted(p["spent"] for p in posts) == [pytest.approx(0.4), pytest.approx(0.6)]
    assert all(r.method == "POST" and r.path == "/alerts/t0ken" for r in fleet.hooks.received)
    assert wait_until(lambda: len(_alert_records(fleet.trails)) == 2, 10)
    records = _alert_records(fleet.trails)
    assert all(r["delivered"] and r["tenant"] == tenant for r in records)
    # The third request ended on replica a: its gauge shows 0.6 of 0.5.
    assert _gauge(fleet.admin_ports[0], tenant) == pytest.approx(1.2)
