"""End to end: client -> real Envoy -> real extproc (gRPC) -> local upstreams, all on 127.0.0.1.

One gateway (``tests/conftest.py``) serves these tests, started exactly as a user starts it
(``checkstream run -c FILE``), with tenants that cover each resolution mode and auth style.
"""

from __future__ import annotations

import http.client
import time
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import ALPHA_SECRET
from tests.support import (
    AWKWARD_STREAM,
    Gateway,
    RecordingUpstream,
    gateway_ports,
    request,
    start_gateway,
    write_config,
)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


# -- tenancy -------------------------------------------------------------------------------
def test_header_resolution_routes_to_the_tenants_backend(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    reply = request(f"{gateway.url}/v1/chat/completions", CHAT, {"X-Tenant-ID": "beta"})
    assert reply.status == 200, reply.body
    assert reply.json()["upstream"] == "b"
    got = upstreams["b"].last()
    assert got.path == "/v1/chat/completions"
    assert got.method == "POST"
    assert b'"hello"' in got.body
    assert "x-checkstream-route" not in got.headers


def test_path_prefix_resolution_rewrites_the_path(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    reply = request(f"{gateway.url}/tenant/alpha/v1/chat/completions?trace=1", CHAT)
    assert reply.status == 200, reply.body
    assert reply.json() == {"upstream": "a", "path": "/v1/chat/completions?trace=1"}


def test_backend_base_path_is_kept_and_v1_not_doubled(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    reply = request(f"{gateway.url}/v1/models", headers={"Authorization": "Bearer sk-cs-gamma"})
    assert reply.status == 200, reply.body
    assert reply.json() == {"upstream": "a", "path": "/custom/v1/models"}


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer sk-cs-beta"}, {"x-api-key": "sk-cs-beta"}],
    ids=["bearer", "x-api-key"],
)
def test_api_key_resolution(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream], headers: dict[str, str]
) -> None:
    reply = request(f"{gateway.url}/v1/messages", {"model": "m"}, headers)
    assert reply.status == 200, reply.body
    assert reply.json()["upstream"] == "b"
    got = upstreams["b"].last()
    # auth_passthrough forwards the client's own provider key, never a CheckStream key.
    assert "authorization" not in got.headers
    assert "x-api-key" not in got.headers


def test_combined_methods_that_agree_are_accepted(gateway: Gateway) -> None:
    reply = request(
        f"{gateway.url}/tenant/beta/v1/messages",
        {"model": "m"},
        {"X-Tenant-ID": "beta", "x-api-key": "sk-cs-beta"},
    )
    assert reply.status == 200, reply.body
    assert reply.json()["upstream"] == "b"


def test_key_for_one_tenant_cannot_borrow_another(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    before = len(upstreams["a"].received)
    reply = request(
        f"{gateway.url}/v1/chat/completions",
        CHAT,
        {"Authorization": "Bearer sk-cs-beta", "X-Tenant-ID": "alpha"},
    )
    assert reply.status == 403
    # beta's key binds beta, so the error is in beta's (Anthropic) format.
    assert reply.json()["type"] == "error"
    assert reply.json()["error"]["type"] == "permission_error"
    assert len(upstreams["a"].received) == before


def test_path_naming_another_tenant_than_the_key_is_refused(gateway: Gateway) -> None:
    reply = request(
        f"{gateway.url}/tenant/alpha/v1/chat/completions",
        CHAT,
        {"Authorization": "Bearer sk-cs-gamma"},
    )
    assert reply.status == 403
    assert reply.json()["error"]["code"] == "tenant_mismatch"


def test_unknown_key_is_401_and_unresolved_is_403(gateway: Gateway) -> None:
    unknown = request(
        f"{gateway.url}/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-nobody"}
    )
    assert unknown.status == 401
    assert unknown.json()["error"]["code"] == "invalid_api_key"
    nothing = request(f"{gateway.url}/v1/chat/completions", CHAT)
    assert nothing.status == 403
    assert nothing.json()["error"]["type"] == "permission_error"
    ghost = request(f"{gateway.url}/v1/chat/completions", CHAT, {"X-Tenant-ID": "ghost"})
    assert ghost.status == 403
    assert ghost.json()["error"]["code"] == "unknown_tenant"


def test_client_cannot_choose_the_route_itself(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    reply = request(
        f"{gateway.url}/v1/chat/completions",
        CHAT,
        {"X-Tenant-ID": "beta", "x-checkstream-route": "alpha"},
    )
    assert reply.status == 200
    assert reply.json()["upstream"] == "b"


# -- auth ----------------------------------------------------------------------------------
def test_managed_key_is_injected_and_client_key_never_reaches_backend(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    reply = request(
        f"{gateway.url}/v1/chat/completions",
        CHAT,
        {"Authorization": "Bearer sk-cs-alpha", "x-api-key": "sk-cs-alpha"},
    )
    assert reply.status == 200, reply.body
    got = upstreams["a"].last()
    assert got.headers["authorization"] == f"Bearer {ALPHA_SECRET}"
    assert "x-api-key" not in got.headers
    assert got.headers["x-upstream-project"] == "alpha-project"
    assert "sk-cs-alpha" not in str(got.headers)


def test_passthrough_forwards_the_clients_own_key(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    reply = request(
        f"{gateway.url}/v1/messages",
        {"model": "m"},
        {"X-Tenant-ID": "beta", "x-api-key": "sk-ant-client-own"},
    )
    assert reply.status == 200
    assert upstreams["b"].last().headers["x-api-key"] == "sk-ant-client-own"


# -- request body --------------------------------------------------------------------------
def test_model_outside_allowlist_never_reaches_backend(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    before = len(upstreams["a"].received)
    reply = request(
        f"{gateway.url}/v1/chat/completions",
        {**CHAT, "model": "gpt-4o"},
        {"Authorization": "Bearer sk-cs-gamma"},
    )
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "model_not_allowed"
    assert len(upstreams["a"].received) == before


def test_malformed_json_gets_400_in_tenant_format(gateway: Gateway) -> None:
    reply = request(
        f"{gateway.url}/v1/chat/completions",
        b'{"model": "gpt-4o-mini", "messages": [',
        {"Authorization": "Bearer sk-cs-gamma"},
    )
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "invalid_json"


def test_oversized_body_gets_413_in_tenant_format(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    before = len(upstreams["a"].received)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 200_000}]}
    reply = request(
        f"{gateway.url}/v1/chat/completions", big, {"Authorization": "Bearer sk-cs-gamma"}
    )
    assert reply.status == 413
    assert reply.json()["error"]["code"] == "request_too_large"
    assert len(upstreams["a"].received) == before


# -- streaming -----------------------------------------------------------------------------
def _stream(gateway: Gateway, headers: dict[str, str]) -> tuple[list[tuple[float, bytes]], float]:
    """Read a streamed answer as it arrives: (arrival time, bytes) per read, and the start."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=20)
    start = time.monotonic()
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=b'{"model": "gpt-4o-mini", "stream": true}',
        headers=headers,
    )
    response = conn.getresponse()
    assert response.status == 200
    pieces = []
    while chunk := response.read1(65536):
        pieces.append((time.monotonic(), chunk))
    conn.close()
    return pieces, start


@pytest.mark.parametrize("tenant", ["alpha", "gamma"], ids=["passthrough", "body-processed"])
def test_streaming_is_byte_identical_and_incremental(gateway: Gateway, tenant: str) -> None:
    headers = {"X-Tenant-ID": tenant, "x-test-stream": "150", "Content-Type": "application/json"}
    if tenant == "gamma":
        headers["Authorization"] = "Bearer sk-cs-gamma"
    pieces, _ = _stream(gateway, headers)
    assert b"".join(p for _, p in pieces) == b"".join(AWKWARD_STREAM)
    if tenant == "alpha":
        # The first bytes arrive while the upstream is still writing (it pauses 150 ms
        # between its 7 writes), not all at once at the end. (A checked stream holds this
        # little text back until it ends: see test_checked_stream_is_incremental.)
        first_at, last_at = pieces[0][0], pieces[-1][0]
        assert last_at - first_at > 0.5
        assert len(pieces) >= 4


def test_checked_stream_is_incremental(gateway: Gateway) -> None:
    """Midstream checks hold back only a few tokens: most of the answer flows as it comes."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=20)
    body = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    conn.request(
        "POST",
        "/tenant/demo-checked/v1/chat/completions",
        body=body,
        headers={"x-demo-chunks": "40", "x-demo-delay-ms": "40"},
    )
    response = conn.getresponse()
    assert response.status == 200
    start = time.monotonic()
    arrivals = []
    while chunk := response.read1(65536):
        arrivals.append((time.monotonic() - start, chunk))
    conn.close()
    total = arrivals[-1][0]
    first_text = next(t for t, c in arrivals if b'"content":"This' in c)
    # The upstream takes ~1.6 s; text starts flowing long before it finishes.
    assert total > 1.2
    assert first_text < total - 0.8
    assert b"".join(c for _, c in arrivals).rstrip().endswith(b"data: [DONE]")


# -- official SDKs -------------------------------------------------------------------------
@pytest.mark.parametrize("tenant", ["demo-openai", "demo-checked"])
def test_openai_sdk_streamed_and_not(gateway: Gateway, tenant: str) -> None:
    client = openai.OpenAI(
        base_url=f"{gateway.url}/tenant/{tenant}/v1", api_key="sk-anything", max_retries=0
    )
    messages: Any = [{"role": "user", "content": "ping"}]
    whole = client.chat.completions.create(model="checkstream-demo", messages=messages)
    text = whole.choices[0].message.content or ""
    assert text.startswith("This is the CheckStream demo upstream. You said: ping.")
    streamed = client.chat.completions.create(
        model="checkstream-demo", messages=messages, stream=True
    )
    deltas = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(deltas) == text
    assert len([d for d in deltas if d]) == len(text.split())  # one word per delta


def test_anthropic_sdk_streamed_and_not(gateway: Gateway) -> None:
    client = anthropic.Anthropic(
        base_url=f"{gateway.url}/tenant/demo-anthropic", api_key="sk-anything", max_retries=0
    )
    messages: Any = [{"role": "user", "content": "ping"}]
    whole = client.messages.create(model="claude-demo", max_tokens=64, messages=messages)
    block = whole.content[0]
    assert block.type == "text"
    assert block.text.startswith("This is the CheckStream demo upstream. You said: ping.")
    with client.messages.stream(model="claude-demo", max_tokens=64, messages=messages) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == block.text
    assert final.stop_reason == "end_turn"


# -- failures ------------------------------------------------------------------------------
def test_backend_down_is_502_in_tenant_format(gateway: Gateway) -> None:
    openai_reply = request(
        f"{gateway.url}/v1/chat/completions", CHAT, {"X-Tenant-ID": "down-openai"}
    )
    assert openai_reply.status == 502
    assert openai_reply.json()["error"]["code"] == "bad_gateway"
    anthropic_reply = request(
        f"{gateway.url}/v1/messages", {"model": "m"}, {"X-Tenant-ID": "down-anthropic"}
    )
    assert anthropic_reply.status == 502
    assert anthropic_reply.json()["type"] == "error"
    assert anthropic_reply.json()["error"]["type"] == "api_error"


def test_slow_backend_is_504_within_its_timeout(gateway: Gateway) -> None:
    started = time.monotonic()
    reply = request(
        f"{gateway.url}/v1/chat/completions",
        CHAT,
        {"X-Tenant-ID": "slow", "x-test-sleep-ms": "3000"},
    )
    elapsed = time.monotonic() - started
    assert reply.status == 504
    assert reply.json()["error"]["code"] == "timeout"
    assert elapsed < 2.5, elapsed


# -- admin ---------------------------------------------------------------------------------
def test_tenant_info_shows_only_the_callers_tenant(gateway: Gateway) -> None:
    reply = request(f"{gateway.url}/admin/tenant-info", headers={"x-api-key": "sk-cs-alpha"})
    assert reply.status == 200
    info = reply.json()
    assert info["tenant"] == "alpha"
    assert info["backend"].endswith("/v1")
    assert "rate_limit" in info
    assert ALPHA_SECRET not in reply.body.decode()
    assert "beta" not in reply.body.decode()


def test_healthz_is_ready(gateway: Gateway) -> None:
    reply = request(f"{gateway.url}/healthz")
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}


def test_gateway_logs_hold_no_secret(gateway: Gateway) -> None:
    assert ALPHA_SECRET not in gateway.log()
    assert "sk-cs-alpha" not in gateway.log()


def test_default_tenant_takes_unresolved_requests(
    tmp_path: Path, upstreams: dict[str, RecordingUpstream]
) -> None:
    config = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "tenants": {
            "default_tenant": "main",
            "configs": {"main": {"backend_url": f"http://127.0.0.1:{upstreams['a'].port}"}},
        },
    }
    gw = start_gateway(write_config(tmp_path, config))
    try:
        reply = request(f"{gw.url}/v1/chat/completions", CHAT)
        assert reply.status == 200
        assert reply.json()["upstream"] == "a"
        # An unknown key is not a tenant claim: the default tenant still serves it.
        keyed = request(f"{gw.url}/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-own"})
        assert keyed.status == 200
    finally:
        assert gw.stop() == 0
