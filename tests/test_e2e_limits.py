"""End to end: tenant limits, usage and budgets through real Envoy + extproc + demo upstream.

Everything runs on 127.0.0.1 exactly as a user starts it (``checkstream run -c FILE``):

- ``gw``: one gateway with the in-process limiter (``limits.backend: memory``), the admin
  token set, and one tenant per scenario so that tests never share counts;
- ``replicas``: two gateways (each its own Envoy, extproc, ports and usage ledger) sharing one
  real ``redis-server`` for limits and budgets;
- ``redis_down``: a gateway whose Redis URL points at a closed port.

The demo upstream reports usage (prompt tokens = words of the messages, output tokens = the
number of answer pieces, steered with ``x-demo-chunks``), so every count below is computed from
what the responses themselves report.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from checkstream.cli.main import main as checkstream
from tests.redis_server import RedisServer, redis_server
from tests.support import (
    DemoUpstreamThread,
    Gateway,
    Reply,
    free_port,
    gateway_ports,
    request,
    start_gateway,
    wait_until,
    write_config,
)

__all__ = ["redis_server"]  # the fixture is used by name

ADMIN_TOKEN = "e2e-limits-admin-token"
TOKEN_HEADER = "x-checkstream-admin-token"
# USD per million tokens. "budget-model" makes one token cost exactly $0.10.
PRICING: dict[str, dict[str, float]] = {
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4o": {"input": 2.50, "output": 10.00},
    "claude-test": {"input": 0.80, "output": 4.00},
    "budget-model": {"input": 100_000.0, "output": 100_000.0},
}
TPM = 1000
TPM_MAX_TOKENS = 400  # with the prompt "hi" (1 estimated token): 401 tokens reserved


@dataclass(frozen=True)
class Stack:
    """A running gateway and where its admin server and usage ledger are."""

    gateway: Gateway
    admin_url: str
    usage_db: Path

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def config_path(self) -> Path:
        return self.gateway.config_path


# -- helpers ---------------------------------------------------------------------------------
def period_now() -> str:
    return time.strftime("%Y-%m", time.gmtime())


def chat(
    url: str,
    tenant: str,
    content: str = "hi",
    *,
    model: str = "gpt-4o-mini",
    stream: bool = False,
    include_usage: bool = False,
    max_tokens: int | None = None,
    chunks: int | None = None,
    delay_ms: int | None = None,
) -> Reply:
    """One OpenAI chat completion through the gateway, as ``tenant``."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return request(f"{url}/v1/chat/completions", body, _demo_headers(tenant, chunks, delay_ms))


def message(
    url: str,
    tenant: str,
    content: str = "hi",
    *,
    model: str = "claude-test",
    stream: bool = False,
    max_tokens: int = 64,
    chunks: int | None = None,
) -> Reply:
    """One Anthropic Messages request through the gateway, as ``tenant``."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
    }
    if stream:
        body["stream"] = True
    return request(f"{url}/v1/messages", body, _demo_headers(tenant, chunks, None))


def _demo_headers(tenant: str, chunks: int | None, delay_ms: int | None) -> dict[str, str]:
    headers = {"X-Tenant-ID": tenant}
    if chunks is not None:
        headers["x-demo-chunks"] = str(chunks)
    if delay_ms is not None:
        headers["x-demo-delay-ms"] = str(delay_ms)
    return headers


def sse_payloads(body: bytes) -> list[Any]:
    """The JSON payloads of an SSE body's ``data:`` lines (``[DONE]`` left out)."""
    payloads = []
    for block in body.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                payloads.append(json.loads(line[len("data: ") :]))
    return payloads


def reported_usage(
    reply: Reply, *, anthropic: bool = False, stream: bool = False
) -> tuple[int, int]:
    """Input and output tokens as the backend reported them to the client."""
    assert reply.status == 200, reply.body
    if not stream:
        usage = reply.json()["usage"]
        if anthropic:
            return usage["input_tokens"], usage["output_tokens"]
        return usage["prompt_tokens"], usage["completion_tokens"]
    payloads = sse_payloads(reply.body)
    if anthropic:
        start = next(p for p in payloads if p["type"] == "message_start")
        delta = next(p for p in payloads if p["type"] == "message_delta")
        return start["message"]["usage"]["input_tokens"], delta["usage"]["output_tokens"]
    usage = [p["usage"] for p in payloads if p.get("usage")]
    assert len(usage) == 1, payloads
    return usage[0]["prompt_tokens"], usage[0]["completion_tokens"]


def cost(model: str, tokens_in: int, tokens_out: int) -> float:
    price = PRICING[model]
    return (tokens_in * price["input"] + tokens_out * price["output"]) / 1_000_000


def usage_report(config: Path, *args: str) -> list[dict[str, Any]]:
    """``checkstream usage -c CONFIG --period <this month> --format json ARGS``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = checkstream(
            ["usage", "-c", str(config), "--period", period_now(), "--format", "json", *args]
        )
    assert code == 0, out.getvalue()
    rows: list[dict[str, Any]] = json.loads(out.getvalue())
    return rows


def ledger_rows(db: Path, tenant: str) -> list[tuple[str, int]]:
    """(request id, status) of ``tenant``'s rows, read straight from SQLite."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT request_id, status FROM usage WHERE tenant = ? ORDER BY time", (tenant,)
        ).fetchall()
    finally:
        conn.close()
    return [(str(r), int(s)) for r, s in rows]


def admin_post(base: str, path: str, token: str | None = ADMIN_TOKEN) -> Reply:
    headers = {} if token is None else {TOKEN_HEADER: token}
    return request(f"{base}{path}", b"", headers, method="POST")


def tenant_info(url: str, tenant: str) -> dict[str, Any]:
    reply = request(f"{url}/admin/tenant-info", headers={"X-Tenant-ID": tenant})
    assert reply.status == 200, reply.body
    info: dict[str, Any] = reply.json()
    return info


def seconds_to_next_month(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp() - now


def assert_openai_error(reply: Reply, status: int, code: str) -> str:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == code, error
    message: str = error["message"]
    return message


def assert_anthropic_error(reply: Reply, status: int, kind: str, code: str) -> str:
    assert reply.status == status, reply.body
    body = reply.json()
    assert body["type"] == "error", body
    assert body["error"]["type"] == kind, body
    assert body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    return message


def logged_request(stack: Stack, worker: str, tenant: str) -> bool:
    """Whether ``worker`` of the gateway logged a finished request of ``tenant``."""
    index = int(worker.rpartition("-")[2])
    return any(
        r["tenant"] == tenant and r.get("worker") == index for r in stack.gateway.events("request")
    )


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (extproc workers take port, port + 1...)."""
    for _ in range(100):
        base = free_port()
        sockets: list[socket.socket] = []
        try:
            for offset in range(count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


def _start(directory: Path, config: dict[str, Any], env: dict[str, str]) -> Stack:
    ports = config["server"]
    gateway = start_gateway(write_config(directory, config), env=env)
    return Stack(gateway, f"http://127.0.0.1:{ports['admin_port']}", directory / "usage.db")


def _stop(stack: Stack) -> None:
    assert stack.gateway.stop() == 0, stack.gateway.log()


def _tenant(demo: DemoUpstreamThread, **extra: Any) -> dict[str, Any]:
    return {"backend_url": f"http://127.0.0.1:{demo.port}/v1", **extra}


def _anthropic_tenant(demo: DemoUpstreamThread, **extra: Any) -> dict[str, Any]:
    return {
        "backend_url": f"http://127.0.0.1:{demo.port}",
        "streaming_format": "anthropic",
        **extra,
    }


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limits_demo() -> Iterator[DemoUpstreamThread]:
    up = DemoUpstreamThread().start(chunk_delay_ms=1)
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, limits_demo: DemoUpstreamThread, refused: int
) -> Iterator[Stack]:
    demo = limits_demo
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "limits": {"backend": "memory"},
        "usage": {"path": "./usage.db"},
        "pricing": PRICING,
        "tenants": {
            "configs": {
                "rpm-openai": _tenant(demo, rate_limit={"requests_per_minute": 3}),
                "rpm-anthropic": _anthropic_tenant(demo, rate_limit={"requests_per_minute": 1}),
                "tpm-small": _tenant(demo, rate_limit={"tokens_per_minute": TPM}),
                "tpm-default": _tenant(
                    demo, rate_limit={"tokens_per_minute": TPM, "default_max_tokens": 2000}
                ),
                "tpm-refund": _tenant(demo, rate_limit={"tokens_per_minute": TPM}),
                "conc": _tenant(demo, rate_limit={"max_concurrent_requests": 2}),
                "conc-abandoned": _tenant(demo, rate_limit={"max_concurrent_requests": 1}),
                "conc-down": {
                    "backend_url": f"http://127.0.0.1:{refused}/v1",
                    "rate_limit": {"max_concurrent_requests": 1},
                },
                "conc-error": _tenant(demo, rate_limit={"max_concurrent_requests": 1}),
                "ledger-openai": _tenant(demo, rate_limit={"requests_per_minute": 5}),
                "ledger-anthropic": _anthropic_tenant(demo),
                "durable": _tenant(demo, rate_limit={"requests_per_minute": 6}),
                "budgeted": _tenant(demo, budget={"monthly_usd": 0.5}),
                "budget-limited": _tenant(
                    demo, rate_limit={"requests_per_minute": 10}, budget={"monthly_usd": 0.1}
                ),
                # Nothing listens at its backend: Envoy answers 502 itself.
                "budget-down": {
                    "backend_url": f"http://127.0.0.1:{refused}/v1",
                    "budget": {"monthly_usd": 10},
                },
                "susp-admin": _tenant(demo),
                "susp-token": _tenant(demo),
                "susp-listener": _anthropic_tenant(demo),
                "susp-config": _tenant(demo, suspended=True),
                "susp-config-anthropic": _anthropic_tenant(demo, suspended=True),
            }
        },
    }
    stack = _start(
        tmp_path_factory.mktemp("limits-gw"), config, {"CHECKSTREAM_ADMIN_TOKEN": ADMIN_TOKEN}
    )
    yield stack
    _stop(stack)


@dataclass(frozen=True)
class Replicas:
    a: Stack
    b: Stack


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    limits_demo: DemoUpstreamThread,
    redis_server: RedisServer,
) -> Iterator[Replicas]:
    def config(workers: int) -> dict[str, Any]:
        ports = {**gateway_ports(), "extproc_port": consecutive_free_ports(workers)}
        return {
            "server": {"host": "127.0.0.1", **ports, "extproc_workers": workers},
            "limits": {"backend": "redis", "url": redis_server.url},
            "usage": {"path": "./usage.db"},
            "pricing": PRICING,
            "tenants": {
                "configs": {
                    "shared-rpm": _tenant(limits_demo, rate_limit={"requests_per_minute": 50}),
                    "shared-budget": _tenant(limits_demo, budget={"monthly_usd": 0.3}),
                    "shared-suspended": _tenant(limits_demo),
                    "shared-everywhere": _tenant(limits_demo),
                }
            },
        }

    redis_server.forget("checkstream:*{shared-*}*", "checkstream:suspensions")
    env = {"CHECKSTREAM_ADMIN_TOKEN": ADMIN_TOKEN}
    # Replica B runs two extproc workers behind its Envoy: three processes share the counts.
    setups = [(tmp_path_factory.mktemp("replica-a"), 1), (tmp_path_factory.mktemp("replica-b"), 2)]
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda setup: _start(setup[0], config(setup[1]), env), setups)
    yield Replicas(a, b)
    _stop(a)
    _stop(b)


@pytest.fixture(scope="module")
def redis_down(
    tmp_path_factory: pytest.TempPathFactory, limits_demo: DemoUpstreamThread, refused: int
) -> Iterator[Stack]:
    demo = limits_demo
    rpm = {"requests_per_minute": 100}
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        # Nothing listens there: every limit check fails to connect.
        "limits": {"backend": "redis", "url": f"redis://127.0.0.1:{refused}/0"},
        "usage": {"path": "./usage.db"},
        "tenants": {
            "configs": {
                "closed-openai": _tenant(demo, rate_limit=rpm),
                "closed-anthropic": _anthropic_tenant(demo, rate_limit=rpm),
                "closed-budget": _tenant(demo, budget={"monthly_usd": 10}),
                "open": _tenant(demo, rate_limit=rpm, fail_mode="open"),
                "open-budget": _tenant(demo, budget={"monthly_usd": 10}, fail_mode="open"),
                "unlimited": _tenant(demo),
            }
        },
    }
    # An empty token must not become a valid one: the admin endpoints stay off (403).
    stack = _start(tmp_path_factory.mktemp("redis-down"), config, {"CHECKSTREAM_ADMIN_TOKEN": ""})
    yield stack
    _stop(stack)


# -- requests per minute ---------------------------------------------------------------------
def test_requests_per_minute_counts_down_then_refuses_in_openai_format(gw: Stack) -> None:
    started = time.time()
    for i in range(3):
        reply = chat(gw.url, "rpm-openai", stream=i == 1)
        assert reply.status == 200, reply.body
        assert reply.headers["x-ratelimit-limit"] == "3"
        assert reply.headers["x-ratelimit-remaining"] == str(2 - i)
        # A full bucket drains in 60 s; the reset is when it is empty again.
        reset = int(reply.headers["x-ratelimit-reset"])
        assert started < reset <= time.time() + 61
    refused = chat(gw.url, "rpm-openai")
    text = assert_openai_error(refused, 429, "rate_limit_exceeded")
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert "requests_per_minute" in text
    # One request drains every 20 s: the wait is at most that.
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert refused.headers["x-ratelimit-limit"] == "3"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert started < int(refused.headers["x-ratelimit-reset"]) <= time.time() + 61


def test_anthropic_tenants_429_is_anthropic_shaped(gw: Stack) -> None:
    first = message(gw.url, "rpm-anthropic", stream=True)
    assert first.status == 200, first.body
    assert first.headers["x-ratelimit-limit"] == "1"
    assert first.headers["x-ratelimit-remaining"] == "0"
    refused = message(gw.url, "rpm-anthropic")
    text = assert_anthropic_error(refused, 429, "rate_limit_error", "rate_limit_exceeded")
    assert "requests_per_minute" in text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit"] == "1"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert "x-ratelimit-reset" in refused.headers


# -- tokens per minute -----------------------------------------------------------------------
def test_max_tokens_alone_above_tokens_per_minute_is_refused(gw: Stack) -> None:
    refused = chat(gw.url, "tpm-small", max_tokens=TPM + 1)
    # It can never fit: not a rate limit (no Retry-After for SDKs to wait on), and it says
    # what to lower.
    text = assert_openai_error(refused, 400, "request_too_large")
    # "hi" is 1 estimated prompt token, plus max_tokens.
    assert f"may use about {TPM + 2} tokens" in text
    assert f"tokens_per_minute ({TPM})" in text
    assert text.endswith("lower max_tokens")
    assert "retry-after" not in refused.headers
    # Nothing was taken: a request that fits still passes, with the whole bucket.
    allowed = chat(gw.url, "tpm-small", max_tokens=TPM - 1)
    assert allowed.status == 200, allowed.body
    assert allowed.headers["x-ratelimit-remaining"] == "0"


def test_default_max_tokens_is_reserved_when_the_request_names_none(gw: Stack) -> None:
    # No max_tokens: rate_limit.default_max_tokens (2000) is reserved, more than the tpm.
    refused = chat(gw.url, "tpm-default")
    text = assert_openai_error(refused, 400, "request_too_large")
    assert "may use about 2001 tokens" in text
    assert "send a smaller max_tokens (the tenant's default_max_tokens, 2000, was applied)" in text


def test_tokens_are_reconciled_with_the_reported_usage(gw: Stack) -> None:
    """Each request reserves 401 tokens of 1000/min, so without refunds only 2 would fit
    before ~12 s of draining; settled to their real usage (4 tokens), all 12 fit."""
    reserved = 1 + TPM_MAX_TOKENS
    # Answers unstreamed, streamed with usage, and streamed without (usage read by CheckStream).
    modes = [(False, False), (True, True), (True, False)]
    started = time.monotonic()
    used = 0
    usage = (0, 0)
    for i in range(12):
        stream, include_usage = modes[i % 3]
        reply = chat(
            gw.url,
            "tpm-refund",
            max_tokens=TPM_MAX_TOKENS,
            chunks=3,
            stream=stream,
            include_usage=include_usage,
        )
        assert reply.status == 200, (i, reply.body)
        remaining = int(reply.headers["x-ratelimit-remaining"])
        # The bucket holds the settled usage of earlier requests plus this reservation,
        # minus what drained meanwhile (TPM/60 tokens per second).
        floor = TPM - used - reserved
        drained = math.ceil((time.monotonic() - started) * TPM / 60)
        assert floor <= remaining <= floor + drained, (i, remaining, floor, drained)
        if i == 0:
            assert remaining == TPM - reserved
        if stream and not include_usage:
            # The client sees no usage; the same request told it just before.
            assert not [p for p in sse_payloads(reply.body) if "usage" in p]
        else:
            usage = reported_usage(reply, stream=stream)
            assert usage == (1, 3)
        used += sum(usage)
    # The proof is only valid while draining alone could not have made room for a 3rd one.
    elapsed = time.monotonic() - started
    assert elapsed < (3 * reserved - TPM) * 60 / TPM, elapsed


# -- concurrency -----------------------------------------------------------------------------
def test_max_concurrent_requests_refuses_the_third_and_frees_slots(gw: Stack) -> None:
    barrier = threading.Barrier(3)

    def slow_stream(_: int) -> Reply:
        barrier.wait(10)
        # 8 pieces 150 ms apart: each admitted stream holds its slot for over a second.
        return chat(gw.url, "conc", stream=True, chunks=8, delay_ms=150)

    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(slow_stream, range(3)))
    assert sorted(r.status for r in replies) == [200, 200, 429], [r.body for r in replies]
    refused = next(r for r in replies if r.status == 429)
    text = assert_openai_error(refused, 429, "rate_limit_exceeded")
    assert "max_concurrent_requests" in text
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["x-ratelimit-limit"] == "2"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    for reply in replies:
        if reply.status == 200:
            assert sse_payloads(reply.body)[-1]["choices"][0]["finish_reason"] == "stop"
            assert reply.headers["x-ratelimit-limit"] == "2"
    # Both slots were freed when the streams ended: two concurrent requests pass again.
    with ThreadPoolExecutor(2) as pool:
        again = list(
            pool.map(lambda _: chat(gw.url, "conc", stream=True, chunks=3, delay_ms=100), range(2))
        )
    assert [r.status for r in again] == [200, 200], [r.body for r in again]


def test_abandoned_stream_frees_its_slot(gw: Stack) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gw.gateway.port, timeout=10)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {
        "X-Tenant-ID": "conc-abandoned",
        "x-demo-chunks": "200",
        "x-demo-delay-ms": "50",
        "Content-Type": "application/json",
    }
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    response = conn.getresponse()
    assert response.status == 200
    assert response.read1(64).startswith(b"data: ")
    # The stream holds the only slot.
    assert chat(gw.url, "conc-abandoned").status == 429
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # Envoy notices the hang-up and resets the ext_proc stream: a short bounded poll.
    deadline = time.monotonic() + 5
    while (reply := chat(gw.url, "conc-abandoned")).status == 429:
        assert time.monotonic() < deadline, "the abandoned stream's slot was never freed"
        time.sleep(0.05)
    assert reply.status == 200, reply.body
    statuses = [status for _, status in ledger_rows(gw.usage_db, "conc-abandoned")]
    assert statuses.count(200) == 1
    assert 499 in statuses  # the abandoned stream, recorded as closed by the client


@pytest.mark.parametrize(
    ("tenant", "status", "headers"),
    [("conc-down", 502, {}), ("conc-error", 500, {"x-demo-status": "500"})],
    ids=["backend-down", "backend-error"],
)
def test_failed_requests_free_their_slot(
    gw: Stack, tenant: str, status: int, headers: dict[str, str]
) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):  # max_concurrent_requests 1: a leaked slot turns the next into a 429
        reply = request(f"{gw.url}/v1/chat/completions", body, {"X-Tenant-ID": tenant, **headers})
        assert reply.status == status, reply.body
        assert reply.json()["error"]["type"] == "server_error"


# -- usage ledger ----------------------------------------------------------------------------
def test_usage_report_has_exact_tokens_errors_and_cost_per_tenant(gw: Stack) -> None:
    # (model, input, output, status) of every request, from what the client was told.
    sent: dict[str, list[tuple[str, int, int, int]]] = {"ledger-openai": [], "ledger-anthropic": []}

    def took(tenant: str, model: str, usage: tuple[int, int]) -> None:
        sent[tenant].append((model, *usage, 200))

    plain = chat(gw.url, "ledger-openai", "one two three", chunks=5)
    took("ledger-openai", "gpt-4o-mini", reported_usage(plain))
    streamed = chat(
        gw.url,
        "ledger-openai",
        "four five",
        model="gpt-4o",
        stream=True,
        include_usage=True,
        chunks=7,
    )
    took("ledger-openai", "gpt-4o", reported_usage(streamed, stream=True))

    # A streamed request whose client did not ask for usage: CheckStream asks the backend
    # for it and drops the extra chunk. The same request unstreamed tells the true count.
    prompt = "six seven eight nine"
    quiet = chat(gw.url, "ledger-openai", prompt, stream=True, chunks=9)
    assert quiet.status == 200, quiet.body
    events = sse_payloads(quiet.body)
    assert all("usage" not in event for event in events), events
    assert all(event["choices"] for event in events), events
    assert quiet.body.endswith(b"data: [DONE]\n\n")
    twin = chat(gw.url, "ledger-openai", prompt, chunks=9)
    took("ledger-openai", "gpt-4o-mini", reported_usage(twin))  # the quiet stream
    took("ledger-openai", "gpt-4o-mini", reported_usage(twin))  # its twin
    last = chat(gw.url, "ledger-openai", "ten", chunks=2, stream=True, include_usage=True)
    took("ledger-openai", "gpt-4o-mini", reported_usage(last, stream=True))
    # The 6th request in a minute is over requests_per_minute 5: a 429 is an error.
    assert chat(gw.url, "ledger-openai", "eleven").status == 429
    sent["ledger-openai"].append(("", 0, 0, 429))

    a1 = message(gw.url, "ledger-anthropic", "alpha beta", chunks=4)
    took("ledger-anthropic", "claude-test", reported_usage(a1, anthropic=True))
    a2 = message(gw.url, "ledger-anthropic", "gamma delta epsilon", chunks=6, stream=True)
    took("ledger-anthropic", "claude-test", reported_usage(a2, anthropic=True, stream=True))

    for tenant, requests in sent.items():
        (row,) = usage_report(gw.config_path, "--tenant", tenant)
        assert row == {
            "tenant": tenant,
            "model": "*",
            "requests": len(requests),
            "input_tokens": sum(r[1] for r in requests),
            "output_tokens": sum(r[2] for r in requests),
            "estimated_requests": 0,
            "errors": sum(r[3] >= 400 for r in requests),
            "cost_usd": pytest.approx(sum(cost(m, i, o) for m, i, o, s in requests if m), rel=1e-9),
        }

    by_model = {
        r["model"]: r
        for r in usage_report(gw.config_path, "--tenant", "ledger-openai", "--by", "model")
    }
    assert {r["tenant"] for r in by_model.values()} == {"ledger-openai"}
    for model in ("gpt-4o", "gpt-4o-mini"):
        mine = [r for r in sent["ledger-openai"] if r[0] == model]
        row = by_model[model]
        assert (row["requests"], row["input_tokens"], row["output_tokens"], row["errors"]) == (
            len(mine),
            sum(r[1] for r in mine),
            sum(r[2] for r in mine),
            0,
        )
        assert row["cost_usd"] == pytest.approx(sum(cost(*r[:3]) for r in mine), rel=1e-9)
    assert sum(r["requests"] for r in by_model.values()) == len(sent["ledger-openai"])

    # All tenants: each tenant's row is its own, whatever else the ledger holds.
    everyone = {r["tenant"]: r for r in usage_report(gw.config_path, "--all-tenants")}
    for tenant, requests in sent.items():
        assert everyone[tenant]["requests"] == len(requests)


def test_usage_row_is_committed_before_the_response_ends(gw: Stack) -> None:
    # requests_per_minute 6: six answers from the backend, then a 429 answered by CheckStream.
    for i in range(7):
        request_id = f"durable-{i}"
        body: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
        }
        if i % 2:
            body["stream"] = True
        headers = {"X-Tenant-ID": "durable", "x-request-id": request_id, "x-demo-chunks": "4"}
        reply = request(f"{gw.url}/v1/chat/completions", body, headers)
        assert reply.status == (200 if i < 6 else 429), reply.body
        # No waiting: the row is there as soon as the client has the last byte.
        rows = ledger_rows(gw.usage_db, "durable")
        assert len(rows) == i + 1, (i, rows)
        assert rows[-1] == (request_id, reply.status)


# -- budget ----------------------------------------------------------------------------------
def test_monthly_budget_refuses_once_spent_until_next_month(gw: Stack) -> None:
    # One prompt word and one answer piece: 2 tokens at $0.10 each, $0.20 per request.
    spent = 0.0
    for _ in range(3):  # $0.40 < $0.50, so the third still runs, overshooting to $0.60.
        reply = chat(gw.url, "budgeted", model="budget-model", chunks=1)
        assert reply.status == 200, reply.body
        assert reported_usage(reply) == (1, 1)
        spent += cost("budget-model", 1, 1)
    assert spent == pytest.approx(0.6)
    refused = chat(gw.url, "budgeted", model="budget-model", chunks=1)
    now = time.time()
    text = assert_openai_error(refused, 429, "budget_exceeded")
    assert "$0.5" in text
    retry = int(refused.headers["retry-after"])
    expected = seconds_to_next_month(now)
    assert expected - 5 <= retry <= expected + 1, (retry, expected)
    assert 1 <= retry <= 31 * 24 * 3600

    budget = tenant_info(gw.url, "budgeted")["budget"]
    assert budget == {"monthly_usd": 0.5, "period": period_now(), "spent_usd": 0.6}
    (row,) = usage_report(gw.config_path, "--tenant", "budgeted")
    assert (row["requests"], row["errors"]) == (4, 1)
    assert row["cost_usd"] == pytest.approx(0.6)


def test_requests_the_backend_never_received_cost_nothing(gw: Stack) -> None:
    reply = chat(gw.url, "budget-down", model="budget-model")
    assert reply.status == 502, reply.body
    (row,) = usage_report(gw.config_path, "--tenant", "budget-down")
    assert (row["requests"], row["errors"]) == (1, 1)
    assert (row["input_tokens"], row["output_tokens"], row["cost_usd"]) == (0, 0, 0.0), row
    assert tenant_info(gw.url, "budget-down")["budget"]["spent_usd"] == 0.0


def test_budget_refusal_of_a_rate_limited_tenant_carries_rate_limit_headers(gw: Stack) -> None:
    first = chat(gw.url, "budget-limited", model="budget-model", chunks=1)
    assert first.status == 200, first.body
    assert (first.headers["x-ratelimit-limit"], first.headers["x-ratelimit-remaining"]) == (
        "10",
        "9",
    )
    refused = chat(gw.url, "budget-limited", model="budget-model", chunks=1)
    assert_openai_error(refused, 429, "budget_exceeded")
    # The refused request took nothing: the quota is as the first request left it.
    assert refused.headers.get("x-ratelimit-limit") == "10", refused.headers
    assert refused.headers.get("x-ratelimit-remaining") == "9", refused.headers
    assert "x-ratelimit-reset" in refused.headers


def test_memory_budget_survives_a_restart(tmp_path: Path, limits_demo: DemoUpstreamThread) -> None:
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "usage": {"path": "./usage.db"},
        "pricing": PRICING,
        "tenants": {"configs": {"saver": _tenant(limits_demo, budget={"monthly_usd": 0.3})}},
    }
    stack = _start(tmp_path, config, {})
    try:
        statuses = [
            chat(stack.url, "saver", model="budget-model", chunks=1).status for _ in range(3)
        ]
    finally:
        _stop(stack)
    assert statuses == [200, 200, 429]
    # The in-process budget starts again from the ledger: $0.40 is still spent.
    stack = _start(tmp_path, config, {})
    try:
        assert tenant_info(stack.url, "saver")["budget"]["spent_usd"] == 0.4
        refused = chat(stack.url, "saver", model="budget-model", chunks=1)
        assert_openai_error(refused, 429, "budget_exceeded")
    finally:
        _stop(stack)


# -- suspensions -----------------------------------------------------------------------------
def test_suspend_and_resume_through_the_admin_port(gw: Stack) -> None:
    assert chat(gw.url, "susp-admin").status == 200
    done = admin_post(gw.admin_url, "/admin/tenants/susp-admin/suspend")
    assert done.status == 200, done.body
    assert done.json() == {"tenant": "susp-admin", "suspended": True}
    refused = chat(gw.url, "susp-admin")
    assert_openai_error(refused, 403, "tenant_suspended")
    assert refused.json()["error"]["type"] == "permission_error"
    done = admin_post(gw.admin_url, "/admin/tenants/susp-admin/resume")
    assert done.status == 200, done.body
    assert done.json() == {"tenant": "susp-admin", "suspended": False}
    assert chat(gw.url, "susp-admin").status == 200


def test_suspend_needs_the_right_token(gw: Stack, redis_down: Stack) -> None:
    missing = admin_post(gw.admin_url, "/admin/tenants/susp-token/suspend", token=None)
    assert missing.status == 401, missing.body
    wrong = admin_post(gw.admin_url, "/admin/tenants/susp-token/suspend", token="not-it")
    assert wrong.status == 401, wrong.body
    assert b"not-it" not in wrong.body
    unknown = admin_post(gw.admin_url, "/admin/tenants/nobody/suspend")
    assert unknown.status == 404, unknown.body
    # Nothing above suspended anyone.
    assert chat(gw.url, "susp-token").status == 200
    # A gateway without CHECKSTREAM_ADMIN_TOKEN has the endpoints off, whatever is sent.
    for base in (redis_down.admin_url, redis_down.url):
        off = admin_post(base, "/admin/tenants/unlimited/suspend")
        assert off.status == 403, off.body
        assert chat(redis_down.url, "unlimited").status == 200


def test_suspend_and_resume_through_the_envoy_listener(gw: Stack) -> None:
    assert message(gw.url, "susp-listener").status == 200
    wrong = admin_post(gw.url, "/admin/tenants/susp-listener/suspend", token="not-it")
    assert wrong.status == 401, wrong.body
    done = admin_post(gw.url, "/admin/tenants/susp-listener/suspend")
    assert done.status == 200, done.body
    assert done.json() == {"tenant": "susp-listener", "suspended": True}
    refused = message(gw.url, "susp-listener")
    assert_anthropic_error(refused, 403, "permission_error", "tenant_suspended")
    done = admin_post(gw.url, "/admin/tenants/susp-listener/resume")
    assert done.status == 200, done.body
    assert message(gw.url, "susp-listener").status == 200


def test_tenant_suspended_in_config_is_refused(gw: Stack) -> None:
    assert_openai_error(chat(gw.url, "susp-config"), 403, "tenant_suspended")
    assert_anthropic_error(
        message(gw.url, "susp-config-anthropic"), 403, "permission_error", "tenant_suspended"
    )


# -- replicas sharing Redis ------------------------------------------------------------------
def test_two_replicas_share_exact_request_counts(replicas: Replicas) -> None:
    urls = [replicas.a.url, replicas.b.url] * 100

    def one(url: str) -> int:
        return chat(url, "shared-rpm", chunks=1).status

    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(one, urls))
    elapsed = time.monotonic() - started
    assert statuses.count(200) + statuses.count(429) == 200, statuses
    # GCRA grants a fresh tenant a burst of 50, then one more every 60/50 = 1.2 s: a burst
    # shorter than that (the usual case, ~0.4 s) gets exactly 50, never one more.
    allowed = 50 + int(elapsed / 1.2)
    assert 50 <= statuses.count(200) <= allowed, (statuses.count(200), elapsed)
    # Each replica's ledger holds the 100 it served; without sharing each would grant 50.
    rows = [
        row
        for stack in (replicas.a, replicas.b)
        for row in usage_report(stack.config_path, "--tenant", "shared-rpm")
    ]
    assert [r["requests"] for r in rows] == [100, 100]
    # Both of replica B's workers took part.
    for worker in ("extproc-0", "extproc-1"):
        assert wait_until(partial(logged_request, replicas.b, worker, "shared-rpm")), worker


def test_budget_spent_on_one_replica_counts_on_the_other(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    assert chat(a.url, "shared-budget", model="budget-model", chunks=1).status == 200
    # $0.20 spent through A is what B sees, and the budget is $0.30.
    assert tenant_info(b.url, "shared-budget")["budget"]["spent_usd"] == 0.2
    assert chat(b.url, "shared-budget", model="budget-model", chunks=1).status == 200
    assert tenant_info(a.url, "shared-budget")["budget"]["spent_usd"] == 0.4
    for stack in (a, b):
        refused = chat(stack.url, "shared-budget", model="budget-model", chunks=1)
        assert_openai_error(refused, 429, "budget_exceeded")


def test_suspension_reaches_every_worker(replicas: Replicas) -> None:
    b = replicas.b
    done = admin_post(b.admin_url, "/admin/tenants/shared-suspended/suspend")
    assert done.status == 200, done.body
    # Envoy spreads requests over both workers; each of them must refuse. Workers follow
    # the launcher's change within moments: wait on that, not on a time (a loaded machine).
    assert wait_until(lambda: {chat(b.url, "shared-suspended").status for _ in range(8)} == {403})
    done = admin_post(b.admin_url, "/admin/tenants/shared-suspended/resume")
    assert done.status == 200, done.body
    assert wait_until(lambda: {chat(b.url, "shared-suspended").status for _ in range(8)} == {200})
    # Both workers were in rotation (only admitted requests are logged).
    for worker in ("extproc-0", "extproc-1"):
        assert wait_until(partial(logged_request, b, worker, "shared-suspended")), worker


def test_a_suspension_sent_to_one_replica_applies_to_all(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    assert chat(b.url, "shared-everywhere").status == 200
    done = admin_post(a.admin_url, "/admin/tenants/shared-everywhere/suspend")
    assert done.status == 200, done.body
    assert chat(a.url, "shared-everywhere").status == 403  # at once where it was sent
    # The other replica's workers (two) each follow the shared state within about a second.
    assert wait_until(lambda: {chat(b.url, "shared-everywhere").status for _ in range(6)} == {403})
    done = admin_post(b.admin_url, "/admin/tenants/shared-everywhere/resume")
    assert done.status == 200, done.body
    assert wait_until(lambda: chat(a.url, "shared-everywhere").status == 200)


# -- Redis unreachable -----------------------------------------------------------------------
def test_unreachable_redis_fails_closed_fast_in_the_tenants_format(redis_down: Stack) -> None:
    url = redis_down.url
    started = time.monotonic()
    message_text = assert_openai_error(chat(url, "closed-openai"), 503, "limits_unavailable")
    assert "rate limits" in message_text
    assert_anthropic_error(message(url, "closed-anthropic"), 503, "api_error", "limits_unavailable")
    assert_openai_error(chat(url, "closed-budget"), 503, "limits_unavailable")
    # Connection refused must not turn into a hang (the client would wait for its timeout).
    assert time.monotonic() - started < 3


def test_unreachable_redis_lets_fail_open_tenants_pass(redis_down: Stack) -> None:
    for tenant in ("open", "open-budget", "unlimited"):
        reply = chat(redis_down.url, tenant, chunks=2)
        assert reply.status == 200, (tenant, reply.body)
        assert reported_usage(reply) == (1, 2)
    assert tenant_info(redis_down.url, "open")["remaining"] == "unavailable"
