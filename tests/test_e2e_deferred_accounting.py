"""End to end: ``accounting: deferred`` through real Envoy + extproc + the demo upstream.

A deferred tenant's request costs one blocking ext_proc message (two when
``tokens_per_minute`` needs the prompt); Envoy's Lua usage reader and gRPC access log bring
the end of the request back to extproc. These tests check that the numbers are the inline
path's: one ledger row per request with the usage the backend reported to the client,
limits that refuse exactly as many requests, concurrency slots freed, budgets charged,
nothing billed for Envoy's own answers, 499 for a client that leaves.
"""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.redis_server import RedisServer, redis_server
from tests.support import DemoUpstreamThread, Reply, gateway_ports, request, wait_until
from tests.test_e2e_limits import (
    PRICING,
    Stack,
    _anthropic_tenant,
    _start,
    _stop,
    _tenant,
    chat,
    consecutive_free_ports,
    cost,
    ledger_rows,
    limits_demo,
    message,
    reported_usage,
)

pytestmark = pytest.mark.e2e
__all__ = ["limits_demo", "redis_server"]  # the fixtures are used by name


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, limits_demo: DemoUpstreamThread, refused: int
) -> Iterator[Stack]:
    demo = limits_demo

    def deferred(tenant: dict[str, Any]) -> dict[str, Any]:
        return {**tenant, "accounting": "deferred"}

    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "limits": {"backend": "memory"},
        "usage": {"path": "./usage.db"},
        "pricing": PRICING,
        "tenants": {
            "configs": {
                "usage-openai": deferred(_tenant(demo)),
                "usage-anthropic": deferred(_anthropic_tenant(demo)),
                "rpm": deferred(_tenant(demo, rate_limit={"requests_per_minute": 3})),
                "tpm": deferred(_tenant(demo, rate_limit={"tokens_per_minute": 5000})),
                "conc": deferred(_tenant(demo, rate_limit={"max_concurrent_requests": 1})),
                "budgeted": deferred(_tenant(demo, budget={"monthly_usd": 0.5})),
                "down": deferred({"backend_url": f"http://127.0.0.1:{refused}/v1"}),
                "inline": _tenant(demo),
            }
        },
    }
    stack = _start(tmp_path_factory.mktemp("deferred"), config, {})
    yield stack
    _stop(stack)


def rows_of(stack: Stack, tenant: str, count: int) -> list[tuple[str, int]]:
    """The tenant's ledger rows once there are ``count`` (they land after the answer)."""
    assert wait_until(lambda: len(ledger_rows(stack.usage_db, tenant)) >= count, 10)
    return ledger_rows(stack.usage_db, tenant)


def usage_of(stack: Stack, request_id: str) -> tuple[str, int, int, int, int]:
    with sqlite3.connect(f"file:{stack.usage_db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT model, input_tokens, output_tokens, estimated, status FROM usage "
            "WHERE request_id = ?",
            (request_id,),
        ).fetchone()
    assert row is not None, request_id
    return str(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4])


def messages_received(stack: Stack) -> int:
    """Every ext_proc message Envoy has sent extproc and waited for (its stats)."""
    url = f"http://127.0.0.1:{stack.gateway.envoy_admin_port}/stats?format=json"
    with urllib.request.urlopen(url, timeout=5) as answer:
        stats = json.load(answer)["stats"]
    sent = [s["value"] for s in stats if s.get("name", "").endswith("ext_proc.stream_msgs_sent")]
    return int(sum(sent))


def test_usage_is_the_backends_own_count_for_every_api(gw: Stack) -> None:
    replies: list[tuple[Reply, str, bool, bool]] = [
        (chat(gw.url, "usage-openai", "one two three"), "gpt-4o-mini", False, False),
        (
            chat(gw.url, "usage-openai", "four five", stream=True, include_usage=True, chunks=7),
            "gpt-4o-mini",
            False,
            True,
        ),
        (message(gw.url, "usage-anthropic", "six seven eight"), "claude-test", True, False),
        (
            message(gw.url, "usage-anthropic", "nine", stream=True, chunks=5),
            "claude-test",
            True,
            True,
        ),
    ]
    for reply, model, is_anthropic, stream in replies:
        tokens_in, tokens_out = reported_usage(reply, anthropic=is_anthropic, stream=stream)
        request_id = reply.headers["x-request-id"]
        assert wait_until(lambda rid=request_id: _has_row(gw, rid), 10), gw.gateway.log()[-3000:]
        assert usage_of(gw, request_id) == (model, tokens_in, tokens_out, 0, 200)


def _has_row(stack: Stack, request_id: str) -> bool:
    with sqlite3.connect(f"file:{stack.usage_db}?mode=ro", uri=True) as conn:
        found = conn.execute("SELECT 1 FROM usage WHERE request_id = ?", (request_id,))
        return found.fetchone() is not None


def test_the_responses_api_is_counted_from_its_own_usage(gw: Stack) -> None:
    url = f"{gw.url}/v1/responses"
    headers = {"X-Tenant-ID": "usage-openai", "x-demo-chunks": "6"}
    plain = request(url, {"model": "gpt-4o-mini", "input": "one two"}, headers)
    streamed = request(url, {"model": "gpt-4o-mini", "input": "three", "stream": True}, headers)
    assert plain.status == 200 and streamed.status == 200, (plain.body, streamed.body)
    completed = [
        json.loads(line[len("data: ") :])
        for line in streamed.body.decode().splitlines()
        if line.startswith("data: ") and '"response.completed"' in line
    ]
    assert len(completed) == 1
    for reply, usage in (
        (plain, plain.json()["usage"]),
        (streamed, completed[0]["response"]["usage"]),
    ):
        request_id = reply.headers["x-request-id"]
        assert wait_until(lambda rid=request_id: _has_row(gw, rid), 10)
        expected = ("gpt-4o-mini", usage["input_tokens"], usage["output_tokens"], 0, 200)
        assert usage_of(gw, request_id) == expected


def test_a_stream_without_a_usage_report_is_estimated_and_marked(gw: Stack) -> None:
    reply = chat(gw.url, "usage-openai", "estimate me", stream=True, chunks=9)
    assert reply.status == 200
    request_id = reply.headers["x-request-id"]
    assert wait_until(lambda: _has_row(gw, request_id), 10)
    model, _tokens_in, tokens_out, estimated, status = usage_of(gw, request_id)
    # The client did not ask for usage, so the answer carried none: one token per event.
    assert (model, tokens_out, estimated, status) == ("gpt-4o-mini", 9, 1, 200)


def test_one_blocking_message_per_request_two_with_tokens_per_minute(gw: Stack) -> None:
    before = messages_received(gw)
    for _ in range(5):
        assert chat(gw.url, "usage-openai").status == 200
    assert messages_received(gw) - before == 5
    before = messages_received(gw)
    for _ in range(5):
        assert chat(gw.url, "tpm", max_tokens=20).status == 200
    assert messages_received(gw) - before == 10
    # The inline tenant still reads the answer: request headers and body, response
    # headers and body, at least.
    before = messages_received(gw)
    assert chat(gw.url, "inline").status == 200
    assert messages_received(gw) - before >= 4


def test_requests_per_minute_refuse_exactly_and_every_request_has_one_row(gw: Stack) -> None:
    replies = [chat(gw.url, "rpm") for _ in range(5)]
    assert [r.status for r in replies] == [200, 200, 200, 429, 429]
    ok = replies[0]
    assert ok.headers["x-ratelimit-limit"] == "3"
    assert ok.headers["x-ratelimit-remaining"] == "2"
    assert "x-ratelimit-reset" in ok.headers
    rows = rows_of(gw, "rpm", 5)
    assert sorted(status for _, status in rows) == [200, 200, 200, 429, 429]
    assert {rid for rid, _ in rows} == {r.headers["x-request-id"] for r in replies}


def test_the_concurrency_slot_is_freed_by_the_access_log(gw: Stack) -> None:
    for i in range(4):
        reply = chat(gw.url, "conc", stream=True, chunks=3)
        assert reply.status == 200, reply.body
        rows_of(gw, "conc", i + 1)  # its end is accounted: the slot is free again


def test_a_budget_is_charged_from_the_access_log(gw: Stack) -> None:
    # budget-model: one token costs $0.10; the first answer alone spends the $0.50.
    first = chat(gw.url, "budgeted", "a b c", model="budget-model")
    assert first.status == 200
    tokens_in, tokens_out = reported_usage(first)
    assert cost("budget-model", tokens_in, tokens_out) > 0.5
    rows_of(gw, "budgeted", 1)
    refused = chat(gw.url, "budgeted", model="budget-model")
    assert refused.status == 429, refused.body
    assert refused.json()["error"]["code"] == "budget_exceeded"


def test_envoys_own_answer_is_recorded_and_not_billed(gw: Stack) -> None:
    reply = chat(gw.url, "down")
    assert reply.status == 502
    rows = rows_of(gw, "down", 1)
    _model, tokens_in, tokens_out, _estimated, status = usage_of(gw, rows[0][0])
    assert (tokens_in, tokens_out, status) == (0, 0, 502)


def test_a_client_that_leaves_mid_stream_is_recorded_as_499(gw: Stack) -> None:
    before = len(ledger_rows(gw.usage_db, "conc"))
    host, port = gw.url.removeprefix("http://").split(":")
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {
        "X-Tenant-ID": "conc",
        "x-demo-chunks": "200",
        "x-demo-delay-ms": "20",
        "Content-Type": "application/json",
    }
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    answer = conn.getresponse()
    assert answer.status == 200
    answer.read(64)
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    rows = rows_of(gw, "conc", before + 1)
    assert rows[-1][1] == 499
    # Its concurrency slot is free again.
    assert chat(gw.url, "conc").status == 200


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    limits_demo: DemoUpstreamThread,
    redis_server: RedisServer,
) -> Iterator[tuple[Stack, Stack]]:
    """Two replicas on one Redis, the second with two workers: an access log entry may reach
    another worker (or the other replica's Redis peer) than the one that admitted it."""

    def config(workers: int) -> dict[str, Any]:
        ports = {**gateway_ports(), "extproc_port": consecutive_free_ports(workers)}
        return {
            "server": {"host": "127.0.0.1", **ports, "extproc_workers": workers},
            "limits": {"backend": "redis", "url": redis_server.url},
            "usage": {"path": "./usage.db"},
            "pricing": PRICING,
            "tenants": {
                "configs": {
                    "fleet-rpm": {
                        **_tenant(limits_demo, rate_limit={"requests_per_minute": 6}),
                        "accounting": "deferred",
                    },
                    "fleet-conc": {
                        **_tenant(limits_demo, rate_limit={"max_concurrent_requests": 1}),
                        "accounting": "deferred",
                    },
                }
            },
        }

    redis_server.forget("checkstream:*{fleet-*}*")
    a = _start(tmp_path_factory.mktemp("fleet-a"), config(1), {})
    b = _start(tmp_path_factory.mktemp("fleet-b"), config(2), {})
    yield a, b
    _stop(a)
    _stop(b)


def test_deferred_limits_are_exact_across_replicas_and_workers(
    fleet: tuple[Stack, Stack],
) -> None:
    a, b = fleet
    replies = [chat((a, b)[i % 2].url, "fleet-rpm") for i in range(10)]
    assert sorted(r.status for r in replies) == [200] * 6 + [429] * 4
    assert wait_until(
        lambda: (
            len(ledger_rows(a.usage_db, "fleet-rpm")) + len(ledger_rows(b.usage_db, "fleet-rpm"))
            == 10
        ),
        10,
    )
    # One slot for the whole fleet: each request's end frees it, whichever worker (of
    # three) the access log entry reaches, so every sequential request is admitted.
    for i in range(8):
        reply = chat((a, b)[i % 2].url, "fleet-conc", stream=True, chunks=3)
        assert reply.status == 200, reply.body
        assert wait_until(
            lambda n=i + 1: (
                len(ledger_rows(a.usage_db, "fleet-conc"))
                + len(ledger_rows(b.usage_db, "fleet-conc"))
                == n
            ),
            10,
        )


def test_the_official_sdks_stream_to_the_end_and_are_counted_once(gw: Stack) -> None:
    """As users run it: the OpenAI SDK (chat streamed with usage, Responses streamed) and the
    Anthropic SDK (a Messages stream), each hanging up right after the last event."""
    headers = {"X-Tenant-ID": "usage-openai"}
    before = len(ledger_rows(gw.usage_db, "usage-openai"))
    with openai.OpenAI(
        base_url=f"{gw.url}/v1", api_key="sk-unused", max_retries=0, default_headers=headers
    ) as client:
        chunks = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "count these words"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [c.usage for c in chunks if c.usage is not None]
        events = client.responses.create(model="gpt-4o-mini", input="hello there", stream=True)
        completed = [e for e in events if e.type == "response.completed"]
    assert len(usage) == 1 and len(completed) == 1
    rows = rows_of(gw, "usage-openai", before + 2)
    chat_row, responses_row = (usage_of(gw, rid) for rid, _ in rows[before:])
    assert chat_row == (
        "gpt-4o-mini",
        usage[0].prompt_tokens,
        usage[0].completion_tokens,
        0,
        200,
    )
    done = completed[0].response.usage
    assert done is not None
    assert responses_row == ("gpt-4o-mini", done.input_tokens, done.output_tokens, 0, 200)

    before = len(ledger_rows(gw.usage_db, "usage-anthropic"))
    with (
        anthropic.Anthropic(
            base_url=gw.url,
            api_key="sk-unused",
            max_retries=0,
            default_headers={"X-Tenant-ID": "usage-anthropic"},
        ) as claude,
        claude.messages.stream(
            model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        final = stream.get_final_message()
    rows = rows_of(gw, "usage-anthropic", before + 1)
    assert len(rows) == before + 1
    assert usage_of(gw, rows[-1][0]) == (
        "claude-test",
        final.usage.input_tokens,
        final.usage.output_tokens,
        0,
        200,
    )
