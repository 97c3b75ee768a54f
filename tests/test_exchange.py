"""``checkstream.gateway.exchange.Exchange`` fed real ext_proc protobuf messages (no gRPC, no
Envoy)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingResponse,
)
from google.protobuf.json_format import MessageToDict

from checkstream.config.model import load_config
from checkstream.gateway.exchange import Exchange
from checkstream.gateway.runtime import Runtime

OPENAI_SECRET = "sk-upstream-openai-SECRET-1"
ANTHROPIC_SECRET = "sk-ant-upstream-SECRET-2"
CHAT = "/v1/chat/completions"

CONFIG = """\
# Usage off: these tests look at the messages each tenant's guardrails need, nothing more.
usage: {enabled: false}
tenants:
  resolution:
    - header: "X-Tenant-ID"
    - path_prefix: "/tenant/"
    - api_key_mapping: true
  api_key_map:
    sk-cs-plain: plain
    sk-cs-gated: gated
    sk-cs-claude: claude
  configs:
    plain:
      backend_url: "https://api.openai.com/v1"
      auth_passthrough: true
    bare:
      backend_url: "http://127.0.0.1:9001"
    gated:
      backend_url: "http://127.0.0.1:9001/proxy/v1"
      models: [gpt-4o-mini, gpt-4o]
      auth: {type: bearer, token_env: CS_TEST_OPENAI_KEY}
      allow_unauthenticated: true
    claude:
      backend_url: "https://api.anthropic.com"
      streaming_format: anthropic
      headers: {Anthropic-Version: "2023-06-01"}
      models: [claude-3-5-haiku]
      auth: {type: bearer, token_env: CS_TEST_ANTHROPIC_KEY}
      allow_unauthenticated: true
    frozen:
      backend_url: "https://api.openai.com/v1"
      suspended: true
"""


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    monkeypatch.setenv("CS_TEST_OPENAI_KEY", OPENAI_SECRET)
    monkeypatch.setenv("CS_TEST_ANTHROPIC_KEY", ANTHROPIC_SECRET)
    path = tmp_path / "checkstream.yaml"
    path.write_text(CONFIG)
    return Runtime.from_config(load_config(path))


def request_headers(path: str, method: str = "POST", **headers: str) -> HttpHeaders:
    """Envoy's request headers message; ``x_tenant_id=`` becomes ``x-tenant-id``."""
    values = [
        HeaderValue(key=":method", raw_value=method.encode()),
        HeaderValue(key=":path", raw_value=path.encode()),
        HeaderValue(key=":authority", raw_value=b"gateway.local"),
        HeaderValue(key="content-type", raw_value=b"application/json"),
    ]
    values += [
        HeaderValue(key=name.replace("_", "-"), raw_value=value.encode())
        for name, value in headers.items()
    ]
    return HttpHeaders(headers=HeaderMap(headers=values), end_of_stream=False)


def sets(response: ProcessingResponse) -> dict[str, str]:
    assert response.WhichOneof("response") == "request_headers", response
    mutation = response.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def removes(response: ProcessingResponse) -> list[str]:
    return list(response.request_headers.response.header_mutation.remove_headers)


def immediate(response: ProcessingResponse) -> tuple[int, dict[str, str], Any]:
    """Status, headers and JSON body of an immediate response."""
    assert response.WhichOneof("response") == "immediate_response", response
    answer = response.immediate_response
    headers = {h.header.key: h.header.raw_value.decode() for h in answer.headers.set_headers}
    return answer.status.code, headers, json.loads(answer.body)


def headers_answer(runtime: Runtime, msg: HttpHeaders) -> ProcessingResponse:
    """A fresh exchange's answer to request headers, from a test without an event loop."""
    return asyncio.run(Exchange(runtime).on_request_headers(msg))


def body(data: bytes, end: bool = True) -> HttpBody:
    return HttpBody(body=data, end_of_stream=end)


# -- forwarding -------------------------------------------------------------------------------


def test_pass_through_tenant_one_message_per_request(runtime: Runtime) -> None:
    response = headers_answer(runtime, request_headers("/tenant/plain" + CHAT))
    assert sets(response) == {"x-checkstream-route": "plain", ":path": CHAT}
    assert response.request_headers.response.clear_route_cache is True
    assert response.request_headers.response.status == 0  # CONTINUE
    mode = response.mode_override
    assert response.HasField("mode_override")
    assert mode.request_body_mode == ProcessingMode.NONE
    assert mode.response_header_mode == ProcessingMode.SKIP
    assert mode.response_body_mode == ProcessingMode.NONE
    assert mode.response_trailer_mode == ProcessingMode.SKIP
    assert not response.HasField("dynamic_metadata")


def test_route_header_values_use_overwrite(runtime: Runtime) -> None:
    response = headers_answer(runtime, request_headers(CHAT, x_tenant_id="plain"))
    options = response.request_headers.response.header_mutation.set_headers
    assert options[0].header.key == "x-checkstream-route"
    assert all(o.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD for o in options)


def test_path_not_rewritten_when_unchanged(runtime: Runtime) -> None:
    # backend_url ends in /v1 and the client path starts with /v1/: the path is kept.
    response = headers_answer(runtime, request_headers(CHAT, x_tenant_id="plain"))
    assert sets(response) == {"x-checkstream-route": "plain"}


def test_path_prefix_query_kept(runtime: Runtime) -> None:
    response = headers_answer(runtime, request_headers("/tenant/bare/v1/models?limit=2"))
    assert sets(response)[":path"] == "/v1/models?limit=2"
    assert sets(response)["x-checkstream-route"] == "bare"


def test_backend_base_path_is_put_in_front(runtime: Runtime) -> None:
    response = headers_answer(
        runtime, request_headers(CHAT + "?x=1", authorization="Bearer sk-cs-gated")
    )
    assert sets(response)[":path"] == "/proxy/v1/chat/completions?x=1"


def test_tenant_headers_are_set(runtime: Runtime) -> None:
    response = headers_answer(runtime, request_headers(CHAT, x_api_key="sk-cs-claude"))
    assert sets(response)["anthropic-version"] == "2023-06-01"


# -- models allowlist and request body ----------------------------------------------------------


def test_models_tenant_buffers_request_body(runtime: Runtime) -> None:
    response = headers_answer(runtime, request_headers(CHAT, x_tenant_id="gated"))
    assert response.mode_override.request_body_mode == ProcessingMode.BUFFERED
    assert response.mode_override.response_body_mode == ProcessingMode.NONE
    assert response.mode_override.response_header_mode == ProcessingMode.SKIP


async def _gated_exchange(runtime: Runtime, tenant: str = "gated") -> Exchange:
    exchange = Exchange(runtime)
    await exchange.on_request_headers(request_headers(CHAT, x_tenant_id=tenant))
    return exchange


async def test_allowed_model_passes(runtime: Runtime) -> None:
    exchange = await _gated_exchange(runtime)
    response = await exchange.on_request_body(body(b'{"model": "gpt-4o-mini", "messages": []}'))
    assert response.WhichOneof("response") == "request_body"
    assert not response.request_body.response.HasField("body_mutation")


async def test_disallowed_model_is_refused_in_openai_format(runtime: Runtime) -> None:
    exchange = await _gated_exchange(runtime)
    status, headers, error = immediate(await exchange.on_request_body(body(b'{"model": "gpt-4"}')))
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert error["error"]["code"] == "model_not_allowed"
    assert error["error"]["type"] == "invalid_request_error"
    assert "'gpt-4'" in error["error"]["message"]


async def test_disallowed_model_is_refused_in_anthropic_format(runtime: Runtime) -> None:
    exchange = await _gated_exchange(runtime, "claude")
    status, _, error = immediate(await exchange.on_request_body(body(b'{"model": "claude-opus"}')))
    assert status == 400
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["code"] == "model_not_allowed"


async def test_missing_model_is_refused(runtime: Runtime) -> None:
    exchange = await _gated_exchange(runtime)
    status, _, error = immediate(await exchange.on_request_body(body(b'{"messages": []}')))
    assert (status, error["error"]["code"]) == (400, "model_not_allowed")


async def test_body_in_several_chunks_is_judged_whole(runtime: Runtime) -> None:
    exchange = await _gated_exchange(runtime)
    first = await exchange.on_request_body(body(b'{"model": "gpt-', end=False))
    assert first.WhichOneof("response") == "request_body"
    status, _, error = immediate(await exchange.on_request_body(body(b'5"}')))
    assert status == 400
    assert "'gpt-5'" in error["error"]["message"]


async def test_malformed_json_is_400(runtime: Runtime) -> None:
    exchange = await _gated_exchange(runtime)
    status, _, error = immediate(await exchange.on_request_body(body(b'{"model": "gpt-4o",')))
    assert status == 400
    assert error["error"]["code"] == "invalid_json"
    assert error["error"]["type"] == "invalid_request_error"


async def test_malformed_json_is_400_in_anthropic_format(runtime: Runtime) -> None:
    exchange = await _gated_exchange(runtime, "claude")
    status, _, error = immediate(await exchange.on_request_body(body(b"\xff\xfe")))
    assert status == 400
    assert (error["type"], error["error"]["code"]) == ("error", "invalid_json")


async def test_unhashable_model_is_refused_not_crashing(runtime: Runtime) -> None:
    exchange = await _gated_exchange(runtime)
    status, _, error = immediate(await exchange.on_request_body(body(b'{"model": ["gpt-4o"]}')))
    assert status == 400
    assert error["error"]["code"] == "model_not_allowed"


# -- auth -------------------------------------------------------------------------------------


def test_managed_auth_openai(runtime: Runtime) -> None:
    response = headers_answer(
        runtime, request_headers(CHAT, authorization="Bearer sk-cs-gated", x_api_key="sk-client")
    )
    assert sets(response)["authorization"] == f"Bearer {OPENAI_SECRET}"
    assert "x-api-key" not in sets(response)
    # authorization is overwritten, x-api-key removed: no client key reaches the backend.
    assert removes(response) == ["x-api-key"]


def test_managed_auth_anthropic(runtime: Runtime) -> None:
    response = headers_answer(
        runtime,
        request_headers(
            CHAT, x_tenant_id="claude", x_api_key="sk-client", authorization="Bearer sk-client"
        ),
    )
    assert sets(response)["x-api-key"] == ANTHROPIC_SECRET
    assert "authorization" not in sets(response)
    assert removes(response) == ["authorization"]


def test_passthrough_keeps_the_clients_own_key(runtime: Runtime) -> None:
    response = headers_answer(
        runtime, request_headers(CHAT, x_tenant_id="plain", authorization="Bearer sk-provider-own")
    )
    assert removes(response) == []
    assert "authorization" not in sets(response)


def test_passthrough_never_forwards_a_checkstream_key(runtime: Runtime) -> None:
    response = headers_answer(runtime, request_headers(CHAT, authorization="Bearer sk-cs-plain"))
    assert sets(response)["x-checkstream-route"] == "plain"
    assert sorted(removes(response)) == ["authorization", "x-api-key"]


def test_no_auth_config_strips_client_keys(runtime: Runtime) -> None:
    response = headers_answer(
        runtime, request_headers(CHAT, x_tenant_id="bare", authorization="Bearer sk-provider-own")
    )
    assert sorted(removes(response)) == ["authorization", "x-api-key"]


# -- tenancy refusals -------------------------------------------------------------------------


def test_unknown_tenant_is_403_openai(runtime: Runtime) -> None:
    status, _, error = immediate(
        headers_answer(runtime, request_headers(CHAT, x_tenant_id="nobody"))
    )
    assert (status, error["error"]["code"]) == (403, "unknown_tenant")


def test_key_and_header_mismatch_is_403_in_key_tenants_format(runtime: Runtime) -> None:
    status, _, error = immediate(
        headers_answer(
            runtime, request_headers(CHAT, x_tenant_id="plain", x_api_key="sk-cs-claude")
        )
    )
    assert status == 403
    assert (error["type"], error["error"]["code"]) == ("error", "tenant_mismatch")


def test_suspended_tenant_is_403(runtime: Runtime) -> None:
    status, _, error = immediate(
        headers_answer(runtime, request_headers(CHAT, x_tenant_id="frozen"))
    )
    assert (status, error["error"]["code"]) == (403, "tenant_suspended")


def test_unknown_key_is_401(runtime: Runtime) -> None:
    status, _, error = immediate(
        headers_answer(runtime, request_headers(CHAT, authorization="Bearer sk-x"))
    )
    assert (status, error["error"]["code"]) == (401, "invalid_api_key")


# -- local answers ------------------------------------------------------------------------------


def test_healthz(runtime: Runtime) -> None:
    status, _, payload = immediate(headers_answer(runtime, request_headers("/healthz")))
    assert (status, payload) == (200, {"status": "ok"})
    runtime.draining = True
    status, _, payload = immediate(headers_answer(runtime, request_headers("/healthz?probe=lb")))
    assert (status, payload) == (503, {"status": "draining"})


def test_tenant_info(runtime: Runtime) -> None:
    response = headers_answer(
        runtime, request_headers("/admin/tenant-info", "GET", x_api_key="sk-cs-claude")
    )
    raw = response.immediate_response.body
    status, headers, info = immediate(response)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert info["tenant"] == "claude"
    assert info["backend"] == "https://api.anthropic.com"
    assert info["streaming_format"] == "anthropic"
    assert info["models"] == ["claude-3-5-haiku"]
    assert ANTHROPIC_SECRET.encode() not in raw
    assert OPENAI_SECRET.encode() not in raw
    assert b"sk-cs-" not in raw


def test_tenant_info_via_path_prefix(runtime: Runtime) -> None:
    status, _, info = immediate(
        headers_answer(runtime, request_headers("/tenant/gated/admin/tenant-info", "GET"))
    )
    assert (status, info["tenant"], info["backend"]) == (
        200,
        "gated",
        "http://127.0.0.1:9001/proxy/v1",
    )


def test_tenant_info_needs_a_tenant(runtime: Runtime) -> None:
    status, _, error = immediate(
        headers_answer(runtime, request_headers("/admin/tenant-info", "GET"))
    )
    assert (status, error["error"]["code"]) == (403, "unknown_tenant")


@pytest.mark.parametrize("path", ["/admin/reload", "/admin/tenants/plain/suspend", "/metrics"])
def test_operator_paths_go_to_the_admin_server(runtime: Runtime, path: str) -> None:
    # No tenant needed: the admin server checks its own token.
    response = headers_answer(runtime, request_headers(path))
    assert sets(response) == {"x-checkstream-route": "_admin"}
    assert response.mode_override.request_body_mode == ProcessingMode.NONE
    assert response.mode_override.response_header_mode == ProcessingMode.SKIP


@pytest.mark.parametrize("path", ["/metrics", "/readyz?x=1"])
def test_metrics_can_be_kept_off_the_listener(tmp_path: Path, path: str) -> None:
    config = tmp_path / "checkstream.yaml"
    config.write_text(
        "server: {metrics_on_listener: false}\nusage: {enabled: false}\n"
        "tenants: {default_tenant: t, configs: {t: {backend_url: 'http://127.0.0.1:9'}}}\n"
    )
    runtime = Runtime.from_config(load_config(config))
    status, _, body = immediate(headers_answer(runtime, request_headers(path, "GET")))
    assert (status, body) == (404, {"error": "not served on this listener"})
    # The operator's own endpoints still go to the admin server, which checks the token.
    reload = headers_answer(runtime, request_headers("/admin/reload"))
    assert sets(reload) == {"x-checkstream-route": "_admin"}


def test_tenant_info_is_only_get(runtime: Runtime) -> None:
    msg = request_headers("/admin/tenant-info", "POST", x_tenant_id="plain")
    assert sets(headers_answer(runtime, msg)) == {"x-checkstream-route": "_admin"}


# -- metadata and response body ------------------------------------------------------------------


def test_anthropic_tenant_gets_format_metadata(runtime: Runtime) -> None:
    response = headers_answer(runtime, request_headers(CHAT, x_api_key="sk-cs-claude"))
    assert response.HasField("dynamic_metadata")
    assert MessageToDict(response.dynamic_metadata) == {"checkstream": {"format": "anthropic"}}


@pytest.mark.parametrize("tenant", ["plain", "bare", "gated"])
def test_openai_tenants_get_no_metadata(runtime: Runtime, tenant: str) -> None:
    response = headers_answer(runtime, request_headers(CHAT, x_tenant_id=tenant))
    assert not response.HasField("dynamic_metadata")


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b'data: {"choices":[{"delta":{"content":"caf\xc3', False),
        (b"data: [DONE]\n\n", True),
        (b"", True),
    ],
)
async def test_response_body_is_echoed_in_full_duplex(
    runtime: Runtime, data: bytes, end: bool
) -> None:
    exchange = await _gated_exchange(runtime, "plain")
    response = await exchange.on_response_body(body(data, end))
    assert response.WhichOneof("response") == "response_body"
    streamed = response.response_body.response.body_mutation.streamed_response
    assert response.response_body.response.body_mutation.WhichOneof("mutation") == (
        "streamed_response"
    )
    assert (streamed.body, streamed.end_of_stream) == (data, end)
