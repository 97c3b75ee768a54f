"""End to end: two replicas of one ``replicated: true`` config act as one gateway for usage,
budgets and audit.

Two launchers (``checkstream run``, each its own Envoy, extproc worker and ports, as two pods
would be), one real ``redis-server`` for limits and budgets, one real PostgreSQL for the usage
ledger, one shared directory for the audit trails, and the demo upstream, all on 127.0.0.1.
The demo upstream reports usage (one token per prompt word, one per answer piece, steered with
``x-demo-chunks``); "budget-model" costs $0.10 per token, so every amount below is exact.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.postgres_server import PostgresServer, postgres_server
from tests.redis_server import RedisServer, redis_binary
from tests.support import DemoUpstreamThread, gateway_ports, request
from tests.test_e2e_limits import (
    PRICING,
    Stack,
    _start,
    _stop,
    _tenant,
    assert_openai_error,
    chat,
    cost,
    period_now,
    reported_usage,
    tenant_info,
    usage_report,
)

__all__ = ["postgres_server"]  # the fixture is used by name

pytestmark = pytest.mark.e2e

DSN_ENV = "CHECKSTREAM_TEST_USAGE_DSN"
BUDGET_USD = 1.0
# chunks=2 with the prompt "hi": 1 + 2 tokens, $0.30 a request, so the budget does not divide
# evenly and the request that crosses it overshoots.
CHUNKS = 2
REQUEST_USD = 0.3


@dataclass(frozen=True)
class Fleet:
    a: Stack
    b: Stack
    redis_url: str
    dsn: str
    audit: Path

    @property
    def replicas(self) -> tuple[Stack, Stack]:
        return self.a, self.b


def _config(demo: DemoUpstreamThread, redis_url: str, audit: Path) -> dict[str, Any]:
    return {
        "replicated": True,
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "limits": {"backend": "redis", "url": redis_url},
        "usage": {"backend": "postgres", "url_env": DSN_ENV},
        "pricing": PRICING,
        "tenants": {
            "configs": {
                "fleet-usage": _tenant(demo),
                "fleet-budget": _tenant(demo, budget={"monthly_usd": BUDGET_USD}),
                "fleet-audit": _tenant(
                    demo, audit={"enabled": True, "path": str(audit), "shared": True}
                ),
            }
        },
    }


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer
) -> Iterator[Fleet]:
    demo = DemoUpstreamThread().start(chunk_delay_ms=1)
    # Its own Redis: the tests below FLUSHALL it.
    redis_server = RedisServer(redis_binary()).start()
    dsn = postgres_server.create_database()
    audit = tmp_path_factory.mktemp("shared-volume") / "fleet-audit"
    stacks: list[Stack] = []
    try:
        for name in ("replica-a", "replica-b"):
            env = {DSN_ENV: dsn, "CHECKSTREAM_REPLICA": name}
            directory = tmp_path_factory.mktemp(name)
            stacks.append(_start(directory, _config(demo, redis_server.url, audit), env))
        yield Fleet(stacks[0], stacks[1], redis_server.url, dsn, audit)
    finally:
        for stack in stacks:
            _stop(stack)
        redis_server.stop()
        demo.stop()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "checkstream", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _flushall(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


# -- one ledger ------------------------------------------------------------------------------
def test_both_replicas_write_one_ledger_that_usage_and_tenant_info_read(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = {"a": 0, "b": 0}
    tokens = [0, 0]
    for i in range(10):
        name, stack = ("a", fleet.a) if i % 3 else ("b", fleet.b)
        reply = chat(stack.url, "fleet-usage", f"word {i}", chunks=i + 1)
        tokens_in, tokens_out = reported_usage(reply)
        tokens[0] += tokens_in
        tokens[1] += tokens_out
        served[name] += 1
    assert served == {"a": 6, "b": 4}
    # Whichever replica's config is asked, the report is the fleet's.
    monkeypatch.setenv(DSN_ENV, fleet.dsn)
    for stack in fleet.replicas:
        (row,) = usage_report(stack.config_path, "--tenant", "fleet-usage")
        assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (10, *tokens)
        assert row["cost_usd"] == pytest.approx(cost("gpt-4o-mini", *tokens))
        usage = tenant_info(stack.url, "fleet-usage")["usage"]
        assert usage["period"] == period_now()
        assert (usage["requests"], usage["input_tokens"], usage["output_tokens"]) == (10, *tokens)


def test_a_request_id_is_billed_once(fleet: Fleet) -> None:
    import psycopg

    with psycopg.connect(fleet.dsn) as conn:
        duplicates = conn.execute(
            "SELECT tenant, request_id, COUNT(*) FROM checkstream_usage"
            " GROUP BY tenant, request_id HAVING COUNT(*) > 1"
        ).fetchall()
        rows = conn.execute("SELECT COUNT(*) FROM checkstream_usage").fetchone()
    assert duplicates == []
    assert rows is not None and rows[0] > 0


# -- budgets that hold -----------------------------------------------------------------------
def test_a_flushed_redis_reseeds_the_budget_from_the_fleets_ledger(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: after FLUSHALL each replica reseeded from its own partial ledger and
    a $1.00 budget let the fleet spend $1.56 (then $2.60 after a second flush)."""
    allowed = 0
    refused_on: set[str] = set()
    for i in range(12):
        stack = fleet.replicas[i % 2]
        reply = chat(stack.url, "fleet-budget", model="budget-model", chunks=CHUNKS)
        if reply.status == 200:
            assert reported_usage(reply) == (1, CHUNKS)
            allowed += 1
        else:
            assert_openai_error(reply, 429, "budget_exceeded")
            refused_on.add(stack.config_path.parent.name)
        # Redis loses everything mid-month while both replicas serve ($0.60 and $0.90 spent,
        # by both replicas), and once more after the budget is spent.
        if i in (1, 2, 8):
            _flushall(fleet.redis_url)
    assert len(refused_on) == 2, "both replicas refuse once the fleet's budget is spent"
    monkeypatch.setenv(DSN_ENV, fleet.dsn)
    (row,) = usage_report(fleet.a.config_path, "--tenant", "fleet-budget")
    spent = row["cost_usd"]
    assert spent == pytest.approx(allowed * REQUEST_USD)
    # Checked before it runs, charged when its cost is known: one request may cross the
    # budget, never more.
    assert BUDGET_USD <= spent <= BUDGET_USD + REQUEST_USD + 1e-9, (allowed, spent)
    assert allowed == 4  # $0.90 < $1.00 lets the fourth run: $1.20
    for stack in fleet.replicas:
        budget = tenant_info(stack.url, "fleet-budget")["budget"]
        assert budget["spent_usd"] == pytest.approx(spent)


# -- audit across replicas -------------------------------------------------------------------
def _chains(audit: Path) -> dict[str, list[str]]:
    import json

    found: dict[str, list[str]] = {}
    for path in sorted(audit.glob("*.jsonl")):
        replica = path.name.split(".")[1]
        for line in path.read_text().splitlines():
            record = json.loads(line)
            assert record["replica"] == replica, (path, record)
            found.setdefault(replica, []).append(record["request_id"])
    return found


def test_each_replica_keeps_its_own_chain_and_verify_checks_them_against_the_ledger(
    fleet: Fleet,
) -> None:
    for i in range(6):
        stack = fleet.replicas[i % 2]
        reply = request(
            f"{stack.url}/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]},
            {"X-Tenant-ID": "fleet-audit"},
        )
        assert reply.status == 200, reply.body
    chains = _chains(fleet.audit)
    assert {replica: len(ids) for replica, ids in chains.items()} == {
        "replica-a": 3,
        "replica-b": 3,
    }
    env = {DSN_ENV: fleet.dsn}
    argv = ["audit", "verify", "-c", str(fleet.a.config_path), "--tenant", "fleet-audit"]
    done = _cli(*argv, "--against-usage", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "ok: 6 records in 2 files", lines
    assert "  replica replica-a: ok, 3 records in 1 file" in lines
    assert "  replica replica-b: ok, 3 records in 1 file" in lines
    assert lines[-1].startswith("usage: all 6 ledger requests since "), lines

    # A trail cut at its end is still a valid chain; only the ledger shows the loss.
    (b_file,) = fleet.audit.glob("*.replica-b.jsonl")
    kept = b_file.read_text().splitlines(keepends=True)
    b_file.write_text("".join(kept[:-1]))
    lost = chains["replica-b"][-1]
    done = _cli(*argv, "--against-usage", env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "  replica replica-b: ok, 2 records in 1 file" in done.stdout.splitlines()
    assert "MISSING: 1 of 6 ledger requests since " in done.stdout
    assert f"  {lost} " in done.stdout
    assert _cli(*argv, env=env).returncode == 0  # the chains themselves are intact
    b_file.write_text("".join(kept))


# -- config check ----------------------------------------------------------------------------
def test_config_check_refuses_the_fleet_config_with_a_per_replica_ledger(
    fleet: Fleet, tmp_path: Path
) -> None:
    import yaml

    config = yaml.safe_load(fleet.a.config_path.read_text())
    config["usage"] = {"path": "./usage.db"}
    path = tmp_path / "per-replica.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = _cli("config", "check", str(path))
    assert done.returncode == 1
    assert "usage.backend: replicated: a SQLite ledger is per replica" in done.stderr
    assert _cli("config", "check", str(fleet.a.config_path)).returncode == 0


def test_a_gateway_whose_ledger_is_down_does_not_start_and_says_why(tmp_path: Path) -> None:
    from tests.support import refusing_port, start_gateway, write_config

    with refusing_port() as port:
        url = f"postgresql://billing:s3cret@127.0.0.1:{port}/usage"
        config = {
            "server": {"host": "127.0.0.1", **gateway_ports()},
            "usage": {"backend": "postgres", "url_env": DSN_ENV},
            "tenants": {"configs": {"acme": {"backend_url": "http://127.0.0.1:9/v1"}}},
        }
        with pytest.raises(RuntimeError, match="gateway exited with 1") as caught:
            start_gateway(write_config(tmp_path, config), env={DSN_ENV: url})
    message = str(caught.value)
    assert f"usage ledger postgresql://billing:***@127.0.0.1:{port}/usage is unavailable" in (
        message
    )
    assert "s3cret" not in message
