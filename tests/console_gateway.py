"""A gateway for the operator console's browser tests and screenshots: real Envoy and
extproc, the demo upstream, tenants of every kind the console shows (audited with keyword
rules, budgeted and rate-limited, managed auth with a secret, suspended by the config).
"""

from __future__ import annotations

import http.cookiejar
import re
import urllib.error
import urllib.parse
import urllib.request
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
        # The tests' client picks the managed tenant by header: from this machine only.
        "server": {"host": "127.0.0.1", **gateway_ports(), "trusted_networks": ["127.0.0.0/8"]},
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


class Operator:
    """A signed-in console user (urllib with a cookie jar: the browser tests cover the UI)."""

    def __init__(self, console: str) -> None:
        self.console = console
        jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        self.csrf = self._form_token(self.get("sign-in"))
        self.post("sign-in", {"token": ADMIN_TOKEN})
        self.csrf = self._form_token(self.get(""))

    @staticmethod
    def _form_token(page: str) -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found is not None, page[:300]
        return found.group(1)

    def get(self, path: str) -> str:
        with self.opener.open(self.console + path, timeout=20) as response:
            return str(response.read().decode())

    def post(self, path: str, fields: dict[str, str]) -> int:
        data = urllib.parse.urlencode({"csrf": self.csrf, **fields}).encode()
        try:
            with self.opener.open(self.console + path, data, timeout=20) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
