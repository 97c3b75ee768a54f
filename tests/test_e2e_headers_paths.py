"""Odd paths and repeated key headers through real Envoy + extproc (tenants in conftest.py:
``alpha`` has a managed key and backend ``a``/v1, ``beta`` passes the client's key to
backend ``b``)."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from tests.support import Gateway, RecordingUpstream

pytestmark = pytest.mark.e2e

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _send(
    gateway: Gateway, path: str, headers: list[tuple[str, str]], payload: Any = CHAT
) -> tuple[int, Any]:
    """One request with the path and headers exactly as given (repeats included)."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=20)
    body = json.dumps(payload).encode()
    conn.putrequest("POST", path, skip_host=False, skip_accept_encoding=True)
    for name, value in [("content-type", "application/json"), *headers]:
        conn.putheader(name, value)
    conn.putheader("content-length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data else None


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../../t4/v1/chat/completions",
        "/../v1/chat/completions",
        "/%2e%2e/t4/v1/chat/completions",
        "/v1/%2E%2e/%2e%2e/x/v1/chat/completions",
        "/v1/..%2f..%2fadmin",
    ],
)
def test_a_path_leaving_the_root_is_refused_before_the_backend(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream], path: str
) -> None:
    before = len(upstreams["a"].received)
    status, body = _send(gateway, path, [("x-api-key", "sk-cs-alpha")])
    assert status == 400, body
    assert body["error"]["code"] == "invalid_path"
    assert len(upstreams["a"].received) == before


def test_dot_segments_and_double_slashes_reach_the_backend_normalised(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    for path in ("//v1/./chat//completions", "/v1/models/%2e%2e/chat/completions?x=1"):
        status, body = _send(gateway, path, [("x-api-key", "sk-cs-alpha")])
        assert status == 200, body
        assert upstreams["a"].last().path in ("/v1/chat/completions", "/v1/chat/completions?x=1")


def test_repeated_keys_of_two_tenants_are_refused(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    before = len(upstreams["a"].received), len(upstreams["b"].received)
    for headers in (
        [("x-api-key", "sk-cs-alpha"), ("x-api-key", "sk-cs-beta")],
        [("authorization", "Bearer sk-cs-beta"), ("authorization", "Bearer sk-cs-alpha")],
    ):
        status, body = _send(gateway, "/v1/chat/completions", headers)
        assert status == 403, body
        assert body["error"]["code"] == "tenant_mismatch"
    assert (len(upstreams["a"].received), len(upstreams["b"].received)) == before


def test_our_key_in_a_repeated_header_is_never_forwarded(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    payload = {"model": "claude", "max_tokens": 5, "messages": CHAT["messages"]}
    status, body = _send(
        gateway,
        "/v1/messages",
        [("x-api-key", "sk-cs-beta"), ("x-api-key", "sk-ant-client-own")],
        payload,
    )
    assert status == 200, body
    got = upstreams["b"].last()
    assert "x-api-key" not in got.headers
    assert not any("sk-cs-beta" in value for value in got.headers.values())
