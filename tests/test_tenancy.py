"""Tenant resolution (``checkstream.tenants.resolution``) and backend paths
(``checkstream.gateway.backends``)."""

from __future__ import annotations

from typing import Any

import pytest

from checkstream.config.model import CheckStreamConfig
from checkstream.gateway.backends import backend_from_url
from checkstream.tenants.resolution import Refused, Resolved, TenantResolver, client_keys

KEYS = {"sk-cs-acme": "acme", "sk-cs-claude": "claude", "sk-cs-frozen": "frozen"}
CONFIGS: dict[str, Any] = {
    "acme": {"backend_url": "https://api.openai.com/v1"},
    "globex": {"backend_url": "http://127.0.0.1:9001/v1"},
    "claude": {"backend_url": "https://api.anthropic.com", "streaming_format": "anthropic"},
    "frozen": {
        "backend_url": "https://api.anthropic.com",
        "streaming_format": "anthropic",
        "suspended": True,
    },
}


def resolver(secrets: dict[str, str] | None = None, **tenants: Any) -> TenantResolver:
    """A resolver over CONFIGS with the design's default resolution order."""
    data: dict[str, Any] = {"api_key_map": KEYS, "configs": CONFIGS, **tenants}
    return TenantResolver(CheckStreamConfig.model_validate({"tenants": data}), secrets or {})


def ok(found: Resolved | Refused) -> Resolved:
    assert isinstance(found, Resolved), found
    return found


def refused(found: Resolved | Refused) -> Refused:
    assert isinstance(found, Refused), found
    return found


CHAT = "/v1/chat/completions"


# -- single methods ---------------------------------------------------------------------------


def test_header() -> None:
    found = ok(resolver().resolve(CHAT, {"x-tenant-id": "globex"}))
    assert (found.tenant.id, found.path, found.key_is_ours) == ("globex", CHAT, False)
    assert found.tenant.format.name == "openai"
    assert found.tenant.backend.authority == "127.0.0.1:9001"


def test_header_name_from_config_is_case_insensitive() -> None:
    r = resolver(resolution=[{"header": "X-Org"}])
    assert ok(r.resolve(CHAT, {"x-org": "acme"})).tenant.id == "acme"


@pytest.mark.parametrize(
    ("path", "tenant", "rest"),
    [
        ("/tenant/acme/v1/chat/completions", "acme", "/v1/chat/completions"),
        ("/tenant/acme/v1/chat/completions?stream=true&a=b", "acme", CHAT + "?stream=true&a=b"),
        ("/tenant/claude/v1/messages", "claude", "/v1/messages"),
        ("/tenant/acme", "acme", "/"),
        ("/tenant/acme?x=1", "acme", "/?x=1"),
    ],
)
def test_path_prefix_rewrites_path(path: str, tenant: str, rest: str) -> None:
    found = ok(resolver().resolve(path, {}))
    assert (found.tenant.id, found.path) == (tenant, rest)


def test_path_prefix_without_trailing_slash_in_config() -> None:
    r = resolver(resolution=[{"path_prefix": "/t"}])
    found = ok(r.resolve("/t/globex/v1/models", {}))
    assert (found.tenant.id, found.path) == ("globex", "/v1/models")
    # "/tx/..." does not start with the prefix "/t/".
    assert refused(r.resolve("/tx/globex/v1/models", {})).code == "unknown_tenant"


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer sk-cs-acme"},
        {"authorization": "bearer   sk-cs-acme  "},
        {"x-api-key": "sk-cs-acme"},
        {"x-api-key": " sk-cs-acme "},
    ],
)
def test_api_key_mapping(headers: dict[str, str]) -> None:
    found = ok(resolver().resolve(CHAT, headers))
    assert (found.tenant.id, found.path, found.key_is_ours) == ("acme", CHAT, True)


def test_client_keys_reads_bearer_then_x_api_key() -> None:
    assert client_keys({"authorization": "Bearer a", "x-api-key": "b"}) == ["a", "b"]
    assert client_keys({"authorization": "Basic Zm9vOmJhcg==", "x-api-key": "b"}) == ["b"]
    assert client_keys({"authorization": "Bearer ", "x-api-key": "  "}) == []
    assert client_keys({}) == []


def test_known_key_in_x_api_key_wins_over_an_unrelated_bearer() -> None:
    found = ok(
        resolver().resolve(CHAT, {"authorization": "Bearer sk-other", "x-api-key": "sk-cs-acme"})
    )
    assert (found.tenant.id, found.key_is_ours) == ("acme", True)


def test_keys_of_two_tenants_conflict() -> None:
    found = refused(
        resolver().resolve(
            CHAT, {"authorization": "Bearer sk-cs-acme", "x-api-key": "sk-cs-claude"}
        )
    )
    assert (found.status, found.code) == (403, "tenant_mismatch")


def test_empty_tenant_segment_names_no_tenant() -> None:
    found = refused(resolver().resolve("/tenant//v1/x", {}))
    assert found.status == 403


# -- combined -----------------------------------------------------------------------------------


def test_all_methods_agreeing() -> None:
    found = ok(
        resolver().resolve(
            "/tenant/acme/v1/chat/completions",
            {"x-tenant-id": "acme", "authorization": "Bearer sk-cs-acme"},
        )
    )
    assert (found.tenant.id, found.path, found.key_is_ours) == ("acme", CHAT, True)


def test_key_for_a_and_header_naming_b_is_refused_in_key_tenants_format() -> None:
    r = resolver()
    found = refused(r.resolve(CHAT, {"x-tenant-id": "acme", "x-api-key": "sk-cs-claude"}))
    assert (found.status, found.code) == (403, "tenant_mismatch")
    assert found.format.name == "anthropic"
    found = refused(r.resolve(CHAT, {"x-tenant-id": "claude", "x-api-key": "sk-cs-acme"}))
    assert (found.status, found.code, found.format.name) == (403, "tenant_mismatch", "openai")


def test_key_for_a_and_path_naming_b_is_refused() -> None:
    found = refused(
        resolver().resolve("/tenant/globex/v1/x", {"authorization": "Bearer sk-cs-acme"})
    )
    assert (found.status, found.code) == (403, "tenant_mismatch")


def test_header_and_path_disagreeing_is_refused_in_openai_format() -> None:
    found = refused(resolver().resolve("/tenant/acme/v1/x", {"x-tenant-id": "claude"}))
    assert (found.status, found.code, found.format.name) == (403, "tenant_mismatch", "openai")


def test_key_binds_even_when_listed_first() -> None:
    r = resolver(resolution=[{"api_key_mapping": True}, {"header": "X-Tenant-ID"}])
    found = refused(r.resolve(CHAT, {"x-tenant-id": "acme", "x-api-key": "sk-cs-claude"}))
    assert (found.code, found.format.name) == ("tenant_mismatch", "anthropic")


def test_only_configured_methods_are_used() -> None:
    r = resolver(resolution=[{"header": "X-Tenant-ID"}])
    # No path_prefix step: the path is neither read nor rewritten.
    found = ok(r.resolve("/tenant/acme/v1/x", {"x-tenant-id": "globex"}))
    assert (found.tenant.id, found.path) == ("globex", "/tenant/acme/v1/x")
    # No api_key_mapping step: a CheckStream key neither resolves nor binds a tenant ...
    assert refused(r.resolve(CHAT, {"x-api-key": "sk-cs-acme"})).status == 403
    found = ok(r.resolve(CHAT, {"x-tenant-id": "globex", "x-api-key": "sk-cs-acme"}))
    assert found.tenant.id == "globex"
    # ... but it is still recognised as ours, so it is never forwarded upstream.
    assert found.key_is_ours is True
    assert ok(r.resolve(CHAT, {"x-tenant-id": "globex", "x-api-key": "sk-x"})).key_is_ours is False


# -- defaults and refusals ----------------------------------------------------------------------


def test_default_tenant_when_nothing_names_one() -> None:
    found = ok(resolver(default_tenant="globex").resolve(CHAT, {}))
    assert (found.tenant.id, found.path, found.key_is_ours) == ("globex", CHAT, False)


def test_unknown_key_without_default_is_401() -> None:
    found = refused(resolver().resolve(CHAT, {"authorization": "Bearer sk-provider-key"}))
    assert (found.status, found.code, found.format.name) == (401, "invalid_api_key", "openai")


def test_unknown_key_with_default_goes_to_default() -> None:
    found = ok(resolver(default_tenant="acme").resolve(CHAT, {"x-api-key": "sk-provider-key"}))
    assert (found.tenant.id, found.key_is_ours) == ("acme", False)


def test_nothing_and_no_default_is_403() -> None:
    found = refused(resolver().resolve(CHAT, {}))
    assert (found.status, found.code, found.format.name) == (403, "unknown_tenant", "openai")


def test_header_naming_unknown_tenant_is_403() -> None:
    found = refused(resolver(default_tenant="acme").resolve(CHAT, {"x-tenant-id": "nobody"}))
    assert (found.status, found.code, found.format.name) == (403, "unknown_tenant", "openai")


def test_empty_header_falls_through_to_default() -> None:
    found = ok(resolver(default_tenant="acme").resolve(CHAT, {"x-tenant-id": ""}))
    assert found.tenant.id == "acme"


def test_tenancy_disabled_always_uses_default() -> None:
    r = resolver(enabled=False, default_tenant="globex")
    found = ok(r.resolve("/tenant/acme/v1/x", {"x-tenant-id": "acme", "x-api-key": "sk-cs-acme"}))
    assert (found.tenant.id, found.path) == ("globex", "/tenant/acme/v1/x")
    assert found.key_is_ours is True
    assert ok(r.resolve(CHAT, {"x-api-key": "sk-other"})).key_is_ours is False


def test_key_is_ours_only_for_api_key_map_keys() -> None:
    r = resolver(default_tenant="acme")
    assert ok(r.resolve(CHAT, {"authorization": "Bearer sk-cs-acme"})).key_is_ours is True
    assert ok(r.resolve(CHAT, {"authorization": "Bearer sk-openai-real"})).key_is_ours is False
    assert ok(r.resolve(CHAT, {"x-tenant-id": "acme"})).key_is_ours is False


def test_error_format_openai_when_no_tenant_known() -> None:
    found = refused(resolver().resolve(CHAT, {"x-tenant-id": "nobody"}))
    body = found.format.error_body(found.status, found.message, found.code)
    assert body.startswith(b'{"error": {')
    assert b'"code": "unknown_tenant"' in body


def test_secrets_are_attached_to_their_tenant() -> None:
    r = resolver(secrets={"claude": "sk-ant-secret"})
    assert r.tenants["claude"].secret == "sk-ant-secret"
    assert r.tenants["acme"].secret is None


# -- backends ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "client_path", "upstream"),
    [
        ("https://api.openai.com/v1", "/v1/chat/completions", "/v1/chat/completions"),
        ("https://api.openai.com/v1/", "/v1/chat/completions", "/v1/chat/completions"),
        ("http://h:8000/openai/v1", "/v1/models?x=1", "/openai/v1/models?x=1"),
        ("http://h", "/v1/x", "/v1/x"),
        ("http://h/", "/v1/x?a=/v1/", "/v1/x?a=/v1/"),
        ("http://h/proxy", "/v1/x", "/proxy/v1/x"),
        ("https://api.openai.com/v1", "/v1", "/v1"),
        # Only a whole "/v1" segment is shared.
        ("https://api.openai.com/v1", "/v10/x", "/v1/v10/x"),
        ("https://api.openai.com/v1", "/models", "/v1/models"),
        ("http://h/api/v1x", "/v1/a", "/api/v1x/v1/a"),
    ],
)
def test_upstream_path(url: str, client_path: str, upstream: str) -> None:
    assert backend_from_url(url).upstream_path(client_path) == upstream


@pytest.mark.parametrize(
    ("url", "authority", "port"),
    [
        ("http://h", "h", 80),
        ("http://h:80", "h", 80),
        ("https://api.openai.com/v1", "api.openai.com", 443),
        ("https://api.openai.com:443", "api.openai.com", 443),
        ("https://h:8443", "h:8443", 8443),
        ("http://h:8000/openai/v1", "h:8000", 8000),
        ("http://h:443", "h:443", 443),
        ("https://h:80", "h:80", 80),
        ("http://[::1]:8000", "[::1]:8000", 8000),
        ("http://[::1]", "[::1]", 80),
    ],
)
def test_authority(url: str, authority: str, port: int) -> None:
    backend = backend_from_url(url)
    assert (backend.authority, backend.port) == (authority, port)
    assert backend.tls is url.startswith("https://")


def test_cluster_names() -> None:
    names = {
        url: backend_from_url(url).cluster_name
        for url in (
            "http://h",
            "https://h",
            "http://h:8080",
            "http://g",
            "http://h:80/v1",
            "https://h:443/other",
            "http://my-host",
            "http://my.host",
        )
    }
    assert names["http://h"] == names["http://h:80/v1"] == "backend_http_h_80"
    assert names["https://h"] == names["https://h:443/other"] == "backend_https_h_443"
    distinct = {names[u] for u in ("http://h", "https://h", "http://h:8080", "http://g")}
    assert len(distinct) == 4
    # Different hosts never share a cluster (that would send one tenant to another's backend).
    assert names["http://my-host"] != names["http://my.host"]
    assert backend_from_url("https://api.openai.com/v1").cluster_name == (
        "backend_https_api_openai_com_443"
    )
    # Envoy's stats would misparse dots in cluster names.
    assert all(
        "." not in n and n.replace("_", "").replace("-", "").isalnum() for n in names.values()
    )
