"""End to end: several replicas act as one gateway (issue #14 items 4, 5, 7; #19 item 7).

Each replica is ``checkstream run -c FILE`` (its own launcher, Envoy, extproc and ports), as
two pods would be, all on one real ``redis-server`` and the demo upstream, on 127.0.0.1.
Each replica reads its config through a ConfigMap-style directory: ``checkstream.yaml`` and
``policy.yaml`` are symlinks into ``..data``, itself a symlink to a timestamped directory
that an update replaces atomically, exactly as the kubelet does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from checkstream.accounting.suspensions import KEY as SUSPENSIONS_KEY
from checkstream.cli.main import main as checkstream
from tests.redis_server import RedisServer, redis_binary, redis_server
from tests.support import (
    DemoUpstreamThread,
    Gateway,
    Reply,
    child_processes,
    gateway_ports,
    request,
    start_gateway,
    wait_until,
)

__all__ = ["redis_server"]  # the fixture is used by name
pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "e2e-fleet-admin-token"
AUTH = {"x-checkstream-admin-token": ADMIN_TOKEN}
LEASE_S = 2.0
CONCURRENT = 2


def policy_text(walrus_action: str) -> str:
    return yaml.safe_dump(
        {
            "version": "1.0",
            "name": f"fleet-{walrus_action}",
            "policies": [
                {
                    "name": "walrus_rule",
                    "trigger": {"classifier": "kw_walrus", "threshold": 0.5},
                    "action": walrus_action,
                }
            ],
        }
    )


def tenants(demo: DemoUpstreamThread) -> dict[str, Any]:
    backend = {"backend_url": f"http://127.0.0.1:{demo.port}/v1"}
    return {
        "configs": {
            "cfg-suspended": {**backend, "suspended": True},
            "admin-suspended": dict(backend),
            "counted": dict(backend),
            "leased": {**backend, "rate_limit": {"max_concurrent_requests": CONCURRENT}},
            "guarded": {**backend, "policy_path": "policy.yaml", "classifiers": ["kw_walrus"]},
        }
    }


def config_text(redis_url: str, demo: DemoUpstreamThread, state: Path, **extra: Any) -> str:
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "limits": {"backend": "redis", "url": redis_url, "lease_s": LEASE_S},
        # The ConfigMap volume is read-only: state lives elsewhere.
        "usage": {"path": str(state / "usage.db")},
        "classifiers": {"kw_walrus": {"type": "keyword", "terms": ["walrus"]}},
        "tenants": tenants(demo),
        **extra,
    }
    return yaml.safe_dump(config, sort_keys=False)


class ConfigMap:
    """A directory laid out like a mounted ConfigMap, updated the way the kubelet does."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.generation = 0
        directory.mkdir(parents=True)

    def update(self, files: dict[str, str]) -> None:
        self.generation += 1
        data = self.directory / f"..2026_12_07_00_00_{self.generation:02d}.000000000"
        data.mkdir()
        for name, text in files.items():
            (data / name).write_text(text)
        link = self.directory / "..data"
        old = os.readlink(link) if link.is_symlink() else None
        staged = self.directory / "..data_tmp"
        staged.symlink_to(data.name)
        os.replace(staged, link)  # the one atomic step
        for name in files:
            if not (self.directory / name).is_symlink():
                (self.directory / name).symlink_to(f"..data/{name}")
        if old is not None:
            shutil.rmtree(self.directory / old)

    def read(self, name: str) -> str:
        return (self.directory / name).read_text()

    @property
    def config(self) -> Path:
        return self.directory / "checkstream.yaml"


@dataclass
class Replica:
    gateway: Gateway
    configmap: ConfigMap
    admin_port: int

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def status(self) -> dict[str, Any]:
        reply = request(f"{self.admin_url}/admin/status", headers=AUTH)
        assert reply.status == 200, reply.body
        data: dict[str, Any] = reply.json()
        return data


def start_replica(
    directory: Path, redis_url: str, demo: DemoUpstreamThread, walrus: str = "log"
) -> Replica:
    configmap = ConfigMap(directory / "configmap")
    state = directory / "state"
    state.mkdir()
    text = config_text(redis_url, demo, state)
    configmap.update({"checkstream.yaml": text, "policy.yaml": policy_text(walrus)})
    gateway = start_gateway(
        configmap.config,
        env={"CHECKSTREAM_ADMIN_TOKEN": ADMIN_TOKEN, "CHECKSTREAM_REPLICA": directory.name},
    )
    return Replica(gateway, configmap, yaml.safe_load(text)["server"]["admin_port"])


def stop(replica: Replica) -> None:
    assert replica.gateway.stop() == 0, replica.gateway.log()


def chat(
    url: str, tenant: str, content: str = "hi", headers: dict[str, str] | None = None
) -> Reply:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
    return request(f"{url}/v1/chat/completions", body, {"X-Tenant-ID": tenant, **(headers or {})})


def slow_stream(url: str, tenant: str, seconds: float) -> Reply:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "tell me a story"}],
        "stream": True,
    }
    headers = {
        "X-Tenant-ID": tenant,
        "x-demo-chunks": "20",
        "x-demo-delay-ms": str(round(seconds * 1000 / 20)),
    }
    return request(f"{url}/v1/chat/completions", body, headers, timeout=30)


def in_background(call: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``call(*args)`` in a thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call(*args))
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def slots_left(replica: Replica, tenant: str) -> int | None:
    """Concurrency slots left, as tenant-info reports them (it takes none)."""
    info = request(f"{replica.url}/admin/tenant-info", headers={"X-Tenant-ID": tenant}).json()
    remaining = info["remaining"]
    return remaining["remaining"] if isinstance(remaining, dict) else None


def admin_post(base: str, path: str) -> Reply:
    return request(f"{base}{path}", b"", AUTH, method="POST")


def kill_replica(replica: Replica) -> None:
    """SIGKILL, as a node failure or the OOM killer would: launcher, Envoy and workers."""
    pid = replica.gateway.process.pid
    children = child_processes(pid)
    for child in children:
        os.kill(child, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    replica.gateway.process.wait(10)


def fleet_status(*replicas: Replica) -> tuple[int, str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = checkstream(["fleet", "status", *(r.admin_url for r in replicas)])
    return code, out.getvalue()


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet_demo() -> Iterator[DemoUpstreamThread]:
    up = DemoUpstreamThread().start(chunk_delay_ms=1)
    yield up
    up.stop()


@dataclass(frozen=True)
class Fleet:
    a: Replica
    b: Replica
    redis_url: str


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    fleet_demo: DemoUpstreamThread,
    redis_server: RedisServer,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[Fleet]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.delete(SUSPENSIONS_KEY, *client.scan_iter(match="checkstream:*{leased}*"))
        # A first-round admin resume stored "0": it must never lift the config's suspension.
        client.hset(SUSPENSIONS_KEY, "cfg-suspended", "0")
    finally:
        client.close()
    monkeypatch_module.setenv("CHECKSTREAM_ADMIN_TOKEN", ADMIN_TOKEN)  # for fleet status
    a = start_replica(tmp_path_factory.mktemp("replica-a"), redis_server.url, fleet_demo)
    b = start_replica(tmp_path_factory.mktemp("replica-b"), redis_server.url, fleet_demo)
    yield Fleet(a, b, redis_server.url)
    stop(a)
    stop(b)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


# -- item 4: suspensions with one truth ------------------------------------------------------
def test_a_config_suspension_cannot_be_lifted_by_an_admin(fleet: Fleet) -> None:
    for replica in (fleet.a, fleet.b):
        assert chat(replica.url, "cfg-suspended").status == 403
    refused = admin_post(fleet.a.admin_url, "/admin/tenants/cfg-suspended/resume")
    assert refused.status == 409, refused.body
    error = refused.json()["error"]
    # Names the file, the line and the key that hold it.
    assert re.search(r"checkstream\.yaml:\d+: tenants\.configs\.cfg-suspended\.suspended", error)
    time.sleep(1.0)  # longer than any follower takes
    for replica in (fleet.a, fleet.b):
        assert chat(replica.url, "cfg-suspended").status == 403


def test_an_admin_suspension_reaches_every_replica_within_a_second(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    assert chat(b.url, "admin-suspended").status == 200
    done = admin_post(a.admin_url, "/admin/tenants/admin-suspended/suspend")
    assert done.status == 200, done.body
    sent = time.monotonic()
    assert chat(a.url, "admin-suspended").status == 403  # at once where it was sent
    assert wait_until(lambda: chat(b.url, "admin-suspended").status == 403, timeout=1.0)
    took_suspend = time.monotonic() - sent
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        assert client.hget(SUSPENSIONS_KEY, "admin-suspended") == b"1"
        done = admin_post(b.admin_url, "/admin/tenants/admin-suspended/resume")
        assert done.status == 200, done.body
        sent = time.monotonic()
        # A resume deletes the suspension: nothing is left to override anything later.
        assert not client.hexists(SUSPENSIONS_KEY, "admin-suspended")
    finally:
        client.close()
    assert chat(b.url, "admin-suspended").status == 200
    assert wait_until(lambda: chat(a.url, "admin-suspended").status == 200, timeout=1.0)
    print(f"suspension agreed in {took_suspend:.2f}s, resume in {time.monotonic() - sent:.2f}s")


def test_suspended_refusals_are_counted_and_logged(fleet: Fleet) -> None:
    a = fleet.a
    assert admin_post(a.admin_url, "/admin/tenants/counted/suspend").status == 200
    try:
        for _ in range(3):
            assert chat(a.url, "counted", headers={"x-request-id": "susp-1"}).status == 403
    finally:
        assert admin_post(a.admin_url, "/admin/tenants/counted/resume").status == 200
    metrics = request(f"{a.admin_url}/metrics").body.decode()
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("checkstream_requests_total{")
        and 'tenant="counted"' in line
        and 'status="403"' in line
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) == 3.0, counted

    def logged() -> list[dict[str, Any]]:
        found = []
        for line in a.gateway.log().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            wanted = ("request", "counted", 403)
            if (record.get("event"), record.get("tenant"), record.get("status")) == wanted:
                found.append(record)
        return found

    assert wait_until(lambda: len(logged()) == 3), a.gateway.log()[-2000:]
    assert {r["request_id"] for r in logged()} == {"susp-1"}


# -- item 7: one config everywhere -----------------------------------------------------------
def test_a_configmap_swap_reloads_each_replica_within_5_s_and_fleet_status_sees_drift(
    fleet: Fleet,
) -> None:
    a, b = fleet.a, fleet.b
    code, table = fleet_status(a, b)
    assert code == 0, table
    before = a.status()["config_version"]
    assert b.status()["config_version"] == before  # different ports, one version
    assert chat(a.url, "guarded", "a walrus").status == 200  # policy: log

    # The ConfigMap changes on A first (kubelets do not update pods at the same moment).
    a.configmap.update(
        {
            "checkstream.yaml": a.configmap.read("checkstream.yaml"),
            "policy.yaml": policy_text("block"),
        }
    )
    swapped = time.monotonic()
    assert wait_until(lambda: a.status()["config_version"] != before, timeout=5.0), a.gateway.log()[
        -3000:
    ]
    print(f"replica A reloaded {time.monotonic() - swapped:.2f}s after the swap")
    after = a.status()["config_version"]
    assert chat(a.url, "guarded", "a walrus").status == 400
    assert chat(b.url, "guarded", "a walrus").status == 200
    code, table = fleet_status(a, b)
    assert code == 1, table
    assert "drift" in table and after in table and before in table

    b.configmap.update(
        {
            "checkstream.yaml": b.configmap.read("checkstream.yaml"),
            "policy.yaml": policy_text("block"),
        }
    )
    assert wait_until(lambda: b.status()["config_version"] == after, timeout=5.0)
    assert chat(b.url, "guarded", "a walrus").status == 400
    code, table = fleet_status(a, b)
    assert code == 0, table
    assert f"2 replicas ready on config version {after}" in table
    for replica in (a, b):
        info = request(f"{replica.url}/admin/tenant-info", headers={"X-Tenant-ID": "guarded"})
        assert info.json()["config_version"] == after
        status = replica.status()
        assert {w["config_version"] for w in status["workers"]} == {after}


def test_a_bad_configmap_update_is_refused_and_the_old_config_keeps_serving(
    fleet: Fleet,
) -> None:
    a = fleet.a
    version = a.status()["config_version"]
    good = a.configmap.read("checkstream.yaml")
    a.configmap.update(
        {
            "checkstream.yaml": good.replace("lease_s: 2.0", "lease_s: -1"),
            "policy.yaml": a.configmap.read("policy.yaml"),
        }
    )
    assert wait_until(lambda: a.status()["reload_error"] is not None, timeout=5.0)
    status = a.status()
    assert status["config_version"] == version
    assert "limits.lease_s" in status["reload_error"]
    assert chat(a.url, "counted").status == 200
    a.configmap.update({"checkstream.yaml": good, "policy.yaml": a.configmap.read("policy.yaml")})
    assert wait_until(lambda: a.status()["reload_error"] is None, timeout=5.0)
    assert a.status()["config_version"] == version


def test_fleet_status_names_a_replica_it_cannot_reach(fleet: Fleet) -> None:
    code, table = fleet_status(fleet.a, Replica(fleet.a.gateway, fleet.a.configmap, 9))
    assert code == 1
    assert "unreachable" in table


# -- item 5: leases ----------------------------------------------------------------------------
def test_a_sigkilled_replicas_slots_free_within_lease_s_under_traffic(
    fleet: Fleet, fleet_demo: DemoUpstreamThread, tmp_path: Path
) -> None:
    victim = start_replica(tmp_path / "victim", fleet.redis_url, fleet_demo)
    try:
        streams = [in_background(slow_stream, victim.url, "leased", 20.0) for _ in range(2)]
        assert wait_until(lambda: slots_left(fleet.b, "leased") == 0, timeout=5.0)
    finally:
        kill_replica(victim)
    killed = time.monotonic()
    statuses = []
    while True:  # traffic all along, through the surviving replica
        status = chat(fleet.b.url, "leased").status
        statuses.append(status)
        if status == 200:
            break
        assert time.monotonic() - killed < LEASE_S + 1.5, statuses
        time.sleep(0.1)
    freed = time.monotonic() - killed
    print(f"slots of the killed replica freed {freed:.2f}s after SIGKILL (lease_s {LEASE_S})")
    assert statuses[0] == 429  # the leases outlived their replica for a while
    assert set(statuses[:-1]) == {429}
    for thread, _ in streams:
        thread.join(30)


# -- issue #19: faults fail safe ---------------------------------------------------------------
@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer(redis_binary()).start()
    yield server
    server.stop()


def test_a_redis_stall_while_streams_end_does_not_lock_the_tenant_out(
    own_redis: RedisServer, fleet_demo: DemoUpstreamThread, tmp_path: Path
) -> None:
    replica = start_replica(tmp_path / "stalled", own_redis.url, fleet_demo)
    try:
        streams = [in_background(slow_stream, replica.url, "leased", 1.5) for _ in range(2)]
        assert wait_until(lambda: slots_left(replica, "leased") == 0, timeout=5.0)
        own_redis.pause()  # a 4 s stall: the streams end (and release) meanwhile
        time.sleep(4.0)
        own_redis.resume()
        resumed = time.monotonic()
        for thread, out in streams:
            thread.join(30)
            assert isinstance(out[0], Reply) and out[0].status == 200, out
        # The streams' ends really met the stall: their releases failed.
        assert '"event": "limiter_error"' in replica.gateway.log()
        assert wait_until(lambda: chat(replica.url, "leased").status == 200, timeout=LEASE_S + 1)
        print(f"tenant admitted again {time.monotonic() - resumed:.2f}s after the stall")
        # Both slots are back, not one: nothing stays leaked.
        held = [in_background(slow_stream, replica.url, "leased", 2.0) for _ in range(2)]
        for thread, out in held:
            thread.join(30)
            assert isinstance(out[0], Reply) and out[0].status == 200, out
    finally:
        stop(replica)


def test_suspending_with_redis_down_is_a_clear_503_and_leaves_nothing_behind(
    own_redis: RedisServer, fleet_demo: DemoUpstreamThread, tmp_path: Path
) -> None:
    replica = start_replica(tmp_path / "no-redis", own_redis.url, fleet_demo)
    try:
        own_redis.stop()
        refused = admin_post(replica.admin_url, "/admin/tenants/counted/suspend")
        assert refused.status == 503, refused.body
        error = refused.json()["error"]
        assert "Redis" in error and "nothing was changed" in error
        own_redis.start()  # same port, empty
        # An unrelated reload later must not apply a suspension that was refused.
        reloaded = admin_post(replica.admin_url, "/admin/reload")
        assert reloaded.status == 200, reloaded.body
        time.sleep(1.0)
        assert chat(replica.url, "counted").status == 200
        client = redis.Redis.from_url(own_redis.url)
        try:
            assert client.hgetall(SUSPENSIONS_KEY) == {}
        finally:
            client.close()
    finally:
        stop(replica)
