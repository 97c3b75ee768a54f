"""Hashed keys, address rules and keyless-access checks, below the network."""

from __future__ import annotations

import ipaddress
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from google.protobuf.struct_pb2 import Struct

from checkstream.config.model import load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.tenants.access import ADDRESS_NOT_ALLOWED, KEY_REQUIRED, AccessGate, client_address
from checkstream.tenants.keyindex import KEY_PREFIX, KeyIndex, digest_of, expiry_instant, new_key
from checkstream.tenants.resolution import Refused, Resolved, TenantResolver

KEY = "sk-cs-test-key-one"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "checkstream.yaml"
    path.write_text(text)
    return path


def _config(tmp_path: Path, extra: str = "", server: str = "") -> Path:
    return write(
        tmp_path,
        f"""\
server: {{{server}}}
tenants:
  resolution: [{{api_key_mapping: true}}]
  configs:
    acme:
      backend_url: "http://127.0.0.1:9001/v1"
      api_keys:
        - {{name: ci, sha256: {digest_of(KEY)}, expires: 2030-06-30}}
        - {{name: old, sha256: {digest_of("sk-cs-old")}, expires: 2020-01-01}}
{extra}""",
    )


def test_new_keys_are_long_random_and_prefixed() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) >= len(KEY_PREFIX) + 43  # 32 random bytes, base64url


def test_a_date_expires_at_the_end_of_that_utc_day() -> None:
    end = datetime(2030, 7, 1, tzinfo=UTC).timestamp()
    assert expiry_instant(date(2030, 6, 30)) == end
    assert expiry_instant(datetime(2030, 6, 30, 12, 0)) == end - 12 * 3600
    assert expiry_instant(None) is None


def test_a_quoted_date_is_a_date_not_its_first_midnight(tmp_path: Path) -> None:
    text = _config(tmp_path).read_text().replace("expires: 2030-06-30", 'expires: "2030-06-30"')
    [entry, _] = load_config(write(tmp_path, text)).model.tenants.configs["acme"].api_keys
    assert entry.expires == date(2030, 6, 30)


def test_lookup_by_digest_with_expiry(tmp_path: Path) -> None:
    index = KeyIndex.from_config(load_config(_config(tmp_path)).model)
    end = datetime(2030, 7, 1, tzinfo=UTC).timestamp()
    match = index.lookup(KEY, end - 1)
    assert match is not None
    assert (match.key.tenant, match.key.name, match.expired) == ("acme", "ci", False)
    expired = index.lookup(KEY, end)
    assert expired is not None and expired.expired
    assert index.lookup("sk-cs-unknown", 0) is None
    assert index.lookup(digest_of(KEY), 0) is None  # the digest is not the key


def test_resolver_binds_hashed_keys_and_refuses_expired_ones(tmp_path: Path) -> None:
    resolver = TenantResolver(load_config(_config(tmp_path)).model, {})
    now = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    found = resolver.resolve("/v1/chat/completions", {"authorization": f"Bearer {KEY}"}, now)
    assert isinstance(found, Resolved)
    assert (found.tenant.id, found.key_is_ours) == ("acme", True)
    old = resolver.resolve("/v1/chat/completions", {"x-api-key": "sk-cs-old"}, now)
    assert isinstance(old, Refused)
    assert (old.status, old.code) == (401, "key_expired")
    later = datetime(2031, 1, 1, tzinfo=UTC).timestamp()
    gone = resolver.resolve("/v1/chat/completions", {"authorization": f"Bearer {KEY}"}, later)
    assert isinstance(gone, Refused) and gone.code == "key_expired"


def test_plaintext_map_still_works_and_is_warned(tmp_path: Path) -> None:
    path = (
        _config(tmp_path)
        .read_text()
        .replace("  configs:", '  api_key_map: {"sk-cs-legacy": acme}\n  configs:')
    )
    loaded = load_config(write(tmp_path, path))
    assert loaded.warnings == (
        f"{loaded.path}:4: tenants.api_key_map: holds plaintext keys: move them to the "
        "tenants' api_keys as SHA-256 digests (`checkstream keys new`)",
    )
    found = TenantResolver(loaded.model, {}).resolve("/v1/x", {"x-api-key": "sk-cs-legacy"})
    assert isinstance(found, Resolved) and found.tenant.id == "acme"


def test_a_digest_listed_twice_is_refused(tmp_path: Path) -> None:
    extra = f"""\
    beta:
      backend_url: "http://127.0.0.1:9001/v1"
      api_keys: [{{name: ci, sha256: {digest_of(KEY)}}}]
"""
    with pytest.raises(ConfigError) as caught:
        load_config(_config(tmp_path, extra))
    [problem] = caught.value.problems
    assert (problem.line, problem.path) == (12, "tenants.configs.beta.api_keys[0].sha256")
    assert problem.message == "the same key is also listed for 'acme'"


def test_bad_key_entries_are_located(tmp_path: Path) -> None:
    text = _config(tmp_path).read_text().replace(digest_of(KEY), "ABC")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    [problem] = caught.value.problems
    assert (problem.line, problem.path) == (8, "tenants.configs.acme.api_keys[0].sha256")


MANAGED_BY_HEADER = """\
server: {%s}
tenants:
  resolution: [{header: X-Tenant-ID}, {path_prefix: /t/}, {api_key_mapping: true}]
  configs:
    acme:
      backend_url: "http://127.0.0.1:9001/v1"
      auth: {type: bearer, token_env: CS_KEYS_TEST}
%s"""


def test_keyless_managed_tenant_is_refused_naming_tenant_and_method(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MANAGED_BY_HEADER % ("", "")), require_secrets=False)
    [problem] = caught.value.problems
    assert (problem.line, problem.path) == (7, "tenants.configs.acme.auth")
    assert problem.message == (
        "tenant 'acme' has managed auth and can be reached without a key by header "
        "'X-Tenant-ID' and path_prefix '/t/' resolution: list who may in "
        "server.trusted_networks, or set allow_unauthenticated: true on the tenant"
    )


def test_default_tenant_counts_as_keyless(tmp_path: Path) -> None:
    text = (MANAGED_BY_HEADER % ("", "")).replace(
        "  resolution: [{header: X-Tenant-ID}, {path_prefix: /t/}, {api_key_mapping: true}]",
        "  resolution: [{api_key_mapping: true}]\n  default_tenant: acme",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), require_secrets=False)
    assert "reached without a key by default_tenant resolution" in str(caught.value)


@pytest.mark.parametrize(
    ("server", "tenant"),
    [("trusted_networks: [10.0.0.0/8]", ""), ("", "      allow_unauthenticated: true\n")],
)
def test_keyless_access_said_explicitly_is_accepted(
    tmp_path: Path, server: str, tenant: str
) -> None:
    loaded = load_config(
        write(tmp_path, MANAGED_BY_HEADER % (server, tenant)), require_secrets=False
    )
    assert "acme" in loaded.model.tenants.configs


def _net(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_forwarded_for_is_read_only_past_trusted_proxies() -> None:
    proxies = _net("10.0.0.0/24")
    # Not a proxy: its header is ignored.
    assert client_address(_ip("192.0.2.1"), "10.9.9.9", proxies) == _ip("192.0.2.1")
    # A proxy: the hop it vouches for.
    assert client_address(_ip("10.0.0.5"), "198.51.100.7", proxies) == _ip("198.51.100.7")
    # Two proxies: right to left, past every trusted one; what a client wrote is not read.
    chain = "6.6.6.6, 198.51.100.7, 10.0.0.9"
    assert client_address(_ip("10.0.0.5"), chain, proxies) == _ip("198.51.100.7")
    # A proxy with no header: the proxy is the client.
    assert client_address(_ip("10.0.0.5"), None, proxies) == _ip("10.0.0.5")
    # Garbage from a trusted proxy: unknown, so refused by any allow-list.
    assert client_address(_ip("10.0.0.5"), "not-an-ip", proxies) is None
    assert client_address(None, "198.51.100.7", proxies) is None


def _attributes(address: str) -> dict[str, Struct]:
    fields = Struct()
    fields.update({"source.address": address})
    return {"envoy.filters.http.ext_proc": fields}


def test_gate_checks_allowed_cidrs_and_keyless_access(tmp_path: Path) -> None:
    text = (MANAGED_BY_HEADER % ("trusted_networks: [10.0.0.0/8]", "")).replace(
        "  configs:\n",
        '  configs:\n    office:\n      backend_url: "http://127.0.0.1:9001/v1"\n'
        "      allowed_cidrs: [192.168.0.0/16, '2001:db8::/32']\n",
    )
    gate = AccessGate.from_config(load_config(write(tmp_path, text), require_secrets=False).model)
    assert gate.check("office", True, _attributes("192.168.1.1:5000"), None) is None
    assert gate.check("office", True, _attributes("[2001:db8::1]:443"), None) is None
    assert gate.check("office", True, _attributes("172.16.0.1:5000"), None) == ADDRESS_NOT_ALLOWED
    assert gate.check("office", True, None, None) == ADDRESS_NOT_ALLOWED  # no address: refused
    # Managed auth without a key: only from trusted networks; with a key, from anywhere.
    assert gate.check("acme", False, _attributes("10.1.1.1:1"), None) is None
    assert gate.check("acme", False, _attributes("172.16.0.1:1"), None) == KEY_REQUIRED
    assert gate.check("acme", True, _attributes("172.16.0.1:1"), None) is None
