"""The console of one replica shows and acts on the whole fleet: two real gateways (Envoy +
extproc each) on one real redis-server, the demo upstream, traffic through both listeners."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.console_gateway import Operator, console_config, gateway_env
from tests.redis_server import RedisServer, redis_server
from tests.support import DemoUpstreamThread, Gateway, Reply, request, start_gateway, wait_until
from tests.test_console import _rows

__all__ = ["redis_server"]  # the fixture is used by name

pytestmark = pytest.mark.e2e


@dataclass
class Replica:
    gateway: Gateway
    console: str

    def chat(self, tenant: str) -> Reply:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
        return request(self.gateway.url + "/v1/chat/completions", body, {"X-Tenant-ID": tenant})


def _replica(directory: Path, redis_url: str, demo: DemoUpstreamThread, name: str) -> Replica:
    config = console_config(directory, demo.port)
    data = yaml.safe_load(config.read_text())
    data["limits"] = {"backend": "redis", "url": redis_url}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    gateway = start_gateway(config, {**gateway_env(), "CHECKSTREAM_REPLICA": name})
    return Replica(gateway, f"http://127.0.0.1:{data['server']['admin_port']}/ui/")


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[tuple[Replica, Replica]]:
    demo = DemoUpstreamThread().start(chunk_delay_ms=1)
    a = _replica(tmp_path_factory.mktemp("a"), redis_server.url, demo, "replica-a")
    try:
        b = _replica(tmp_path_factory.mktemp("b"), redis_server.url, demo, "replica-b")
    except BaseException:
        a.gateway.stop()
        raise
    yield a, b
    a.gateway.stop()
    b.gateway.stop()
    demo.stop()


def test_one_replicas_console_shows_the_fleets_traffic_and_headroom(
    fleet: tuple[Replica, Replica],
) -> None:
    a, b = fleet
    for _ in range(20):
        assert b.chat("umbrella").status == 200  # only through replica b
        assert b.chat("globex").status == 200
    operator = Operator(a.console)

    def fleet_view() -> bool:
        page = operator.get("")
        rows = _rows(page)
        return "fleet of 2 replicas" in page and float(rows["umbrella"]["rpm"]) > 0

    # Both replicas refresh every 10 s; then a's overview holds b's traffic.
    assert wait_until(fleet_view, timeout=40)
    rows = _rows(operator.get(""))
    # Headroom read from the shared limiter (exact, no "*"), not counted from metrics.
    assert rows["globex"]["headroom"].endswith("requests/min")
    assert rows["umbrella"]["headroom"] == "no limit"


def test_a_suspension_from_one_console_holds_on_every_replica(
    fleet: tuple[Replica, Replica],
) -> None:
    a, b = fleet
    operator_a, operator_b = Operator(a.console), Operator(b.console)
    assert a.chat("hooli").status == 200 and b.chat("hooli").status == 200
    assert operator_a.post("tenants/hooli/suspend", {}) == 200  # 303, followed
    started = time.monotonic()
    assert wait_until(lambda: b.chat("hooli").status == 403, timeout=5)
    assert time.monotonic() - started < 2
    assert a.chat("hooli").status == 403
    # Replica b's console reads the suspension from Redis and can lift it.
    assert "suspended (admin)" in operator_b.get("tenants/hooli")
    assert operator_b.post("tenants/hooli/resume", {}) == 200
    assert wait_until(lambda: a.chat("hooli").status == 200, timeout=5)
