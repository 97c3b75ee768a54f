"""Limits, usage and budgets of whole requests: an ``Exchange`` fed real ext_proc protobuf
messages (no gRPC, no Envoy) with the real limiter (which keeps the budgets too) and SQLite
usage ledger.

The limiter's clock is fixed (``checkstream.limits.memory.time``), so every X-RateLimit-* value and
every remaining count is exact.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio as aioredis
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingResponse,
)
from google.protobuf.struct_pb2 import Struct
from prometheus_client import REGISTRY

from checkstream.accounting.accounts import CLIENT_CLOSED, Accounts, Tally
from checkstream.accounting.metering import estimate_tokens
from checkstream.audit.trail import AuditLog
from checkstream.config.model import BudgetConfig, Price, RateLimitConfig, TenantConfig, load_config
from checkstream.formats.openai import FORMAT as OPENAI
from checkstream.formats.texts import Usage
from checkstream.gateway.exchange import Exchange
from checkstream.gateway.runtime import Runtime
from checkstream.ledger.usage import Pricing, UsageLedger
from checkstream.limits import memory as limits_module
from checkstream.limits.decisions import NANO, Charge, seconds_to_next_month
from checkstream.limits.memory import MemoryLimiter
from checkstream.limits.redis import RedisLimiter
from tests.redis_server import RedisServer, redis_server
from tests.support import free_port
from tests.test_metering import ANSWER_CHARS, anthropic_stream, openai_stream

__all__ = ["redis_server"]  # the fixture is used by name

T0 = 1_700_000_000.0
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
MODEL = "gpt-4o-mini"
CLAUDE = "claude-3-5-haiku"
PROMPT = "x" * 40  # 10 estimated tokens
PROMPT_TOKENS = 10

CONFIG = """\
usage: {path: usage.db}
pricing:
  gpt-4o-mini: {input: 0.5, output: 2.0}
  claude-3-5-haiku: {input: 1.0, output: 4.0}
tenants:
  resolution:
    - header: "X-Tenant-ID"
  configs:
    rpm:
      backend_url: "http://127.0.0.1:9/v1"
      rate_limit: {requests_per_minute: 10}
    tpm:
      backend_url: "http://127.0.0.1:9/v1"
      rate_limit: {tokens_per_minute: 10000, default_max_tokens: 500}
    single:
      backend_url: "http://127.0.0.1:9/v1"
      rate_limit: {max_concurrent_requests: 1}
    claude:
      backend_url: "http://127.0.0.1:9"
      streaming_format: anthropic
      rate_limit: {tokens_per_minute: 100000}
    counted:
      backend_url: "http://127.0.0.1:9/v1"
    budgeted:
      backend_url: "http://127.0.0.1:9/v1"
      budget: {monthly_usd: 0.0001}
    budgeted-rpm:
      backend_url: "http://127.0.0.1:9/v1"
      rate_limit: {requests_per_minute: 10}
      budget: {monthly_usd: 0.0001}
    guarded:
      backend_url: "http://127.0.0.1:9/v1"
      pipeline: {midstream: {classifiers: [never]}}
      policy_path: guarded-policy.yaml
classifiers:
  never: {type: keyword, terms: [zzzz-never-said]}
"""


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limiter's clock only; periods and ledger times stay real."""
    monkeypatch.setattr(limits_module, "time", SimpleNamespace(time=lambda: T0))


GUARDED_POLICY = """\
version: "1.0"
name: guarded
policies:
  - {name: never_seen, trigger: {classifier: never, threshold: 0.5}, action: log}
"""


def write_config(directory: Path, text: str = CONFIG) -> Path:
    path = directory / "checkstream.yaml"
    path.write_text(text)
    (directory / "guarded-policy.yaml").write_text(GUARDED_POLICY)
    return path


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    rt = Runtime.from_config(load_config(write_config(tmp_path)))
    yield rt
    await rt.accounts.aclose()


# --- messages ----------------------------------------------------------------------------


def _headers(pairs: dict[str, str], end: bool) -> HttpHeaders:
    values = [HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return HttpHeaders(headers=HeaderMap(headers=values), end_of_stream=end)


def request_headers(tenant: str, path: str = CHAT, **extra: str) -> HttpHeaders:
    pairs = {
        ":method": "POST",
        ":path": path,
        ":authority": "gateway.local",
        "content-type": "application/json",
        "x-tenant-id": tenant,
    }
    pairs.update({k.replace("_", "-"): v for k, v in extra.items()})
    return _headers(pairs, end=False)


def response_headers(status: int = 200, content_type: str = "application/json") -> HttpHeaders:
    return _headers({":status": str(status), "content-type": content_type}, end=False)


def body(data: bytes, end: bool = True) -> HttpBody:
    return HttpBody(body=data, end_of_stream=end)


def chat(**extra: Any) -> bytes:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], **extra}
    return json.dumps(payload).encode()


def openai_answer(prompt_tokens: int = 12, completion_tokens: int = 30) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello there, friend"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    ).encode()


def immediate(response: ProcessingResponse) -> tuple[int, dict[str, str], Any]:
    assert response.WhichOneof("response") == "immediate_response", response
    answer = response.immediate_response
    headers = {h.header.key: h.header.raw_value.decode() for h in answer.headers.set_headers}
    return answer.status.code, headers, json.loads(answer.body)


def forwarded(response: ProcessingResponse) -> bool:
    return response.WhichOneof("response") in ("request_headers", "request_body")


def set_headers(response: ProcessingResponse) -> dict[str, str]:
    assert response.WhichOneof("response") == "response_headers", response
    mutation = response.response_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def streamed(answers: list[ProcessingResponse | None]) -> bytes:
    """The response body bytes the client gets from a series of answers."""
    out = b""
    for answer in answers:
        if answer is not None:
            out += answer.response_body.response.body_mutation.streamed_response.body
    return out


async def send_request(
    runtime: Runtime, tenant: str, payload: bytes, path: str = CHAT, **extra: str
) -> tuple[Exchange, ProcessingResponse]:
    """Request headers and body; the answer that decides whether it goes upstream."""
    exchange = Exchange(runtime)
    answer = await exchange.on_request_headers(request_headers(tenant, path, **extra))
    if not forwarded(answer):
        return exchange, answer
    return exchange, await exchange.on_request_body(body(payload))


async def complete(
    exchange: Exchange,
    answer: bytes,
    content_type: str = "application/json",
    status: int = 200,
    cuts: int = 3,
) -> tuple[ProcessingResponse, bytes]:
    """The backend's answer in ``cuts`` body messages; the response header answer and the
    body the client gets."""
    head = await exchange.on_response_headers(response_headers(status, content_type))
    size = -(-len(answer) // cuts)
    parts = [answer[i : i + size] for i in range(0, len(answer), size)] or [b""]
    outs = [
        await exchange.on_response_body(body(part, end=i == len(parts) - 1))
        for i, part in enumerate(parts)
    ]
    return head, streamed(outs)


async def one_request(runtime: Runtime, tenant: str, payload: bytes, answer: bytes) -> bytes:
    exchange, decision = await send_request(runtime, tenant, payload)
    assert forwarded(decision), decision
    return (await complete(exchange, answer))[1]


def ledger_rows(runtime: Runtime) -> list[dict[str, Any]]:
    path = runtime.config.path.parent / "usage.db"
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute("SELECT * FROM usage ORDER BY rowid")]
    finally:
        conn.close()


def row_summary(row: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("tenant", "model", "input_tokens", "output_tokens", "estimated", "status", "cost_usd")
    return tuple(row[k] for k in keys)


async def remaining(runtime: Runtime, tenant: str) -> int | None:
    limits = runtime.plans[tenant].tenant.config.rate_limit
    return (await runtime.accounts.limiter.remaining(tenant, limits)).remaining


def errors_counted(kind: str) -> float:
    return REGISTRY.get_sample_value("checkstream_extproc_errors_total", {"kind": kind}) or 0.0


# --- X-RateLimit-* and the ledger ---------------------------------------------------------


async def test_answers_carry_the_rate_limit_headers(runtime: Runtime) -> None:
    for n in (1, 2):
        exchange, decision = await send_request(runtime, "rpm", chat())
        assert forwarded(decision)
        head, _ = await complete(exchange, openai_answer())
        # GCRA at 10 per minute: each request takes 6 s to drain from the bucket.
        assert set_headers(head) == {
            "x-ratelimit-limit": "10",
            "x-ratelimit-remaining": str(10 - n),
            "x-ratelimit-reset": str(int(T0) + 6 * n),
        }


async def test_a_tenant_without_limits_gets_no_rate_limit_headers(runtime: Runtime) -> None:
    exchange, _ = await send_request(runtime, "counted", chat())
    head, _ = await complete(exchange, openai_answer())
    assert head.response_headers.response.header_mutation.set_headers == []


async def test_one_ledger_row_per_request_with_the_answers_tokens_and_price(
    runtime: Runtime,
) -> None:
    spent = REGISTRY.get_sample_value(
        "checkstream_spend_usd_total", {"tenant": "counted", "model": MODEL}
    )
    answer = openai_answer(prompt_tokens=12, completion_tokens=30)
    exchange, _ = await send_request(runtime, "counted", chat(), x_request_id="req-42")
    head, out = await complete(exchange, answer, cuts=4)
    assert out == answer  # metered, not changed
    assert head.response_headers.response.header_mutation.remove_headers == []
    [row] = ledger_rows(runtime)
    # The model is the one asked for (its price); 12 * 0.5 + 30 * 2.0 = 66 per million.
    assert row_summary(row) == ("counted", MODEL, 12, 30, 0, 200, 6.6e-05)
    assert row["request_id"] == "req-42"
    # The same cost reaches the spend metric.
    after = REGISTRY.get_sample_value(
        "checkstream_spend_usd_total", {"tenant": "counted", "model": MODEL}
    )
    assert after == pytest.approx((spent or 0.0) + 6.6e-05)
    await one_request(runtime, "counted", chat(), openai_answer(7, 1))
    assert [row_summary(r)[2:4] for r in ledger_rows(runtime)] == [(12, 30), (7, 1)]


async def test_anthropic_answer_counts_cached_input_tokens(runtime: Runtime) -> None:
    payload = {
        "model": CLAUDE,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    answer = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "Hi"}],
        "usage": {
            "input_tokens": 25,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 7,
            "output_tokens": 40,
        },
    }
    exchange, decision = await send_request(
        runtime, "claude", json.dumps(payload).encode(), MESSAGES
    )
    assert forwarded(decision)
    await complete(exchange, json.dumps(answer).encode())
    [row] = ledger_rows(runtime)
    # 132 * 1.0 + 40 * 4.0 = 292 per million.
    assert row_summary(row) == ("claude", CLAUDE, 132, 40, 0, 200, 0.000292)
    # tokens_per_minute settled to the real 172 tokens.
    assert await remaining(runtime, "claude") == 100000 - 172


async def test_openai_stream_usage_is_asked_for_read_and_removed(runtime: Runtime) -> None:
    exchange, decision = await send_request(runtime, "tpm", chat(stream=True))
    # The client did not ask for usage: CheckStream asks the backend for it.
    sent = json.loads(decision.request_body.response.body_mutation.body)
    assert sent["stream_options"] == {"include_usage": True}
    stream = openai_stream()
    head, out = await complete(exchange, stream.data, "text/event-stream", cuts=5)
    assert head.response_headers.response.header_mutation.remove_headers == ["content-length"]
    assert out == stream.without_usage_chunk
    [row] = ledger_rows(runtime)
    assert row_summary(row)[2:6] == (17, 23, 0, 200)
    assert await remaining(runtime, "tpm") == 10000 - 40


@pytest.mark.parametrize("guarded", [False, True])
async def test_litellm_usage_chunk_never_reaches_a_client_that_did_not_ask(
    runtime: Runtime, guarded: bool
) -> None:
    # LiteLLM sends the usage with one empty-delta choice rather than `choices: []`.
    tenant = "tpm"
    if guarded:
        tenant = "guarded"
    exchange, _ = await send_request(runtime, tenant, chat(stream=True))
    head = {"id": "c", "object": "chat.completion.chunk", "model": MODEL}
    text = {**head, "choices": [{"index": 0, "delta": {"content": "Hello."}}]}
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    litellm = {**head, "choices": [{"index": 0, "delta": {}}], "usage": usage}
    kept = f"data: {json.dumps(text)}\n\n".encode()
    stream = kept + f"data: {json.dumps(litellm)}\n\ndata: [DONE]\n\n".encode()
    _, out = await complete(exchange, stream, "text/event-stream", cuts=2)
    assert out == kept + b"data: [DONE]\n\n"
    [row] = ledger_rows(runtime)
    assert (row["input_tokens"], row["output_tokens"], row["estimated"]) == (5, 2, 0)


async def test_anthropic_stream_usage_comes_from_start_and_delta(runtime: Runtime) -> None:
    payload = {"model": CLAUDE, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    exchange, decision = await send_request(
        runtime, "claude", json.dumps(payload).encode(), MESSAGES
    )
    assert decision.request_body.response.body_mutation.body == b""  # nothing to ask for
    stream = anthropic_stream()
    _, out = await complete(exchange, stream.data, "text/event-stream", cuts=7)
    assert out == stream.data
    [row] = ledger_rows(runtime)
    assert row_summary(row)[2:6] == (132, 31, 0, 200)


def envoy_attributes(code_details: str) -> dict[str, Struct]:
    """The ``attributes`` of a response headers message (``response.code_details``)."""
    found = Struct()
    found.update({"response.code_details": code_details})
    return {"envoy.filters.http.ext_proc": found}


async def test_an_answer_envoy_made_itself_bills_nothing(runtime: Runtime) -> None:
    exchange, _ = await send_request(runtime, "tpm", chat(max_tokens=100))
    reason = "upstream_reset_before_response_started{connection_failure}"
    await exchange.on_response_headers(response_headers(503), envoy_attributes(reason))
    await exchange.on_response_body(body(b"upstream connect error", end=True))
    [row] = ledger_rows(runtime)
    # No model read the prompt: no tokens, no cost, and the whole reservation back.
    assert row_summary(row) == ("tpm", MODEL, 0, 0, 0, 503, 0.0)
    assert await remaining(runtime, "tpm") == 10000


async def test_an_answer_via_upstream_is_billed(runtime: Runtime) -> None:
    exchange, _ = await send_request(runtime, "counted", chat())
    await exchange.on_response_headers(response_headers(), envoy_attributes("via_upstream"))
    await exchange.on_response_body(body(openai_answer(12, 30), end=True))
    [row] = ledger_rows(runtime)
    assert row_summary(row) == ("counted", MODEL, 12, 30, 0, 200, 6.6e-05)


# --- refusals, hang-ups, concurrency -------------------------------------------------------


async def test_concurrency_slot_is_held_while_running_and_freed_by_finish(
    runtime: Runtime,
) -> None:
    first, decision = await send_request(runtime, "single", chat())
    assert forwarded(decision)
    _, refused = await send_request(runtime, "single", chat(), x_request_id="second")
    status, headers, error = immediate(refused)
    assert status == 429
    assert headers == {
        "content-type": "application/json",
        "retry-after": "1",
        "x-ratelimit-limit": "1",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": str(int(T0)),
    }
    assert error["error"]["code"] == "rate_limit_exceeded"
    assert error["error"]["message"] == (
        "rate limit reached (max_concurrent_requests); retry after 1s"
    )
    # The refusal is recorded at once: 429, no model (refused at the headers), no tokens.
    [row] = ledger_rows(runtime)
    assert row["request_id"] == "second"
    assert row_summary(row) == ("single", "", 0, 0, 0, 429, 0.0)

    await complete(first, openai_answer())
    third, decision = await send_request(runtime, "single", chat())
    assert forwarded(decision)
    assert await remaining(runtime, "single") == 0
    await complete(third, openai_answer())
    assert await remaining(runtime, "single") == 1
    assert [r["status"] for r in ledger_rows(runtime)] == [429, 200, 200]


async def test_abandoned_after_response_headers_is_499_and_frees_the_slot(
    runtime: Runtime,
) -> None:
    exchange, _ = await send_request(runtime, "single", chat())
    await exchange.on_response_headers(response_headers())
    answer = openai_answer()
    await exchange.on_response_body(body(answer[:20], end=False))
    await exchange.abandon()
    [row] = ledger_rows(runtime)
    # The backend answered, so the prompt is counted; the answer never finished: estimated.
    assert row_summary(row) == ("single", MODEL, PROMPT_TOKENS, 0, 1, CLIENT_CLOSED, 5e-06)
    assert await remaining(runtime, "single") == 1
    _, decision = await send_request(runtime, "single", chat())
    assert forwarded(decision)
    # Already finished: a late abandon records nothing more.
    await exchange.abandon()
    assert len(ledger_rows(runtime)) == 1


async def test_abandoned_stream_estimates_the_answer_it_carried(runtime: Runtime) -> None:
    exchange, _ = await send_request(runtime, "tpm", chat(stream=True))
    await exchange.on_response_headers(response_headers(content_type="text/event-stream"))
    data = openai_stream().data
    before_usage = data.rindex(b"data: ", 0, data.index(b'"prompt_tokens"'))
    await exchange.on_response_body(body(data[:before_usage], end=False))
    await exchange.abandon()
    [row] = ledger_rows(runtime)
    output = estimate_tokens(ANSWER_CHARS)
    assert row_summary(row)[2:6] == (PROMPT_TOKENS, output, 1, CLIENT_CLOSED)
    assert await remaining(runtime, "tpm") == 10000 - PROMPT_TOKENS - output


async def test_abandoned_before_any_answer_counts_no_tokens(runtime: Runtime) -> None:
    exchange, _ = await send_request(runtime, "tpm", chat(max_tokens=100))
    assert await remaining(runtime, "tpm") == 10000 - 110
    await exchange.abandon()
    [row] = ledger_rows(runtime)
    assert row_summary(row) == ("tpm", MODEL, 0, 0, 0, CLIENT_CLOSED, 0.0)
    assert await remaining(runtime, "tpm") == 10000  # the whole reservation refunded


async def test_abandoned_anthropic_stream_estimates_its_output(runtime: Runtime) -> None:
    payload = {"model": CLAUDE, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    exchange, _ = await send_request(runtime, "claude", json.dumps(payload).encode(), MESSAGES)
    await exchange.on_response_headers(response_headers(content_type="text/event-stream"))
    data = anthropic_stream().data
    await exchange.on_response_body(body(data[: data.index(b"event: content_block_stop")], False))
    await exchange.abandon()
    [row] = ledger_rows(runtime)
    assert row_summary(row)[2:6] == (132, estimate_tokens(ANSWER_CHARS), 1, CLIENT_CLOSED)


@pytest.mark.parametrize("fmt", ["openai", "anthropic", "guarded"])
async def test_a_stream_read_to_its_last_event_is_200_even_if_the_end_never_came(
    runtime: Runtime, fmt: str
) -> None:
    # The SDKs hang up right after [DONE] / message_stop; Envoy then cancels the gRPC stream
    # before extproc sees the body's end. The client read everything: 200, not 499.
    if fmt != "anthropic":
        tenant = "guarded" if fmt == "guarded" else "tpm"
        exchange, _ = await send_request(runtime, tenant, chat(stream=True))
        data = openai_stream().data
    else:
        payload = {"model": CLAUDE, "stream": True, "messages": [{"role": "user", "content": "h"}]}
        exchange, _ = await send_request(runtime, "claude", json.dumps(payload).encode(), MESSAGES)
        data = anthropic_stream().data
    await exchange.on_response_headers(response_headers(content_type="text/event-stream"))
    released = streamed([await exchange.on_response_body(body(data, end=False))])
    assert fmt != "guarded" or released.endswith(b"data: [DONE]\n\n")  # all released
    await exchange.abandon()
    [row] = ledger_rows(runtime)
    assert row["status"] == 200


async def test_a_stream_left_before_its_last_event_is_499(runtime: Runtime) -> None:
    exchange, _ = await send_request(runtime, "guarded", chat(stream=True))
    await exchange.on_response_headers(response_headers(content_type="text/event-stream"))
    data = openai_stream().data
    await exchange.on_response_body(body(data[: data.index(b"data: [DONE]")], end=False))
    await exchange.abandon()
    [row] = ledger_rows(runtime)
    assert row["status"] == CLIENT_CLOSED


class _SlowLedger(UsageLedger):
    """A ledger whose writes take a while, so the caller can be cancelled mid-write."""

    async def record(self, rec: Any) -> None:
        await asyncio.sleep(0.2)
        await super().record(rec)


async def test_a_cancelled_caller_does_not_cut_the_closing_short(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    accounts = runtime.accounts
    assert accounts.ledger is not None
    slow = _SlowLedger.open(runtime.config.path.parent / "usage.db")
    await accounts.ledger.aclose()
    accounts.ledger = slow
    exchange, _ = await send_request(runtime, "counted", chat())
    await exchange.on_response_headers(response_headers())
    before = (
        REGISTRY.get_sample_value(
            "checkstream_requests_total", {"tenant": "counted", "status": "200"}
        )
        or 0.0
    )
    # The gRPC stream is cancelled while the ledger write is under way (client gone).
    task = asyncio.create_task(exchange.on_response_body(body(openai_answer())))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with caplog.at_level("INFO", logger="checkstream.requests"):
        await accounts.settle()
    [row] = ledger_rows(runtime)
    assert row["status"] == 200
    after = REGISTRY.get_sample_value(
        "checkstream_requests_total", {"tenant": "counted", "status": "200"}
    )
    assert after == before + 1
    [line] = [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "checkstream.requests"
    ]
    assert (line["event"], line["request_id"]) == ("request", row["request_id"])
    # Finishing again (the stream's abandonment racing the end) counts nothing more.
    await exchange.abandon()
    await accounts.settle()
    assert len(ledger_rows(runtime)) == 1


# --- tokens_per_minute ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "reserved"),
    [
        ({"max_tokens": 100}, PROMPT_TOKENS + 100),
        ({"max_completion_tokens": 50, "max_tokens": 300}, PROMPT_TOKENS + 50),
        ({}, PROMPT_TOKENS + 500),  # the tenant's default_max_tokens
        ({"max_tokens": True}, PROMPT_TOKENS + 500),  # not a count
    ],
)
async def test_tokens_are_reserved_up_front_then_settled_to_the_real_count(
    runtime: Runtime, extra: dict[str, Any], reserved: int
) -> None:
    exchange, decision = await send_request(runtime, "tpm", chat(**extra))
    assert forwarded(decision)
    assert await remaining(runtime, "tpm") == 10000 - reserved
    head, _ = await complete(exchange, openai_answer(prompt_tokens=12, completion_tokens=30))
    assert set_headers(head) == {
        "x-ratelimit-limit": "10000",
        "x-ratelimit-remaining": str(10000 - reserved),
        # reserved tokens drain at 10000 per minute
        "x-ratelimit-reset": str(math.ceil(T0 + reserved * 60 / 10000)),
    }
    assert await remaining(runtime, "tpm") == 10000 - 42


async def test_an_answer_longer_than_reserved_is_charged_in_full(runtime: Runtime) -> None:
    exchange, _ = await send_request(runtime, "tpm", chat(max_tokens=100))
    await complete(exchange, openai_answer(prompt_tokens=12, completion_tokens=300))
    assert await remaining(runtime, "tpm") == 10000 - 312


async def test_a_request_that_can_never_fit_is_400_and_recorded(
    runtime: Runtime,
) -> None:
    # Not a rate limit: waiting cannot help, so no 429 and no Retry-After for SDKs to obey.
    _, refused = await send_request(runtime, "tpm", chat(max_tokens=20000))
    status, headers, error = immediate(refused)
    assert status == 400
    assert "retry-after" not in headers
    assert error["error"]["code"] == "request_too_large"
    assert error["error"]["message"] == (
        "this request may use about 20010 tokens (10 for the prompt, 20000 for the answer), "
        "more than the tenant's tokens_per_minute (10000), so it can never be served: "
        "lower max_tokens"
    )
    [row] = ledger_rows(runtime)
    assert row_summary(row) == ("tpm", MODEL, 0, 0, 0, 400, 0.0)
    assert await remaining(runtime, "tpm") == 10000


async def test_requests_per_minute_refusal_after_the_burst(runtime: Runtime) -> None:
    for _ in range(10):
        await one_request(runtime, "rpm", chat(), openai_answer())
    _, refused = await send_request(runtime, "rpm", chat())
    status, headers, _ = immediate(refused)
    assert (status, headers["retry-after"], headers["x-ratelimit-remaining"]) == (429, "6", "0")
    assert [r["status"] for r in ledger_rows(runtime)] == [200] * 10 + [429]


async def test_a_negative_max_tokens_does_not_break_the_request(runtime: Runtime) -> None:
    _, decision = await send_request(runtime, "tpm", chat(max_tokens=-1000))
    assert decision.WhichOneof("response") in ("request_body", "immediate_response")


# --- budgets -------------------------------------------------------------------------------


async def spent_usd(runtime: Runtime, tenant: str) -> float:
    """This month's spend as tenant-info reports it."""
    period = time.strftime("%Y-%m", time.gmtime())
    return await runtime.accounts.limiter.spent(tenant, period) / NANO


async def test_budget_is_charged_the_price_and_refuses_once_spent(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The limiter decides the Retry-After from its clock: the real one here.
    monkeypatch.setattr(limits_module, "time", time)
    await one_request(runtime, "budgeted", chat(), openai_answer(12, 30))
    assert await spent_usd(runtime, "budgeted") == 6.6e-05
    # Under the budget when it starts: it may overshoot by its own cost.
    await one_request(runtime, "budgeted", chat(), openai_answer(12, 30))
    assert await spent_usd(runtime, "budgeted") == 0.000132
    before = time.time()
    _, refused = await send_request(runtime, "budgeted", chat())
    after = time.time()
    status, headers, error = immediate(refused)
    assert (status, error["error"]["code"]) == (429, "budget_exceeded")
    assert error["error"]["message"] == "the tenant's monthly budget of $0.0001 is spent"
    retry = int(headers["retry-after"])
    assert math.ceil(seconds_to_next_month(after)) <= retry
    assert retry <= math.ceil(seconds_to_next_month(before))
    # No rate limit configured: none to report.
    assert set(headers) == {"content-type", "retry-after"}
    assert [row_summary(r)[5:] for r in ledger_rows(runtime)] == [
        (200, 6.6e-05),
        (200, 6.6e-05),
        (429, 0.0),
    ]
    # A restarted gateway starts the month from the ledger, and still refuses.
    await runtime.accounts.aclose()
    again = Runtime.from_config(load_config(write_config(tmp_path)))
    try:
        assert await spent_usd(again, "budgeted") == 0.000132
        _, refused = await send_request(again, "budgeted", chat())
        assert immediate(refused)[0] == 429
    finally:
        await again.accounts.aclose()


async def test_budget_refusal_of_a_rate_limited_tenant_carries_its_headers_and_takes_nothing(
    runtime: Runtime,
) -> None:
    for _ in range(2):
        await one_request(runtime, "budgeted-rpm", chat(), openai_answer(12, 30))
    assert await spent_usd(runtime, "budgeted-rpm") == 0.000132
    _, refused = await send_request(runtime, "budgeted-rpm", chat(), x_request_id="over")
    status, headers, error = immediate(refused)
    assert (status, error["error"]["code"]) == (429, "budget_exceeded")
    # Retry-After runs to next month (on the limiter's fixed clock); the X-RateLimit-*
    # headers say where the rate limit stands, as on every answer of a limited tenant.
    assert headers == {
        "content-type": "application/json",
        "retry-after": str(math.ceil(seconds_to_next_month(T0))),
        "x-ratelimit-limit": "10",
        "x-ratelimit-remaining": "8",
        "x-ratelimit-reset": str(int(T0) + 12),
    }
    # The refusal took no request from the rate limit, and cost nothing.
    assert await remaining(runtime, "budgeted-rpm") == 8
    assert await spent_usd(runtime, "budgeted-rpm") == 0.000132
    [*_, row] = ledger_rows(runtime)
    assert row["request_id"] == "over"
    assert row_summary(row) == ("budgeted-rpm", "", 0, 0, 0, 429, 0.0)


REDIS_CONFIG = """\
usage: {path: usage.db}
limits: {backend: redis, url: "redis://127.0.0.1:PORT/0"}
pricing:
  gpt-4o-mini: {input: 0.5, output: 2.0}
tenants:
  resolution:
    - header: "X-Tenant-ID"
  configs:
    limited:
      backend_url: "http://127.0.0.1:9/v1"
      rate_limit: {requests_per_minute: 100000}
    limited-open:
      backend_url: "http://127.0.0.1:9/v1"
      rate_limit: {requests_per_minute: 100000}
      fail_mode: open
    budgeted:
      backend_url: "http://127.0.0.1:9/v1"
      budget: {monthly_usd: 10}
"""


@pytest.fixture
async def redis_runtime_for(
    tmp_path: Path,
) -> AsyncIterator[Callable[[int], Runtime]]:
    made: list[Runtime] = []

    def build(port: int) -> Runtime:
        text = REDIS_CONFIG.replace("PORT", str(port))
        rt = Runtime.from_config(load_config(write_config(tmp_path, text)))
        made.append(rt)
        return rt

    yield build
    for rt in made:
        await rt.accounts.aclose()


async def test_limiter_down_fails_closed_with_503_and_records_it(
    redis_runtime_for: Callable[[int], Runtime],
) -> None:
    runtime = redis_runtime_for(free_port())
    before = errors_counted("limiter")
    _, refused = await send_request(runtime, "limited", chat())
    status, _, error = immediate(refused)
    assert (status, error["error"]["code"]) == (503, "limits_unavailable")
    assert errors_counted("limiter") == before + 1
    [row] = ledger_rows(runtime)
    assert row_summary(row) == ("limited", "", 0, 0, 0, 503, 0.0)


async def test_limiter_down_fails_open_when_the_tenant_asks(
    redis_runtime_for: Callable[[int], Runtime],
) -> None:
    runtime = redis_runtime_for(free_port())
    exchange, decision = await send_request(runtime, "limited-open", chat())
    assert forwarded(decision)
    head, _ = await complete(exchange, openai_answer(12, 30))
    assert set_headers(head) == {}  # no decision to report
    [row] = ledger_rows(runtime)
    assert row_summary(row) == ("limited-open", MODEL, 12, 30, 0, 200, 6.6e-05)


async def test_budget_store_down_is_recorded_as_the_503_it_answers(
    redis_runtime_for: Callable[[int], Runtime],
) -> None:
    runtime = redis_runtime_for(free_port())
    before = errors_counted("limiter")
    _, refused = await send_request(runtime, "budgeted", chat())
    status, _, error = immediate(refused)
    assert (status, error["error"]["code"]) == (503, "limits_unavailable")
    # The budget lives in the limiter's store: its failure is the limiter's.
    assert errors_counted("limiter") == before + 1
    [row] = ledger_rows(runtime)
    assert row["status"] == 503


async def test_redis_limits_through_the_exchange(
    redis_runtime_for: Callable[[int], Runtime], redis_server: RedisServer
) -> None:
    runtime = redis_runtime_for(redis_server.port)
    assert isinstance(runtime.accounts.limiter, RedisLimiter)
    await _flushed(redis_server.url)
    exchange, decision = await send_request(runtime, "limited", chat())
    assert forwarded(decision)
    head, _ = await complete(exchange, openai_answer())
    # Redis' clock, not the fixed one: only the count is exact.
    headers = set_headers(head)
    assert (headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"]) == (
        "100000",
        "99999",
    )
    await one_request(runtime, "budgeted", chat(), openai_answer(12, 30))
    assert await spent_usd(runtime, "budgeted") == 6.6e-05
    # Another replica (same Redis) sees the same month.
    replica = redis_runtime_for(redis_server.port)
    assert await spent_usd(replica, "budgeted") == 6.6e-05


async def test_many_concurrent_requests_with_redis_limits(
    redis_runtime_for: Callable[[int], Runtime], redis_server: RedisServer
) -> None:
    runtime = redis_runtime_for(redis_server.port)
    answers = await asyncio.gather(
        *(Exchange(runtime).on_request_headers(request_headers("limited")) for _ in range(150))
    )
    statuses = [
        a.immediate_response.status.code if a.HasField("immediate_response") else 0 for a in answers
    ]
    assert statuses == [0] * 150


# --- Tally and Accounts.finish -------------------------------------------------------------


def tally(**fields: Any) -> Tally:
    t = Tally.start("acme", "r1")
    for name, value in fields.items():
        setattr(t, name, value)
    return t


@pytest.mark.parametrize(
    ("fields", "tokens"),
    [
        # Answered by CheckStream itself (refusal, policy block): no model read anything.
        ({"billable": False, "prompt_chars": 400, "usage": Usage(5, 6)}, (0, 0, False)),
        ({"billable": True, "usage": Usage(5, 6), "prompt_chars": 400}, (5, 6, False)),
        ({"billable": True, "usage": Usage(0, 0)}, (0, 0, False)),
        # No usage: chars / 4, rounded up.
        ({"billable": True, "prompt_chars": 401, "answer_chars": 1}, (101, 1, True)),
        ({"billable": True, "prompt_chars": 4, "answer_chars": 8}, (1, 2, True)),
        ({"billable": True}, (0, 0, True)),
        # One count missing: that one is estimated, and the pair is marked estimated.
        (
            {"billable": True, "usage": Usage(5, None), "prompt_chars": 400, "answer_chars": 9},
            (5, 3, True),
        ),
        (
            {"billable": True, "usage": Usage(None, 6), "prompt_chars": 9, "answer_chars": 400},
            (3, 6, True),
        ),
    ],
)
def test_tally_tokens(fields: dict[str, Any], tokens: tuple[int, int, bool]) -> None:
    assert tally(**fields).tokens() == tokens


def test_tally_start_uses_the_request_id_or_makes_one() -> None:
    assert Tally.start("acme", "given").request_id == "given"
    made = {Tally.start("acme", None).request_id for _ in range(3)}
    assert len(made) == 3
    assert all(len(r) == 32 for r in made)


async def test_finish_never_raises_and_counts_each_failing_store(tmp_path: Path) -> None:
    ledger = UsageLedger.open(tmp_path / "usage.db")
    await ledger.aclose()  # closed: every record fails
    down = f"redis://127.0.0.1:{free_port()}/0"
    accounts = Accounts(limiter=RedisLimiter(down), ledger=ledger, audit=AuditLog({}))
    config = TenantConfig(
        backend_url="http://127.0.0.1:9",
        rate_limit=RateLimitConfig(tokens_per_minute=1000, max_concurrent_requests=2),
        budget=BudgetConfig(monthly_usd=10),
    )
    pricing = Pricing({MODEL: Price(input=0.5, output=2.0)})
    t = tally(billable=True, admitted=True, reserved_tokens=300, usage=Usage(3, 4), model=MODEL)
    kinds = ("limiter", "budget", "usage_ledger")
    before = {kind: errors_counted(kind) for kind in kinds}
    try:
        await accounts.finish(t, config, pricing, frozenset())
        await accounts.finish(t, config, pricing, frozenset())  # once only
    finally:
        await accounts.aclose()
    assert t.done
    # The charge goes with the limiter's finish (one round trip): one store, one failure.
    assert {kind: errors_counted(kind) - before[kind] for kind in kinds} == {
        "limiter": 1,
        "budget": 0,
        "usage_ledger": 1,
    }


async def test_finish_never_raises_on_negative_reported_usage(tmp_path: Path) -> None:
    accounts = Accounts(MemoryLimiter(), None, AuditLog({}))
    config = TenantConfig(
        backend_url="http://127.0.0.1:9", rate_limit=RateLimitConfig(tokens_per_minute=1000)
    )
    # The formats refuse negative counts; a Tally given one anyway must not break finish.
    assert OPENAI.answer_usage({"usage": {"prompt_tokens": -50, "completion_tokens": 3}}) == (
        Usage(None, 3)
    )
    t = tally(billable=True, admitted=True, reserved_tokens=300, usage=Usage(-50, 3))
    await accounts.finish(t, config, Pricing({}), frozenset())
    assert t.done


async def test_finish_settles_and_releases_only_what_was_admitted(tmp_path: Path) -> None:
    limiter = MemoryLimiter()
    ledger = UsageLedger.open(tmp_path / "usage.db")
    accounts = Accounts(limiter, ledger, AuditLog({}))
    limits = RateLimitConfig(tokens_per_minute=1000, max_concurrent_requests=1)
    config = TenantConfig(backend_url="http://127.0.0.1:9", rate_limit=limits)
    tokens_only = RateLimitConfig(tokens_per_minute=1000)
    slots_only = RateLimitConfig(max_concurrent_requests=1)
    try:
        decision = await limiter.acquire("acme", limits, 300)
        assert decision.allowed
        # A request the limiter refused took nothing, so it gives nothing back.
        await accounts.finish(tally(status=429), config, Pricing({}), frozenset())
        assert (await limiter.remaining("acme", tokens_only)).remaining == 700
        assert (await limiter.remaining("acme", slots_only)).remaining == 0
        admitted = tally(admitted=True, reserved_tokens=300, billable=True, usage=Usage(3, 4))
        admitted.decision = decision  # its lease is what finish gives back
        await accounts.finish(admitted, config, Pricing({}), frozenset())
        assert (await limiter.remaining("acme", tokens_only)).remaining == 1000 - 7
        assert (await limiter.remaining("acme", slots_only)).remaining == 1
    finally:
        await accounts.aclose()
    rows = [row_summary(dict(r))[2:6] for r in _rows(tmp_path / "usage.db")]
    assert rows == [(0, 0, 0, 429), (3, 4, 0, 0)]


class RecordingLimiter(MemoryLimiter):
    """Records each ``finish`` call: what one request's end asks of the store."""

    def __init__(self) -> None:
        super().__init__(self._ledger_spend)
        self.finished: list[tuple[int, int, Charge | None]] = []
        self.ledger_asked: list[str] = []

    async def _ledger_spend(self, tenant: str, period: str) -> int:
        self.ledger_asked.append(tenant)
        return 0

    async def finish(
        self,
        tenant: str,
        limits: RateLimitConfig,
        reserved_tokens: int,
        actual_tokens: int,
        now: float | None = None,
        charge: Charge | None = None,
        lease: str | None = None,
    ) -> None:
        self.finished.append((reserved_tokens, actual_tokens, charge))
        await super().finish(tenant, limits, reserved_tokens, actual_tokens, now, charge, lease)


@pytest.mark.parametrize(
    ("admitted", "budgeted", "model", "charged"),
    [
        (True, True, MODEL, True),
        (False, True, MODEL, False),  # refused: nothing was taken, nothing is finished
        (True, False, MODEL, False),  # no budget: nothing to charge
        (True, True, "unpriced-model", False),  # costs nothing
    ],
)
async def test_finish_charges_the_budget_with_the_settle_and_release(
    admitted: bool, budgeted: bool, model: str, charged: bool
) -> None:
    limiter = RecordingLimiter()
    accounts = Accounts(limiter, None, AuditLog({}))
    limits = RateLimitConfig(tokens_per_minute=1000, max_concurrent_requests=1)
    config = TenantConfig(
        backend_url="http://127.0.0.1:9",
        rate_limit=limits,
        budget=BudgetConfig(monthly_usd=10) if budgeted else None,
    )
    pricing = Pricing({MODEL: Price(input=0.5, output=2.0)})
    t = tally(admitted=admitted, reserved_tokens=300, billable=True, usage=Usage(12, 30))
    if admitted:
        t.decision = await limiter.acquire("acme", limits, 300)
        assert t.decision.allowed
    t.model = model
    try:
        await accounts.finish(t, config, pricing, frozenset())
    finally:
        await accounts.aclose()
    period = time.strftime("%Y-%m", time.gmtime())
    # 12 * 0.5 + 30 * 2.0 = 66 USD per million tokens: 66 000 nano-dollars.
    charge = Charge(period, 66_000) if charged else None
    # Settled, released and charged by one call: a request's end is one store operation.
    assert limiter.finished == ([(300, 42, charge)] if admitted else [])
    # Only a charge needs the month's counter, so only then is the ledger read.
    assert limiter.ledger_asked == (["acme"] if charged else [])
    assert await limiter.spent("acme", period) == (66_000 if charged else 0)
    assert (await limiter.remaining("acme", limits)).remaining == (1000 - 42 if admitted else 1000)


async def _flushed(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()


def _rows(path: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute("SELECT * FROM usage ORDER BY rowid"))
    finally:
        conn.close()
