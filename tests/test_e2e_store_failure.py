"""End to end: ``audit.on_store_failure: refuse`` fails closed when records cannot be written.

Real Envoy + extproc + demo upstream; the stores are broken for real, without root:

- an audit directory replaced by a file (every append to that trail fails);
- the worker's file size limit (RLIMIT_FSIZE, set with prlimit on our own child process)
  lowered to one byte: every write to the ledger and the trails fails with EFBIG, as on a
  full disk.

Tenants: ``strict`` and ``strict-anthropic`` refuse, ``lenient`` serves (the default).
"""

from __future__ import annotations

import json
import resource
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from checkstream.audit.verify import verify
from tests.support import (
    DemoUpstreamThread,
    Gateway,
    Reply,
    child_processes,
    gateway_ports,
    request,
    running_gateway,
    write_config,
)

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Stack:
    gateway: Gateway
    directory: Path

    def trail(self, tenant: str) -> Path:
        return self.directory / "audit" / tenant

    def worker_pid(self) -> int:
        workers = [
            pid
            for pid, cmd in child_processes(self.gateway.process.pid).items()
            if "checkstream.cli.main serve" in cmd
        ]
        assert len(workers) == 1, workers
        return workers[0]

    def ledger_statuses(self, tenant: str) -> list[int]:
        conn = sqlite3.connect(self.directory / "usage.db")
        try:
            rows = conn.execute(
                "SELECT status FROM usage WHERE tenant = ? ORDER BY time", (tenant,)
            ).fetchall()
        finally:
            conn.close()
        return [status for (status,) in rows]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    demo = DemoUpstreamThread().start()
    directory = tmp_path_factory.mktemp("store-failure")
    openai = f"http://127.0.0.1:{demo.port}/v1"
    refuse = {"enabled": True, "on_store_failure": "refuse"}
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", **gateway_ports(), "extproc_workers": 1},
        "usage": {"path": "./usage.db"},
        "tenants": {
            "resolution": [{"header": "X-Tenant-ID"}],
            "configs": {
                "strict": {"backend_url": openai, "audit": refuse},
                "strict-anthropic": {
                    "backend_url": f"http://127.0.0.1:{demo.port}",
                    "streaming_format": "anthropic",
                    "audit": refuse,
                },
                "lenient": {"backend_url": openai, "audit": {"enabled": True}},
            },
        },
    }
    try:
        with running_gateway(write_config(directory, config)) as gw:
            yield Stack(gw, directory)
    finally:
        demo.stop()


def _ask(stack: Stack, tenant: str) -> Reply:
    if tenant == "strict-anthropic":
        body: dict[str, Any] = {
            "model": "checkstream-demo",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hello"}],
        }
        path = "/v1/messages"
    else:
        body = {"model": "checkstream-demo", "messages": [{"role": "user", "content": "hello"}]}
        path = "/v1/chat/completions"
    return request(f"{stack.gateway.url}{path}", body, {"X-Tenant-ID": tenant})


def _refused_openai(reply: Reply) -> None:
    assert reply.status == 503, (reply.status, reply.body)
    error = reply.json()["error"]
    assert error["code"] == "store_unavailable"
    assert "cannot be written" in error["message"]


def test_a_broken_audit_directory_refuses_that_tenant_only(stack: Stack) -> None:
    for tenant in ("strict", "strict-anthropic", "lenient"):
        assert _ask(stack, tenant).status == 200
    trail = stack.trail("strict")
    aside = trail.with_name("strict.aside")
    trail.rename(aside)
    trail.write_text("a file where the trail's directory was\n")
    try:
        # Served: its records fail at its end (a response on its way cannot be recalled).
        assert _ask(stack, "strict").status == 200
        _refused_openai(_ask(stack, "strict"))
        _refused_openai(_ask(stack, "strict"))
        # Other tenants, whose trails are fine, are served.
        assert _ask(stack, "strict-anthropic").status == 200
        assert _ask(stack, "lenient").status == 200
    finally:
        trail.unlink()
        aside.rename(trail)
    # The next refused request's own records land, which lifts the refusal.
    _refused_openai(_ask(stack, "strict"))
    assert _ask(stack, "strict").status == 200
    statuses = [r["status"] for r in _records(trail) if r["type"] == "request"]
    assert statuses == [200, 503, 200]
    assert verify(trail).ok
    assert stack.ledger_statuses("strict") == [200, 200, 503, 503, 503, 200]


def test_a_full_disk_refuses_strict_tenants_and_serves_the_others(stack: Stack) -> None:
    pid = stack.worker_pid()
    limits = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    before = {t: len(stack.ledger_statuses(t)) for t in ("strict", "strict-anthropic", "lenient")}
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, limits[1]))
    try:
        # The default serves and counts the failure; the ledger is now known to fail.
        assert _ask(stack, "lenient").status == 200
        assert _ask(stack, "lenient").status == 200
        _refused_openai(_ask(stack, "strict"))
        anthropic = _ask(stack, "strict-anthropic")
        assert anthropic.status == 503
        assert anthropic.json()["type"] == "error"
        assert anthropic.json()["error"]["message"] == (
            "the usage ledger cannot be written, so the request was not processed"
        )
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
    # Space again. Each refused request's own records are the probe: the first that lands
    # lifts its tenant's refusal (each strict tenant's trail failed on its own).
    for tenant in ("strict", "strict-anthropic"):
        assert _ask(stack, tenant).status == 503
        assert _ask(stack, tenant).status == 200
    after = {t: stack.ledger_statuses(t)[n:] for t, n in before.items()}
    # What was written while the disk was full is lost; everything after it is there.
    assert after == {"strict": [503, 200], "strict-anthropic": [503, 200], "lenient": []}
    for tenant in ("strict", "strict-anthropic", "lenient"):
        assert verify(stack.trail(tenant)).ok


def _records(trail: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for file in sorted(trail.glob("*.jsonl"))
        for line in file.read_text().splitlines()
    ]
