"""A gateway for the operator console's browser tests and screenshots: real Envoy and
extproc, the demo upstream, tenants of every kind the console shows (audited with keyword
rules, budgeted and rate-limited, managed auth with a secret, suspended by the config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support import gateway_ports, write_config, write_policy

ADMIN_TOKEN = "console-admin-tok-5d91c2e8"
UPSTREAM_SECRET = "sk-console-upstream-secret-a7f3"
SECRET_HEADER_VALUE = "hdr-secret-value-91be"
TENANTS = ("acme-corp", "globex", "initech", "umbrella", "hooli", "frozen")


def console_config(directory: Path, demo_port: int, extra_tenants: int = 0) -> Path:
    backend = f"http://127.0.0.1:{demo_port}/v1"
    policy = write_policy(
        directory,
        "acme-policy.yaml",
        [("no_falcon", "kw_falcon", "block"), ("watch_pelican", "kw_pelican", "log")],
    )
    tenants: dict[str, Any] = {
        "acme-corp": {
            "backend_url": backend,
            "policy_path": policy.name,
            "classifiers": ["kw_falcon", "kw_pelican"],
            "rate_limit": {"requests_per_minute": 600, "tokens_per_minute": 200000},
            "budget": {"monthly_usd": 5.0},
            "audit": {"enabled": True, "path": "audit/acme-corp", "include_content": False},
            "auth": {"type": "bearer", "token_env": "CONSOLE_TEST_UPSTREAM_KEY"},
            "headers": {"x-team-secret": SECRET_HEADER_VALUE},
        },
        "globex": {
            "backend_url": backend,
            "rate_limit": {"requests_per_minute": 120},
            "budget": {"monthly_usd": 0.01},
        },
        "initech": {"backend_url": backend, "streaming_format": "anthropic"},
        "umbrella": {"backend_url": backend, "models": ["gpt-4o-mini"]},
        "hooli": {"backend_url": backend, "audit": {"enabled": True, "path": "audit/hooli"}},
        "frozen": {"backend_url": backend, "suspended": True},
    }
    for i in range(extra_tenants):
        tenants[f"tenant-{i:04d}"] = {"backend_url": backend}
    config = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "classifiers": {
            "kw_falcon": {"type": "keyword", "terms": ["falcon"]},
            "kw_pelican": {"type": "keyword", "terms": ["pelican"]},
        },
        "pipeline": {"ingress": {"classifiers": []}, "midstream": {"classifiers": []}},
        "usage": {"path": "usage.db"},
        "pricing": {
            "gpt-4o-mini": {"input": 0.15, "output": 0.6},
            "gpt-4o": {"input": 2.5, "output": 10.0},
            "claude-3-5-haiku": {"input": 0.8, "output": 4.0},
        },
        "tenants": {
            "resolution": [{"header": "X-Tenant-ID"}],
            "configs": tenants,
        },
    }
    return write_config(directory, config)


def gateway_env() -> dict[str, str]:
    return {"CHECKSTREAM_ADMIN_TOKEN": ADMIN_TOKEN, "CONSOLE_TEST_UPSTREAM_KEY": UPSTREAM_SECRET}
