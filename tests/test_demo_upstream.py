"""Tests for the built-in demo upstream, driven by the official SDKs and raw HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from checkstream.demo import (
    DEMO_MODELS,
    MAX_CHUNKS,
    DemoUpstream,
    answer_pieces,
    start_demo_upstream,
)

PROMPT = "Hello gateway"
# The whole answer to PROMPT, spelled out so a change in wording is noticed: complete sentences.
EXPECTED = (
    "This is the CheckStream demo upstream. You said: Hello gateway. It answers one word at a"
    " time, so the gateway can be tried and measured without an API key."
)
WORDS = len(EXPECTED.split())  # one text piece (and one output token) per word
CHAT_BODY: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": PROMPT}]}
COMPLETION_BODY: dict[str, Any] = {"model": "demo", "prompt": PROMPT}
MESSAGES_BODY: dict[str, Any] = {**CHAT_BODY, "max_tokens": 64}
ENDPOINT_BODIES = [
    ("/v1/chat/completions", CHAT_BODY),
    ("/v1/completions", COMPLETION_BODY),
    ("/v1/messages", MESSAGES_BODY),
]


@pytest.fixture
async def upstream() -> AsyncIterator[DemoUpstream]:
    server = await start_demo_upstream("127.0.0.1", 0)
    yield server
    await server.close()


@pytest.fixture
async def openai_client(upstream: DemoUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    # No retries: error pass-through tests must see the first answer, not wait for backoff.
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="x", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def anthropic_client(upstream: DemoUpstream) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=f"http://127.0.0.1:{upstream.port}", api_key="x", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(upstream: DemoUpstream, path: str) -> str:
    return f"http://127.0.0.1:{upstream.port}{path}"


async def read_sse(resp: aiohttp.ClientResponse) -> list[tuple[float, str | None, str]]:
    """(arrival time, event name, data) for every SSE event in the response."""
    events = []
    name: str | None = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((time.monotonic(), name, line.removeprefix("data: ")))
            name = None
    return events


def text_of_event(path: str, data: str) -> str | None:
    """The answer text an SSE data payload carries, or None for events carrying none."""
    if data == "[DONE]":
        return None
    obj = json.loads(data)
    if path == "/v1/messages":
        delta = obj.get("delta", {})
        return delta["text"] if delta.get("type") == "text_delta" else None
    if not obj["choices"]:
        return None
    choice = obj["choices"][0]
    text = choice["delta"].get("content") if path == "/v1/chat/completions" else choice["text"]
    return text or None


async def test_openai_chat_non_stream(openai_client: openai.AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model="demo-model", messages=[{"role": "user", "content": PROMPT}]
    )
    assert completion.object == "chat.completion"
    assert completion.model == "demo-model"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == EXPECTED
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2
    assert completion.usage.completion_tokens == WORDS
    assert completion.usage.total_tokens == WORDS + 2


async def test_openai_chat_stream(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="demo-model",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "ignored, not the last user turn"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": PROMPT}]},
        ],
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == EXPECTED
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


async def test_openai_chat_stream_include_usage(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="demo-model",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == WORDS
    assert chunks[-1].usage.total_tokens == WORDS + 2


async def test_openai_legacy_completions(openai_client: openai.AsyncOpenAI) -> None:
    completion = await openai_client.completions.create(model="demo-model", prompt=PROMPT)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == EXPECTED
    assert completion.choices[0].finish_reason == "stop"

    stream = await openai_client.completions.create(
        model="demo-model",
        prompt=["first prompt", PROMPT],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == EXPECTED
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 4


async def test_anthropic_non_stream(anthropic_client: anthropic.AsyncAnthropic) -> None:
    message = await anthropic_client.messages.create(
        model="demo-claude",
        max_tokens=64,
        system="ignored system prompt",
        messages=[{"role": "user", "content": PROMPT}],
    )
    assert message.type == "message"
    assert message.model == "demo-claude"
    block = message.content[0]
    assert isinstance(block, anthropic.types.TextBlock)
    assert block.text == EXPECTED
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 5
    assert message.usage.output_tokens == WORDS


async def test_anthropic_stream(anthropic_client: anthropic.AsyncAnthropic) -> None:
    async with anthropic_client.messages.stream(
        model="demo-claude",
        max_tokens=64,
        messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
    ) as stream:
        texts = [text async for text in stream.text_stream]
        message = await stream.get_final_message()
    assert "".join(texts) == EXPECTED
    assert len(texts) == WORDS
    block = message.content[0]
    assert isinstance(block, anthropic.types.TextBlock)
    assert block.text == EXPECTED
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == WORDS


async def test_anthropic_stream_event_sequence(
    upstream: DemoUpstream, http: aiohttp.ClientSession
) -> None:
    body = {**MESSAGES_BODY, "stream": True}
    headers = {"x-demo-chunks": "3"}
    async with http.post(url(upstream, "/v1/messages"), json=body, headers=headers) as resp:
        assert resp.content_type == "text/event-stream"
        events = await read_sse(resp)
    assert [name for _, name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    for _, name, data in events:
        assert json.loads(data)["type"] == name
    start = json.loads(events[0][2])["message"]
    assert start["usage"] == {"input_tokens": 2, "output_tokens": 1}
    assert json.loads(events[-2][2])["usage"] == {"output_tokens": 3}


@pytest.mark.parametrize(("path", "body"), ENDPOINT_BODIES)
async def test_demo_chunks_header_sets_text_event_count(
    upstream: DemoUpstream, http: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> None:
    async with http.post(
        url(upstream, path), json={**body, "stream": True}, headers={"x-demo-chunks": "50"}
    ) as resp:
        assert resp.status == 200
        events = await read_sse(resp)
    texts = [t for _, _, data in events if (t := text_of_event(path, data)) is not None]
    assert len(texts) == 50
    assert texts == answer_pieces(PROMPT, 50)
    if path != "/v1/messages":
        assert events[-1][2] == "[DONE]"


async def test_demo_chunks_header_is_capped(
    upstream: DemoUpstream, http: aiohttp.ClientSession
) -> None:
    headers = {"x-demo-chunks": str(MAX_CHUNKS * 10)}
    async with http.post(url(upstream, "/v1/messages"), json=MESSAGES_BODY, headers=headers) as r:
        assert (await r.json())["usage"]["output_tokens"] == MAX_CHUNKS


async def test_openai_sdk_sees_demo_chunks(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="demo-model",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        extra_headers={"x-demo-chunks": "50"},
    )
    texts = [c.choices[0].delta.content async for c in stream if c.choices[0].delta.content]
    assert len(texts) == 50


def test_answer_pieces_cycle_and_truncate_the_echo() -> None:
    pieces = answer_pieces("word " * 100, 500)
    assert len(pieces) == 500
    assert all(p.endswith(" ") for p in pieces[:-1])
    assert not pieces[-1].endswith(" ")
    answer = "".join(pieces)
    # The echo keeps the first 200 characters of the prompt, then the text starts over.
    assert "You said: " + ("word " * 40).rstrip() + "." in answer
    assert answer.count("This is the CheckStream demo upstream.") > 1
    assert answer_pieces("", 6) == ["This ", "is ", "the ", "CheckStream ", "demo ", "upstream."]
    assert answer_pieces(PROMPT, 0) == []


@pytest.mark.parametrize(("path", "body"), ENDPOINT_BODIES)
async def test_malformed_json_is_400_in_endpoint_format(
    upstream: DemoUpstream, http: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> None:
    async with http.post(
        url(upstream, path), data=b'{"model": ', headers={"content-type": "application/json"}
    ) as resp:
        assert resp.status == 400
        assert_error_shape(path, await resp.json(), "invalid_request_error")


@pytest.mark.parametrize(
    ("path", "body", "missing"),
    [
        ("/v1/chat/completions", CHAT_BODY, "messages"),
        ("/v1/chat/completions", CHAT_BODY, "model"),
        ("/v1/completions", COMPLETION_BODY, "prompt"),
        ("/v1/completions", COMPLETION_BODY, "model"),
        ("/v1/messages", MESSAGES_BODY, "messages"),
        ("/v1/messages", MESSAGES_BODY, "model"),
        ("/v1/messages", MESSAGES_BODY, "max_tokens"),
    ],
)
async def test_missing_required_field_is_400(
    upstream: DemoUpstream,
    http: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
    missing: str,
) -> None:
    incomplete = {k: v for k, v in body.items() if k != missing}
    async with http.post(url(upstream, path), json=incomplete) as resp:
        assert resp.status == 400
        error = await resp.json()
    assert_error_shape(path, error, "invalid_request_error")
    assert missing in json.dumps(error)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-demo-chunks": "many"},
        {"x-demo-chunks": "-1"},
        {"x-demo-delay-ms": "soon"},
        {"x-demo-delay-ms": "-5"},
        {"x-demo-status": "200"},
    ],
)
async def test_bad_demo_header_is_400(
    upstream: DemoUpstream, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    async with http.post(
        url(upstream, "/v1/chat/completions"), json=CHAT_BODY, headers=headers
    ) as r:
        assert r.status == 400
        assert_error_shape("/v1/chat/completions", await r.json(), "invalid_request_error")


@pytest.mark.parametrize(("path", "body"), ENDPOINT_BODIES)
@pytest.mark.parametrize("status", [400, 429, 500, 529])
async def test_demo_status_header_gives_error_shape(
    upstream: DemoUpstream,
    http: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
    status: int,
) -> None:
    if path == "/v1/messages":
        error_type = {
            400: "invalid_request_error",
            429: "rate_limit_error",
            500: "api_error",
            529: "overloaded_error",
        }[status]
    else:
        error_type = "server_error" if status >= 500 else "invalid_request_error"
    # Asking for a stream still gets a plain JSON error, as the real APIs do before streaming.
    async with http.post(
        url(upstream, path), json={**body, "stream": True}, headers={"x-demo-status": str(status)}
    ) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert_error_shape(path, await resp.json(), error_type)


async def test_demo_status_reaches_sdks(
    openai_client: openai.AsyncOpenAI, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(openai.InternalServerError) as openai_err:
        await openai_client.chat.completions.create(
            model="demo-model",
            messages=[{"role": "user", "content": PROMPT}],
            extra_headers={"x-demo-status": "503"},
        )
    assert openai_err.value.status_code == 503
    assert isinstance(openai_err.value.body, dict)
    assert openai_err.value.body["type"] == "server_error"

    with pytest.raises(anthropic.RateLimitError) as anthropic_err:
        await anthropic_client.messages.create(
            model="demo-claude",
            max_tokens=64,
            messages=[{"role": "user", "content": PROMPT}],
            extra_headers={"x-demo-status": "429"},
        )
    assert anthropic_err.value.status_code == 429
    assert isinstance(anthropic_err.value.body, dict)
    assert anthropic_err.value.body["error"]["type"] == "rate_limit_error"


def assert_error_shape(path: str, body: dict[str, Any], error_type: str | None) -> None:
    """Check the endpoint's error format; ``error_type`` None means any type."""
    if path == "/v1/messages":
        assert body["type"] == "error"
        assert set(body["error"]) == {"type", "message"}
        error = body["error"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["param"] is None
        assert body["error"]["code"] is None
        error = body["error"]
    assert isinstance(error["message"], str)
    assert error["message"]
    if error_type is not None:
        assert error["type"] == error_type


async def first_to_last_event_gap(
    http: aiohttp.ClientSession,
    target: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> float:
    async with http.post(target, json={**body, "stream": True}, headers=headers) as resp:
        events = await read_sse(resp)
    arrivals = [t for t, _, data in events if text_of_event(path, data) is not None]
    assert len(arrivals) == 5
    return arrivals[-1] - arrivals[0]


@pytest.mark.parametrize(("path", "body"), ENDPOINT_BODIES)
async def test_delay_header_makes_stream_incremental(
    upstream: DemoUpstream, http: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> None:
    headers = {"x-demo-chunks": "5", "x-demo-delay-ms": "100"}
    # Four 100 ms gaps separate the first and last text event; buffering would collapse them.
    gap = await first_to_last_event_gap(http, url(upstream, path), path, body, headers)
    assert gap > 0.2


async def test_server_chunk_delay_makes_stream_incremental(http: aiohttp.ClientSession) -> None:
    server = await start_demo_upstream("127.0.0.1", 0, chunk_delay_ms=100)
    try:
        path = "/v1/chat/completions"
        gap = await first_to_last_event_gap(
            http, url(server, path), path, CHAT_BODY, {"x-demo-chunks": "5"}
        )
    finally:
        await server.close()
    assert gap > 0.2


async def test_models(openai_client: openai.AsyncOpenAI) -> None:
    models = [model.id async for model in openai_client.models.list()]
    assert models == list(DEMO_MODELS)
