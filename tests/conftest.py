"""Shared real parts: one gateway (Envoy + extproc) and its upstreams for the e2e tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import (
    DemoUpstreamThread,
    Gateway,
    RecordingUpstream,
    gateway_ports,
    refusing_port,
    start_gateway,
    write_config,
    write_policy,
)

ALPHA_SECRET = "sk-upstream-alpha-secret"

# Fixtures that start a real server: a test using any of them is end-to-end.
_SERVER_FIXTURES = frozenset(
    {
        "gateway",
        "upstreams",
        "demo",
        "redis_server",
        "postgres_server",
        "postgres_url",
        "browser",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``e2e`` every test that starts servers: those in ``test_e2e_*`` files and those
    using a server fixture, so ``pytest -m "not e2e"`` is the fast tier without anyone having
    to remember a marker."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.path.name.startswith("test_e2e_") or fixtures & _SERVER_FIXTURES:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def upstreams() -> Iterator[dict[str, RecordingUpstream]]:
    ups = {"a": RecordingUpstream("a").start(), "b": RecordingUpstream("b").start()}
    yield ups
    for up in ups.values():
        up.stop()


@pytest.fixture(scope="session")
def demo() -> Iterator[DemoUpstreamThread]:
    up = DemoUpstreamThread().start(chunk_delay_ms=20)
    yield up
    up.stop()


@pytest.fixture(scope="session")
def refused() -> Iterator[int]:
    """A backend port that stays down for the whole run."""
    with refusing_port() as port:
        yield port


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    upstreams: dict[str, RecordingUpstream],
    demo: DemoUpstreamThread,
    refused: int,
) -> Iterator[Gateway]:
    a, b = upstreams["a"].port, upstreams["b"].port
    directory = tmp_path_factory.mktemp("gw")
    log_pii = write_policy(directory, "log-pii.yaml", [("pii_seen", "pii_detector", "log")])
    strict = write_policy(
        directory,
        "strict.yaml",
        [("no_falcon", "falcon", "block"), ("mask_pii", "pii_detector", "redact")],
    )
    lenient = write_policy(directory, "lenient.yaml", [("falcon_seen", "falcon", "log")])
    config: dict[str, Any] = {
        "classifiers": {"falcon": {"type": "keyword", "terms": ["project falcon"]}},
        "server": {
            "host": "127.0.0.1",
            **gateway_ports(),
            "max_request_bytes": 65536,
            # alpha (managed auth) is reached by header too, from here only.
            "trusted_networks": ["127.0.0.0/8"],
        },
        "tenants": {
            "resolution": [
                {"header": "X-Tenant-ID"},
                {"path_prefix": "/tenant/"},
                {"api_key_mapping": True},
            ],
            "api_key_map": {
                "sk-cs-alpha": "alpha",
                "sk-cs-beta": "beta",
                "sk-cs-gamma": "gamma",
            },
            "configs": {
                "alpha": {
                    "backend_url": f"http://127.0.0.1:{a}/v1",
                    "auth": {"type": "bearer", "token_env": "ALPHA_UPSTREAM_KEY"},
                    "headers": {"x-upstream-project": "alpha-project"},
                },
                "beta": {
                    "backend_url": f"http://127.0.0.1:{b}",
                    "streaming_format": "anthropic",
                    "auth_passthrough": True,
                },
                "gamma": {
                    "backend_url": f"http://127.0.0.1:{a}/custom/v1",
                    # A midstream rule makes extproc process the response body.
                    "pipeline": {"midstream": {"classifiers": ["pii_detector"]}},
                    "policy_path": str(log_pii),
                    "models": ["gpt-4o-mini"],
                },
                "guarded": {
                    "backend_url": f"http://127.0.0.1:{a}/v1",
                    "classifiers": ["pii_detector", "falcon"],
                    "policy_path": str(strict),
                },
                "lenient": {
                    "backend_url": f"http://127.0.0.1:{a}/v1",
                    "classifiers": ["falcon"],
                    "policy_path": str(lenient),
                },
                "guarded-anthropic": {
                    "backend_url": f"http://127.0.0.1:{b}",
                    "streaming_format": "anthropic",
                    "classifiers": ["pii_detector", "falcon"],
                    "policy_path": str(strict),
                },
                "slow": {"backend_url": f"http://127.0.0.1:{a}", "backend_timeout_ms": 300},
                "down-openai": {"backend_url": f"http://127.0.0.1:{refused}"},
                "down-anthropic": {
                    "backend_url": f"http://127.0.0.1:{refused}",
                    "streaming_format": "anthropic",
                },
                "demo-openai": {"backend_url": f"http://127.0.0.1:{demo.port}/v1"},
                "demo-anthropic": {
                    "backend_url": f"http://127.0.0.1:{demo.port}",
                    "streaming_format": "anthropic",
                },
                "demo-checked": {
                    "backend_url": f"http://127.0.0.1:{demo.port}/v1",
                    "pipeline": {"midstream": {"classifiers": ["pii_detector"]}},
                    "policy_path": str(log_pii),
                },
                "demo-egress": {
                    "backend_url": f"http://127.0.0.1:{demo.port}/v1",
                    # Answers only: the demo upstream echoes the prompt into its answer.
                    "pipeline": {
                        "ingress": {"classifiers": []},
                        "midstream": {"classifiers": ["pii_detector", "falcon"]},
                    },
                    "policy_path": str(strict),
                },
                "demo-egress-anthropic": {
                    "backend_url": f"http://127.0.0.1:{demo.port}",
                    "streaming_format": "anthropic",
                    "pipeline": {
                        "ingress": {"classifiers": []},
                        "midstream": {"classifiers": ["pii_detector", "falcon"]},
                    },
                    "policy_path": str(strict),
                },
            },
        },
    }
    path = write_config(directory, config)
    gw = start_gateway(path, env={"ALPHA_UPSTREAM_KEY": ALPHA_SECRET})
    yield gw
    assert gw.stop() == 0, gw.log()
    # Secrets never reach logs.
    assert ALPHA_SECRET not in gw.log()
