"""Budget alerts against a real HTTP receiver and a real redis-server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from checkstream.accounting.budget_alerts import BudgetAlerts, MemoryClaims, RedisClaims
from checkstream.audit.trail import AuditLog
from checkstream.config.model import TenantConfig
from checkstream.limits.decisions import NANO
from checkstream.ops.metrics import BUDGET_USED
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]


@dataclass
class Receiver:
    """A webhook receiver that fails its first ``failures`` POSTs with 503."""

    failures: int = 0
    posts: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.failures:
            return web.Response(status=503)
        self.posts.append(await request.json())
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{secret}", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.url = f"http://127.0.0.1:{port}/hook/s3cret-token"
    yield found
    await runner.cleanup()


def config(url: str, monthly: float = 10.0, at: list[int] | None = None) -> TenantConfig:
    alerts: dict[str, Any] = {"webhook_url": url}
    if at is not None:
        alerts["at_percent"] = at
    return TenantConfig.model_validate(
        {
            "backend_url": "http://127.0.0.1:9",
            "budget": {"monthly_usd": monthly, "daily_usd": 2, "alerts": alerts},
        }
    )


async def settle(alerts: BudgetAlerts) -> None:
    """Wait for deliveries in flight."""
    for _ in range(200):
        if not alerts._deliveries:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("deliveries still running")


def trail(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for f in sorted(directory.glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]


async def test_one_post_per_threshold_per_period_retried_and_audited(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.failures = 2  # the receiver is down for the first two attempts
    audit = AuditLog({"acme": tmp_path / "trail"})
    alerts = BudgetAlerts(MemoryClaims(), audit, backoff_s=0.02)
    cfg = config(receiver.url)
    try:
        for spent in (4.0, 5.5, 6.0, 8.5, 8.6, 12.0, 13.0):
            await alerts.spent("acme", cfg, "monthly", "2026-03", round(spent * NANO))
        await alerts.spent("acme", cfg, "daily", "2026-03-14", NANO)  # half the day's $2
        await alerts.spent("acme", cfg, "monthly", "2026-04", 6 * NANO)  # a new month
        await settle(alerts)
    finally:
        await alerts.aclose()
        await audit.aclose()
    got = sorted((p["period"], p["percent"]) for p in receiver.posts)
    assert got == [
        ("2026-03", 50),
        ("2026-03", 80),
        ("2026-03", 100),
        ("2026-03-14", 50),
        ("2026-04", 50),
    ]
    first = next(p for p in receiver.posts if p["period"] == "2026-03" and p["percent"] == 50)
    assert first == {
        "tenant": "acme", "period": "2026-03", "percent": 50, "spent": 5.5, "budget": 10.0,
    }  # fmt: skip
    assert receiver.attempts == 5 + 2
    records = [r for r in trail(tmp_path / "trail") if r["type"] == "budget_alert"]
    assert len(records) == 5
    assert all(r["delivered"] and r["webhook_host"] == "127.0.0.1" for r in records)
    # Deliveries run side by side: the two 503s cost retries, counted where they happened.
    assert sum(r["attempts"] for r in records) == receiver.attempts
    assert "s3cret-token" not in json.dumps(records)
    assert BUDGET_USED.labels("acme", "monthly")._value.get() == pytest.approx(0.6)


async def test_a_receiver_down_for_good_is_recorded_as_undelivered(tmp_path: Path) -> None:
    audit = AuditLog({"acme": tmp_path / "trail"})
    alerts = BudgetAlerts(MemoryClaims(), audit, backoff_s=0.01)
    try:
        await alerts.spent("acme", config("http://127.0.0.1:9/hook", at=[10]), "monthly", "p", NANO)
        await settle(alerts)
    finally:
        await alerts.aclose()
        await audit.aclose()
    [record] = trail(tmp_path / "trail")
    assert (record["delivered"], record["attempts"], record["status"]) == (False, 6, None)
    assert record["error"] == "ClientConnectorError"


async def test_replicas_sharing_redis_send_each_threshold_once(
    receiver: Receiver, redis_server: RedisServer, tmp_path: Path
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    audit = AuditLog({})
    replicas = [BudgetAlerts(RedisClaims(redis_server.url), audit) for _ in range(3)]
    cfg = config(receiver.url, at=[25, 50, 75, 100])
    try:
        await asyncio.gather(
            *(
                replicas[i % 3].spent(tenant, cfg, "monthly", "2026-03", (i + 1) * NANO)
                for i in range(12)
            )
        )
        for replica in replicas:
            await settle(replica)
    finally:
        for replica in replicas:
            await replica.aclose()
        await audit.aclose()
    assert sorted(p["percent"] for p in receiver.posts) == [25, 50, 75, 100]
