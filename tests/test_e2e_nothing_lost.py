"""End to end: every request is counted exactly once, however the client leaves (#12).

One gateway (real Envoy, real extproc, the demo upstream). For each way of ending a request
(the official SDKs, sync and async, which hang up right after the last event; raw sockets
closed at random points; streams Envoy resets when the backend goes silent or drops the
connection) a tenant of its own receives the traffic, and four counts must agree: usage
ledger rows, audit request records, ``checkstream_requests_total`` and JSON request log
lines. Responses carry
``x-request-id``, the same id as in all four.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from checkstream.intake.request_ids import is_valid
from tests.support import (
    DemoUpstreamThread,
    Gateway,
    gateway_ports,
    refusing_port,
    request,
    start_gateway,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e

SDK_REQUESTS = 30
OPENAI_TENANTS = ("sdk-openai-sync", "sdk-openai-async", "raw-sockets", "reset", "ids")
ANTHROPIC_TENANTS = ("sdk-anthropic-sync", "sdk-anthropic-async")
TPM = 1000


@dataclass(frozen=True)
class Stack:
    gw: Gateway
    directory: Path
    admin_url: str

    def ledger(self, tenant: str) -> list[tuple[str, int]]:
        """(request id, status) of the tenant's ledger rows."""
        with sqlite3.connect(self.directory / "checkstream-usage.db") as conn:
            rows = conn.execute(
                "SELECT request_id, status FROM usage WHERE tenant = ?", (tenant,)
            ).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def audited(self, tenant: str) -> list[tuple[str, int]]:
        found = []
        for path in sorted((self.directory / "audit" / tenant).glob("*.jsonl")):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record["type"] == "request":
                    found.append((record["request_id"], record["status"]))
        return found

    def logged(self, tenant: str) -> list[tuple[str, int]]:
        return [
            (r["request_id"], r["status"])
            for r in self.gw.events("request")
            if r["tenant"] == tenant
        ]

    def counted(self, tenant: str) -> float:
        reply = request(f"{self.admin_url}/metrics")
        total = 0.0
        for family in text_string_to_metric_families(reply.body.decode()):
            for sample in family.samples:
                if (
                    sample.name == "checkstream_requests_total"
                    and sample.labels["tenant"] == tenant
                ):
                    total += sample.value
        return total

    def counts(self, tenant: str) -> tuple[int, int, float, int]:
        return (
            len(self.ledger(tenant)),
            len(self.audited(tenant)),
            self.counted(tenant),
            len(self.logged(tenant)),
        )

    def settled(self, tenant: str, expected: int | None = None, timeout: float = 20) -> int:
        """Wait until the four counts agree (and equal ``expected`` if given) and stay so."""

        def agree() -> bool:
            first = self.counts(tenant)
            if len(set(first)) != 1 or (expected is not None and first[0] != expected):
                return False
            time.sleep(0.5)  # nothing still on its way
            return self.counts(tenant) == first

        assert wait_until(agree, timeout), (tenant, self.counts(tenant))
        return len(self.ledger(tenant))


class ResettingBackend:
    """A backend that starts a streamed answer, then drops the connection (RST) mid-way."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                chunk = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                    + f"{len(chunk):x}\r\n".encode()
                    + chunk
                    + b"\r\n"
                )
                time.sleep(0.1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)

    def close(self) -> None:
        self.sock.close()


_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close sends RST


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    demo = DemoUpstreamThread().start(chunk_delay_ms=2)
    resetting = ResettingBackend()
    directory = tmp_path_factory.mktemp("nothing-lost")
    openai_backend = {"backend_url": f"http://127.0.0.1:{demo.port}/v1"}
    anthropic_backend = {
        "backend_url": f"http://127.0.0.1:{demo.port}",
        "streaming_format": "anthropic",
    }
    tenants: dict[str, Any] = {t: {**openai_backend} for t in OPENAI_TENANTS}
    tenants.update({t: {**anthropic_backend} for t in ANTHROPIC_TENANTS})
    # The backend's silence beyond backend_timeout_ms makes Envoy reset the stream.
    tenants["reset"]["backend_timeout_ms"] = 300
    tenants["tight"] = {**openai_backend, "rate_limit": {"tokens_per_minute": TPM}}
    tenants["tight-anthropic"] = {**anthropic_backend, "rate_limit": {"tokens_per_minute": TPM}}
    tenants["backend-reset"] = {"backend_url": f"http://127.0.0.1:{resetting.port}/v1"}
    with refusing_port() as down:
        tenants["down"] = {"backend_url": f"http://127.0.0.1:{down}/v1"}
        for config in tenants.values():
            config["audit"] = {"enabled": True}
        ports = gateway_ports()
        config = {"server": {"host": "127.0.0.1", **ports}, "tenants": {"configs": tenants}}
        gw = start_gateway(write_config(directory, config))
        try:
            yield Stack(gw, directory, f"http://127.0.0.1:{ports['admin_port']}")
        finally:
            assert gw.stop() == 0, gw.log()[-3000:]
            demo.stop()
            resetting.close()


# -- the official SDKs hang up right after the last event --------------------------------
def _openai(stack: Stack, tenant: str) -> dict[str, Any]:
    return {
        "base_url": f"{stack.gw.url}/v1",
        "api_key": "sk-anything",
        "max_retries": 0,
        "default_headers": {"X-Tenant-ID": tenant},
    }


def _anthropic(stack: Stack, tenant: str) -> dict[str, Any]:
    return {
        "base_url": stack.gw.url,
        "api_key": "sk-anything",
        "max_retries": 0,
        "default_headers": {"X-Tenant-ID": tenant},
    }


MESSAGES: Any = [{"role": "user", "content": "ping"}]


def test_openai_sdk_sync_streams_are_each_counted_once_as_200(stack: Stack) -> None:
    tenant = "sdk-openai-sync"
    with openai.OpenAI(**_openai(stack, tenant)) as client:
        for _ in range(SDK_REQUESTS):
            chunks = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text.startswith("This is the CheckStream demo upstream.")
    assert stack.settled(tenant, SDK_REQUESTS) == SDK_REQUESTS
    _all_200(stack, tenant)


def test_openai_sdk_async_streams_are_each_counted_once_as_200(stack: Stack) -> None:
    tenant = "sdk-openai-async"

    async def run() -> None:
        async with openai.AsyncOpenAI(**_openai(stack, tenant)) as client:

            async def one() -> str:
                chunks = await client.chat.completions.create(
                    model="m", messages=MESSAGES, stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in chunks])

            texts = await asyncio.gather(*(one() for _ in range(SDK_REQUESTS)))
            assert all(t.startswith("This is the CheckStream demo upstream.") for t in texts)

    asyncio.run(run())
    assert stack.settled(tenant, SDK_REQUESTS) == SDK_REQUESTS
    _all_200(stack, tenant)


def test_anthropic_sdk_sync_streams_are_each_counted_once_as_200(stack: Stack) -> None:
    tenant = "sdk-anthropic-sync"
    with anthropic.Anthropic(**_anthropic(stack, tenant)) as client:
        for _ in range(SDK_REQUESTS):
            with client.messages.stream(model="c", max_tokens=64, messages=MESSAGES) as stream:
                assert "".join(stream.text_stream).startswith("This is the CheckStream demo")
    assert stack.settled(tenant, SDK_REQUESTS) == SDK_REQUESTS
    _all_200(stack, tenant)


def test_anthropic_sdk_async_streams_are_each_counted_once_as_200(stack: Stack) -> None:
    tenant = "sdk-anthropic-async"

    async def run() -> None:
        async with anthropic.AsyncAnthropic(**_anthropic(stack, tenant)) as client:

            async def one() -> str:
                created = await client.messages.create(
                    model="c", max_tokens=64, messages=MESSAGES, stream=True
                )
                text = ""
                async for event in created:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        text += event.delta.text
                return text

            texts = await asyncio.gather(*(one() for _ in range(SDK_REQUESTS)))
            assert all(t.startswith("This is the CheckStream demo upstream.") for t in texts)

    asyncio.run(run())
    assert stack.settled(tenant, SDK_REQUESTS) == SDK_REQUESTS
    _all_200(stack, tenant)


def _all_200(stack: Stack, tenant: str) -> None:
    """Read to the end, so 200 everywhere (never 499), with the same ids in all three."""
    ledger = sorted(stack.ledger(tenant))
    assert {status for _, status in ledger} == {200}
    assert sorted(stack.audited(tenant)) == ledger
    assert sorted(stack.logged(tenant)) == ledger
    assert len({rid for rid, _ in ledger}) == len(ledger)


# -- clients that leave at any moment --------------------------------------------------------
def _raw_stream(port: int, tenant: str, read_bytes: int, rid: str) -> bool:
    """Send a streamed chat request, read ``read_bytes`` of the answer, then close; whether
    the response's status line arrived."""
    body = json.dumps({"model": "m", "stream": True, "messages": MESSAGES}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Tenant-ID: {tenant}\r\nx-request-id: {rid}\r\nx-demo-chunks: 20\r\n"
        f"x-demo-delay-ms: 15\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        while len(got) < read_bytes:
            data = sock.recv(min(4096, read_bytes - len(got)))
            if not data:
                break
            got += data
        # RST rather than FIN: the harshest way to leave.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return got.startswith(b"HTTP/1.1 ")


def test_raw_sockets_closing_at_random_points_are_each_counted_once(stack: Stack) -> None:
    tenant = "raw-sockets"
    rng = random.Random(12)
    answered = 0
    for i in range(SDK_REQUESTS):
        # From before the status line to past the end of the ~3 KB answer.
        answered += _raw_stream(stack.gw.port, tenant, rng.randrange(0, 4000), f"raw-{i}")
    settled = stack.settled(tenant)
    assert answered <= settled <= SDK_REQUESTS
    assert answered >= SDK_REQUESTS // 2, answered  # the test really cut streams mid-way
    ledger = sorted(stack.ledger(tenant))
    assert sorted(stack.audited(tenant)) == ledger
    assert sorted(stack.logged(tenant)) == ledger
    statuses = {status for _, status in ledger}
    assert 499 in statuses, statuses  # some left before the end, and are counted so


def test_streams_envoy_resets_are_each_counted_once(stack: Stack) -> None:
    tenant = "reset"
    import http.client

    for _ in range(10):
        conn = http.client.HTTPConnection("127.0.0.1", stack.gw.port, timeout=10)
        body = json.dumps({"model": "m", "stream": True, "messages": MESSAGES})
        headers = {
            "Content-Type": "application/json",
            "X-Tenant-ID": tenant,
            "x-demo-chunks": "5",
            "x-demo-delay-ms": "700",  # silence beyond the tenant's 300 ms
        }
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
        conn.close()
    assert stack.settled(tenant, 10) == 10
    assert {status for _, status in stack.ledger(tenant)} == {499}


def test_streams_the_backend_resets_are_each_counted_once(stack: Stack) -> None:
    import http.client

    tenant = "backend-reset"
    for _ in range(10):
        conn = http.client.HTTPConnection("127.0.0.1", stack.gw.port, timeout=10)
        body = json.dumps({"model": "m", "stream": True, "messages": MESSAGES})
        headers = {"Content-Type": "application/json", "X-Tenant-ID": tenant}
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
        conn.close()
    assert stack.settled(tenant, 10) == 10


# -- request ids -----------------------------------------------------------------------------
def _chat(stack: Stack, tenant: str, headers: dict[str, str], **body: Any) -> Any:
    payload = {"model": "m", "messages": MESSAGES, **body}
    return request(
        f"{stack.gw.url}/v1/chat/completions", payload, {"X-Tenant-ID": tenant, **headers}
    )


def test_every_response_carries_the_request_id_found_in_ledger_audit_and_log(
    stack: Stack,
) -> None:
    kept = _chat(stack, "ids", {"x-request-id": "client.chosen:id-1"})
    assert (kept.status, kept.headers["x-request-id"]) == (200, "client.chosen:id-1")
    streamed = _chat(stack, "ids", {"x-request-id": "client-stream-1"}, stream=True)
    assert (streamed.status, streamed.headers["x-request-id"]) == (200, "client-stream-1")
    generated = _chat(stack, "ids", {})
    fresh = generated.headers["x-request-id"]
    assert is_valid(fresh)
    # Too long or with other characters: replaced, and the client is told the new one.
    replaced = []
    for bad in ("x" * 129, "has space", "semi;colon", "ü"):
        reply = _chat(stack, "ids", {"x-request-id": bad})
        assert reply.status == 200
        rid = reply.headers["x-request-id"]
        assert rid != bad and is_valid(rid)
        replaced.append(rid)
    ids = {"client.chosen:id-1", "client-stream-1", fresh, *replaced}
    stack.settled("ids", len(ids))
    for found in (stack.ledger("ids"), stack.audited("ids"), stack.logged("ids")):
        assert {rid for rid, _ in found} == ids


@pytest.mark.parametrize(
    ("tenant", "body", "status"),
    [
        ("tight", {"max_tokens": 5000}, 400),  # refused: can never fit
        ("nobody", {}, 403),  # unknown tenant: refused before any counting
        ("down", {}, 502),  # Envoy's own error reply
        ("ids", {"stream": True}, 200),
    ],
)
def test_refusals_and_errors_carry_the_request_id_too(
    stack: Stack, tenant: str, body: dict[str, Any], status: int
) -> None:
    given = _chat(stack, tenant, {"x-request-id": f"given-{tenant}"}, **body)
    assert given.status == status, given.body
    assert given.headers["x-request-id"] == f"given-{tenant}"
    bad = _chat(stack, tenant, {"x-request-id": "bad id"}, **body)
    assert bad.status == status
    assert bad.headers["x-request-id"] != "bad id" and is_valid(bad.headers["x-request-id"])
    none = _chat(stack, tenant, {}, **body)
    assert is_valid(none.headers["x-request-id"])


# -- requests that can never fit -------------------------------------------------------------
def test_a_prompt_that_can_never_fit_is_400_naming_the_prompt(stack: Stack) -> None:
    huge = "word " * 200_000  # about 1 MB
    reply = request(
        f"{stack.gw.url}/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": huge}]},
        {"X-Tenant-ID": "tight"},
    )
    assert reply.status == 400
    assert "retry-after" not in reply.headers
    error = reply.json()["error"]
    assert error["code"] == "request_too_large"
    assert "shorten the prompt" in error["message"]
    assert str(TPM) in error["message"]
    assert "max_tokens" not in error["message"]


def test_an_answer_allowance_that_can_never_fit_is_400_naming_max_tokens(stack: Stack) -> None:
    reply = _chat(stack, "tight", {}, max_tokens=5000)
    assert reply.status == 400
    assert "retry-after" not in reply.headers
    error = reply.json()["error"]
    assert error["code"] == "request_too_large"
    assert error["message"].endswith("lower max_tokens")
    # Anthropic's shape for Anthropic tenants.
    anthropic_reply = request(
        f"{stack.gw.url}/v1/messages",
        {"model": "c", "max_tokens": 5000, "messages": MESSAGES},
        {"X-Tenant-ID": "tight-anthropic"},
    )
    assert anthropic_reply.status == 400
    assert anthropic_reply.json()["type"] == "error"
    assert "lower max_tokens" in anthropic_reply.json()["error"]["message"]
    # What fits is served.
    assert _chat(stack, "tight", {}, max_tokens=100).status == 200


# -- the log itself ----------------------------------------------------------------------------
def test_every_log_line_is_a_json_record_with_the_fixed_fields(stack: Stack) -> None:
    _chat(stack, "ids", {"x-request-id": "log-check"})
    assert wait_until(lambda: any(r.get("request_id") == "log-check" for r in stack.gw.records()))
    records = stack.gw.records()  # raises if any line is not JSON
    for record in records:
        assert {"time", "level", "logger", "event", "replica"} <= record.keys(), record
        assert record["time"].endswith("Z")
        time.strptime(record["time"][:19], "%Y-%m-%dT%H:%M:%S")
    line = next(r for r in records if r.get("request_id") == "log-check")
    assert line["worker"] == 0
    assert line["logger"] == "checkstream.requests"
    assert {"tenant", "model", "status", "latency_ms", "input_tokens", "output_tokens"} <= (
        line.keys()
    )
    launcher = [r for r in records if r["logger"] == "checkstream.launcher"]
    assert any(r["event"] == "listening" for r in launcher)
