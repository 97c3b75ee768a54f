"""Who may reach a tenant, end to end through a real Envoy and extproc: hashed keys with
expiry and revocation, address allow-lists, keyless access only from trusted networks.

Clients come from two loopback addresses: 127.0.0.1 is the one trusted proxy (its
X-Forwarded-For stands for a client elsewhere), 127.0.0.2 is an ordinary client whose
X-Forwarded-For must be ignored.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from checkstream.demo.state import demo_config_path
from checkstream.tenants.keyindex import digest_of
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

pytestmark = pytest.mark.e2e

SECRET = "sk-upstream-keyed-secret"
CI_KEY = "sk-cs-ci-key-for-keyed-tenant-0123456789"
OLD_KEY = "sk-cs-old-key-expired-long-ago-0123456789"
OFFICE_KEY = "sk-cs-office-key-0123456789abcdef"
LEGACY_KEY = "sk-cs-legacy-plaintext"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def post(
    gw: Gateway,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
    source: str = "127.0.0.1",
) -> Reply:
    """One request from the loopback address ``source``."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20, source_address=(source, 0))
    try:
        conn.request(
            "POST",
            path,
            body=json.dumps(CHAT),
            headers={"content-type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        conn.close()


def error_code(reply: Reply) -> str:
    return str(reply.json()["error"]["code"])


@dataclass
class Access:
    gw: Gateway
    up: RecordingUpstream
    config: dict[str, Any]
    path: Path


@pytest.fixture(scope="module")
def access(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Access]:
    up = RecordingUpstream("access").start()
    directory = tmp_path_factory.mktemp("access")
    backend = f"http://127.0.0.1:{up.port}/v1"
    config: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            **gateway_ports(),
            "trusted_proxies": ["127.0.0.1/32"],
            "trusted_networks": ["10.1.0.0/16"],
        },
        "usage": {"enabled": False},
        "tenants": {
            "resolution": [{"header": "X-Tenant-ID"}, {"api_key_mapping": True}],
            "api_key_map": {LEGACY_KEY: "office"},
            "configs": {
                "keyed": {
                    "backend_url": backend,
                    "auth": {"type": "bearer", "token_env": "KEYED_UPSTREAM_KEY"},
                    "api_keys": [
                        {"name": "ci", "sha256": digest_of(CI_KEY), "expires": "2999-12-31"},
                        {"name": "old", "sha256": digest_of(OLD_KEY), "expires": "2020-01-01"},
                    ],
                },
                "office": {
                    "backend_url": backend,
                    "auth_passthrough": True,
                    "api_keys": [{"name": "app", "sha256": digest_of(OFFICE_KEY)}],
                    "allowed_cidrs": ["10.1.0.0/16", "192.168.7.0/24"],
                },
            },
        },
    }
    path = write_config(directory, config)
    gw = start_gateway(path, env={"KEYED_UPSTREAM_KEY": SECRET})
    try:
        yield Access(gw, up, config, path)
    finally:
        assert gw.stop() == 0, gw.log()
        up.stop()
        log = gw.log()
        for secret in (SECRET, CI_KEY, OLD_KEY, OFFICE_KEY):
            assert secret not in log


def test_hashed_key_resolves_its_tenant_and_never_goes_upstream(access: Access) -> None:
    before = len(access.up.received)
    reply = post(access.gw, headers={"authorization": f"Bearer {CI_KEY}"})
    assert reply.status == 200, reply.body
    assert len(access.up.received) == before + 1
    sent = access.up.last().headers
    assert sent["authorization"] == f"Bearer {SECRET}"
    # The client's address is not the backend's business (Envoy would add it).
    assert "x-envoy-external-address" not in sent
    assert CI_KEY not in json.dumps(sent)


def test_expired_key_is_refused_with_key_expired(access: Access) -> None:
    before = len(access.up.received)
    reply = post(access.gw, headers={"authorization": f"Bearer {OLD_KEY}"})
    assert reply.status == 401
    assert error_code(reply) == "key_expired"
    # Also with a header naming the key's own tenant: the credential itself is expired.
    reply = post(access.gw, headers={"x-api-key": OLD_KEY, "x-tenant-id": "keyed"})
    assert (reply.status, error_code(reply)) == (401, "key_expired")
    assert len(access.up.received) == before


def test_unknown_key_is_refused(access: Access) -> None:
    reply = post(access.gw, headers={"authorization": "Bearer sk-cs-" + "0" * 40})
    assert (reply.status, error_code(reply)) == (401, "invalid_api_key")


def test_keyless_managed_tenant_only_from_trusted_networks(access: Access) -> None:
    before = len(access.up.received)
    # From the proxy itself (127.0.0.1, outside trusted_networks): a key is required.
    reply = post(access.gw, headers={"x-tenant-id": "keyed"})
    assert (reply.status, error_code(reply)) == (401, "key_required")
    # A client the trusted proxy forwards from 10.1.2.3 (a trusted network): allowed.
    reply = post(access.gw, headers={"x-tenant-id": "keyed", "x-forwarded-for": "10.1.2.3"})
    assert reply.status == 200, reply.body
    assert access.up.last().headers["authorization"] == f"Bearer {SECRET}"
    # The same claim from a peer that is not a trusted proxy is ignored.
    reply = post(
        access.gw,
        headers={"x-tenant-id": "keyed", "x-forwarded-for": "10.1.2.3"},
        source="127.0.0.2",
    )
    assert (reply.status, error_code(reply)) == (401, "key_required")
    assert len(access.up.received) == before + 1


def _refusals(gw: Gateway) -> dict[tuple[str, str], float]:
    admin = admin_port(gw)
    reply = request(f"http://127.0.0.1:{admin}/metrics")
    found = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            if sample.name == "checkstream_access_refused_total":
                found[(sample.labels["tenant"], sample.labels["reason"])] = sample.value
    return found


def admin_port(gw: Gateway) -> int:
    return int(yaml.safe_load(gw.config_path.read_text())["server"]["admin_port"])


def test_allowed_cidrs_check_the_client_address(access: Access) -> None:
    gw = access.gw
    counted = _refusals(gw).get(("office", "address_not_allowed"), 0.0)
    key = {"authorization": f"Bearer {OFFICE_KEY}"}
    before = len(access.up.received)
    refused = [
        post(gw, headers=key),  # the proxy itself, 127.0.0.1
        post(gw, headers={**key, "x-forwarded-for": "10.2.0.1"}),  # forwarded, outside
        post(gw, headers={**key, "x-forwarded-for": "10.1.2.3"}, source="127.0.0.2"),  # spoofed
        post(gw, headers={"x-api-key": LEGACY_KEY}),  # plaintext keys are checked the same
    ]
    for reply in refused:
        assert (reply.status, error_code(reply)) == (403, "address_not_allowed")
    assert len(access.up.received) == before
    # Several hops: the last address a trusted proxy vouches for is the client.
    for chain in ("10.1.2.3", "203.0.113.9, 192.168.7.20", "garbage, 10.1.200.1"):
        reply = post(gw, headers={**key, "x-forwarded-for": chain})
        assert reply.status == 200, (chain, reply.body)
    assert len(access.up.received) == before + 3
    assert _refusals(gw)[("office", "address_not_allowed")] == counted + len(refused)


def test_removing_a_key_and_reloading_revokes_it(access: Access) -> None:
    gw = access.gw
    assert post(gw, headers={"authorization": f"Bearer {CI_KEY}"}).status == 200
    keyed = access.config["tenants"]["configs"]["keyed"]
    keyed["api_keys"] = [k for k in keyed["api_keys"] if k["name"] != "ci"]
    write_config(access.path.parent, access.config)
    reloads = gw.log().count('"event": "reloaded"')
    os.kill(gw.process.pid, signal.SIGHUP)
    assert wait_until(lambda: gw.log().count('"event": "reloaded"') > reloads, 30), gw.log()
    reply = post(gw, headers={"authorization": f"Bearer {CI_KEY}"})
    assert (reply.status, error_code(reply)) == (401, "invalid_api_key")


def test_the_bundled_demo_keys_still_choose_their_tenants(tmp_path: Path) -> None:
    """The README's demo commands use sk-demo-openai and sk-demo-anthropic, now stored hashed."""
    demo = DemoUpstreamThread().start(chunk_delay_ms=1)
    config = yaml.safe_load(demo_config_path().read_text())
    config["server"] = {**config["server"], **gateway_ports()}
    config["usage"] = {"path": str(tmp_path / "usage.db")}
    for tenant in config["tenants"]["configs"].values():
        tenant["backend_url"] = tenant["backend_url"].replace("9001", str(demo.port))
    gw = start_gateway(write_config(tmp_path, config))
    try:
        for key, tenant in (("sk-demo-openai", "demo"), ("sk-demo-anthropic", "demo-anthropic")):
            info = request(
                f"{gw.url}/admin/tenant-info", headers={"authorization": f"Bearer {key}"}
            )
            assert (info.status, info.json()["tenant"]) == (200, tenant)
    finally:
        assert gw.stop() == 0, gw.log()
        demo.stop()
