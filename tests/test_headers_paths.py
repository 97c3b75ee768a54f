"""Repeated headers, client paths and request ids (client_paths.py, request_id.py,
tenancy.client_keys, mutations.header_map): nothing a client sends twice or writes oddly
lets it borrow a tenant, leak a key upstream, leave the base path or forge an id."""

from __future__ import annotations

import re

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders
from hypothesis import given, settings
from hypothesis import strategies as st

from checkstream.accounting.accounts import Tally
from checkstream.gateway.backends import backend_from_url
from checkstream.gateway.mutations import header_map
from checkstream.intake.client_paths import UnsafePath, normalize_client_path
from checkstream.intake.request_id import MAX_LENGTH, request_id
from checkstream.tenants.resolution import client_keys
from tests.test_tenancy import CHAT, ok, refused, resolver


def _envoy_headers(*pairs: tuple[str, str]) -> HttpHeaders:
    return HttpHeaders(
        headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
    )


# -- repeated headers ---------------------------------------------------------------------


def test_header_map_keeps_every_value_of_a_repeated_header() -> None:
    headers = header_map(
        _envoy_headers(("x-api-key", "sk-cs-acme"), ("x-api-key", "sk-other"), ("a", "1"))
    )
    assert headers == {"x-api-key": "sk-cs-acme,sk-other", "a": "1"}


def test_client_keys_reads_every_value() -> None:
    assert client_keys({"x-api-key": "k1, k2", "authorization": "Bearer a,Bearer b"}) == [
        "a",
        "b",
        "k1",
        "k2",
    ]


def test_repeated_keys_of_two_tenants_are_refused() -> None:
    found = refused(resolver().resolve(CHAT, {"x-api-key": "sk-cs-acme,sk-cs-claude"}))
    assert (found.status, found.code) == (403, "tenant_mismatch")
    found = refused(
        resolver().resolve(CHAT, {"authorization": "Bearer sk-cs-claude,Bearer sk-cs-acme"})
    )
    assert found.status == 403


def test_our_key_in_a_repeated_header_is_recognised_as_ours() -> None:
    found = ok(resolver().resolve(CHAT, {"x-api-key": "sk-cs-acme,sk-ant-provider-key"}))
    assert found.tenant.id == "acme"
    assert found.key_is_ours  # so neither value is forwarded upstream


def test_a_repeated_tenant_header_names_no_tenant() -> None:
    found = refused(resolver().resolve(CHAT, {"x-tenant-id": "acme,globex"}))
    assert found.status == 403


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("//v1///chat//completions", "/v1/chat/completions"),
        ("/v1/./chat/completions", "/v1/chat/completions"),
        ("/v1/models/../chat/completions?q=../x", "/v1/chat/completions?q=../x"),
        ("/v1/%2e/chat/%2E%2e/chat/completions", "/v1/chat/completions"),
        ("/v1/files/report.v2.json", "/v1/files/report.v2.json"),
        ("/v1/models/..", "/v1/"),
    ],
)
def test_paths_are_normalised(raw: str, normalised: str) -> None:
    assert normalize_client_path(raw) == normalised


@pytest.mark.parametrize(
    "raw",
    [
        "/../../t4/v1/chat/completions",
        "/v1/../../t4/v1/chat/completions",
        "/%2e%2e/t4/v1/chat/completions",
        "/v1/%2E%2E/%2e%2e/x",
        "/v1/..%2fadmin",
        "/v1/..%5Cadmin",
        "/v1\\..\\admin",
        "/v1/chat%00/completions",
        "v1/chat/completions",
    ],
)
def test_unsafe_paths_are_refused(raw: str) -> None:
    with pytest.raises(UnsafePath):
        normalize_client_path(raw)


def test_resolver_refuses_an_unsafe_path_with_400_and_returns_normalised_ones() -> None:
    found = refused(resolver().resolve("/v1/../../globex/v1/x", {"x-tenant-id": "acme"}))
    assert (found.status, found.code) == (400, "invalid_path")
    assert ok(resolver().resolve("//v1/./chat//completions", {"x-tenant-id": "acme"})).path == (
        CHAT
    )


def test_path_prefix_resolution_sees_the_normalised_path() -> None:
    tenants = {"resolution": [{"path_prefix": "/tenant/"}]}
    found = ok(resolver(**tenants).resolve("/tenant/acme/../globex/v1/chat", {}))
    assert (found.tenant.id, found.path) == ("globex", "/v1/chat")


_SEGMENTS = st.sampled_from(["..", ".", "%2e%2e", "%2E.", "", "v1", "a", "chat", "%2e", "x.y"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_SEGMENTS, max_size=8), st.sampled_from(["/base/v1", "/v1", "", "/a/b"]))
def test_the_upstream_path_never_leaves_the_base_path(segments: list[str], base: str) -> None:
    backend = backend_from_url(f"http://127.0.0.1:9{base}")
    client = "/" + "/".join(segments)
    try:
        upstream = backend.upstream_path(client)
    except UnsafePath:
        return
    assert upstream == base or upstream.startswith(base + "/")
    rest = upstream[len(base) :].split("/")
    assert ".." not in rest and "." not in rest
    assert not re.search("%2e", upstream, re.IGNORECASE)
    assert "//" not in upstream


# -- request ids ----------------------------------------------------------------------------


def test_a_safe_client_request_id_is_used() -> None:
    assert request_id("req-42:a.b_C") == request_id("req-42:a.b_C")
    assert request_id("req-42:a.b_C").value == "req-42:a.b_C"
    assert request_id("x" * MAX_LENGTH).client is None


@pytest.mark.parametrize(
    "client",
    ["x" * (MAX_LENGTH + 1), 'a"b', "a b", "a\nfake-audit-line", "é", "a,b", "x" * 60_000],
)
def test_an_unsafe_client_request_id_is_replaced_and_kept_capped(client: str) -> None:
    chosen = request_id(client)
    assert re.fullmatch("[0-9a-f]{32}", chosen.value)
    assert chosen.client == client[:MAX_LENGTH]


def test_no_client_request_id_gets_a_generated_one() -> None:
    assert request_id(None).client is None
    assert request_id("").client is None
    assert request_id(None).value != request_id(None).value


def test_tally_uses_the_chosen_id() -> None:
    tally = Tally.start("acme", "z" * 500)
    assert len(tally.request_id) == 32
    assert tally.client_request_id == "z" * MAX_LENGTH
    assert Tally.start("acme", "ok-1").request_id == "ok-1"
