"""One config everywhere, without servers: config_version, the file watcher, fleet status's
drift report, and where admin suspensions are recorded."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from checkstream.accounting.suspensions import KEY, record_suspension
from checkstream.config.model import LoadedConfig, load_config
from checkstream.gateway.runtime import config_version
from checkstream.ops.fleet import ReplicaStatus, drift, render
from checkstream.ops.watching import watch_config, watched_files
from tests.redis_server import RedisServer, redis_server
from tests.support import free_port

__all__ = ["redis_server"]  # the fixture is used by name

POLICY = """\
version: "1.0"
name: p
policies:
  - {name: r, trigger: {classifier: pii_detector, threshold: 0.5}, action: ACTION}
"""


def write_config(directory: Path, server: str = "", extra: str = "", action: str = "log") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(POLICY.replace("ACTION", action))
    path = directory / "checkstream.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            server: {{{server}}}
            {extra}
            tenants:
              configs:
                acme:
                  backend_url: "http://127.0.0.1:9/v1"
                  policy_path: policy.yaml
                  classifiers: [pii_detector]
                  suspended: true
                beta:
                  backend_url: "http://127.0.0.1:9/v1"
            """
        )
    )
    return path


# -- config_version ----------------------------------------------------------------------------
def test_the_version_ignores_where_a_replica_listens_and_keeps_its_files(tmp_path: Path) -> None:
    a = load_config(write_config(tmp_path / "a", "port: 8080, admin_port: 9090"))
    b = load_config(
        write_config(
            tmp_path / "b",
            "host: 127.0.0.1, port: 18080, admin_port: 19090, extproc_port: 15051",
            "usage: {path: /var/lib/elsewhere.db}",
        )
    )
    assert config_version(a) == config_version(b)
    # A default spelled out is the same effective config.
    c = load_config(write_config(tmp_path / "c", extra="limits: {backend: memory, lease_s: 30}"))
    assert config_version(c) == config_version(a)


def test_the_version_follows_policies_limits_and_tenants(tmp_path: Path) -> None:
    base = config_version(load_config(write_config(tmp_path / "a")))
    for name, kwargs in {
        "policy": {"action": "block"},
        "limits": {"extra": "limits: {lease_s: 10}"},
        "classifiers": {"extra": "classifiers: {kw: {type: keyword, terms: [x]}}"},
        "pricing": {"extra": "pricing: {m: {input: 1, output: 2}}"},
    }.items():
        other = load_config(write_config(tmp_path / name, **kwargs))
        assert config_version(other) != base, name


# -- watching ----------------------------------------------------------------------------------
def configmap(directory: Path, generation: int, action: str) -> None:
    """The kubelet's update: a new timestamped directory, then one atomic symlink swap."""
    data = directory / f"..gen{generation}"
    data.mkdir(parents=True)
    write_config(data, action=action)
    staged = directory / "..data_tmp"
    staged.symlink_to(data.name)
    os.replace(staged, directory / "..data")
    for name in ("checkstream.yaml", "policy.yaml"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


async def test_a_symlink_swap_triggers_one_reload_and_nothing_else_does(tmp_path: Path) -> None:
    configmap(tmp_path, 1, "log")
    loaded = load_config(tmp_path / "checkstream.yaml")
    assert watched_files(loaded) == (tmp_path / "checkstream.yaml", tmp_path / "policy.yaml")
    reloads: list[str] = []

    async def reload() -> None:
        reloads.append((tmp_path / "policy.yaml").read_text())

    watcher = asyncio.create_task(watch_config(lambda: loaded, reload, every_s=0.05))
    try:
        await asyncio.sleep(0.3)
        assert reloads == []  # nothing changed, nothing reloaded
        configmap(tmp_path, 2, "block")  # the files' own paths are never written
        for _ in range(100):
            if reloads:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert len(reloads) == 1 and "block" in reloads[0]
        # An in-place edit is seen too.
        (tmp_path / "..gen2" / "policy.yaml").write_text(POLICY.replace("ACTION", "redact"))
        for _ in range(100):
            if len(reloads) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(reloads) == 2 and "redact" in reloads[1]
    finally:
        watcher.cancel()


# -- fleet status ------------------------------------------------------------------------------
def test_drift_names_the_odd_replica_and_workers_that_disagree() -> None:
    statuses = [
        ReplicaStatus("http://a:9090", "v1", "ready", "a"),
        ReplicaStatus("http://b:9090", "v2", "ready", "b"),
        ReplicaStatus("http://c:9090", "v1", "ready", "c", ("v0",)),
        ReplicaStatus("http://d:9090", None, "unreachable: connection refused"),
    ]
    found = drift(statuses)
    assert found == {
        "http://b:9090": "drift (fleet runs v1)",
        "http://c:9090": "drift (workers on v0)",
    }
    table, ok = render(statuses)
    assert not ok
    assert "unreachable: connection refused" in table
    table, ok = render([statuses[0], ReplicaStatus("http://e:9090", "v1", "ready", "e")])
    assert ok and "2 replicas ready on config version v1" in table


# -- recording suspensions ---------------------------------------------------------------------
async def test_suspensions_without_redis_live_in_the_launchers_set(tmp_path: Path) -> None:
    loaded = load_config(write_config(tmp_path))
    local: set[str] = set()
    assert (await record_suspension(loaded, "beta", True, local)).status == 200
    assert local == {"beta"}
    assert (await record_suspension(loaded, "beta", False, local)).status == 200
    assert local == set()
    assert (await record_suspension(loaded, "nobody", True, local)).status == 404
    held = await record_suspension(loaded, "acme", False, local)
    assert held.status == 409
    assert held.error is not None and "tenants.configs.acme.suspended" in held.error
    assert f"{tmp_path / 'checkstream.yaml'}:" in held.error


async def test_suspensions_with_redis_live_only_there(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    loaded = with_redis(tmp_path, redis_server.url)
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    local: set[str] = set()
    try:
        await client.delete(KEY)
        assert (await record_suspension(loaded, "beta", True, local)).status == 200
        assert await client.hgetall(KEY) == {"beta": "1"}
        assert (await record_suspension(loaded, "beta", False, local)).status == 200
        assert await client.hgetall(KEY) == {}
        assert local == set()  # no copy outside Redis
    finally:
        await client.aclose()


async def test_a_suspension_redis_cannot_take_is_a_503_that_changes_nothing(
    tmp_path: Path,
) -> None:
    loaded = with_redis(tmp_path, f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    local: set[str] = set()
    outcome = await record_suspension(loaded, "beta", True, local)
    assert outcome.status == 503
    assert outcome.error is not None and "nothing was changed" in outcome.error
    assert "hunter2" not in outcome.error
    assert local == set()


def with_redis(tmp_path: Path, url: str) -> LoadedConfig:
    return load_config(write_config(tmp_path, extra=f"limits: {{backend: redis, url: '{url}'}}"))


@pytest.mark.parametrize("bad", ["lease_s: 0", "lease_s: -1", "lease_s: 7200"])
def test_lease_s_out_of_range_is_a_located_error(tmp_path: Path, bad: str) -> None:
    from checkstream.config.yamlsource import ConfigError

    with pytest.raises(ConfigError, match=r"limits\.lease_s"):
        load_config(write_config(tmp_path, extra=f"limits: {{{bad}}}"))
