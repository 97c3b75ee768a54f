"""The demo upstream's newer endpoints (Responses, embeddings, count_tokens, model lookup),
its JSON errors for unknown paths, and quiet client disconnects; driven by the official SDKs
and raw HTTP against the demo itself (test_e2e_demo_sdks.py goes through the gateway)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from checkstream.demo import DEMO_MODELS, DemoUpstream, answer_pieces
from checkstream.demo.embeddings import DEFAULT_DIMENSIONS, embed
from tests.test_demo_upstream import anthropic_client, openai_client, upstream

PROMPT = "Hello gateway"
ANSWER = "".join(answer_pieces(PROMPT))
WORDS = len(ANSWER.split())
RESPONSES_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * WORDS,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]

__all__ = ["anthropic_client", "openai_client", "upstream"]  # fixtures used by name


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(upstream: DemoUpstream, path: str) -> str:
    return f"http://127.0.0.1:{upstream.port}{path}"


def test_the_default_answer_is_complete_sentences() -> None:
    assert ANSWER.endswith("without an API key.")
    sentences = [s for s in ANSWER.split(". ") if s]
    assert len(sentences) == 3
    assert "You said: Hello gateway." in ANSWER


# --- Responses ----------------------------------------------------------------------------


async def test_responses_non_streamed_through_the_sdk(openai_client: openai.AsyncOpenAI) -> None:
    response = await openai_client.responses.create(
        model="demo-model", input=PROMPT, instructions="be brief please"
    )
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == ANSWER
    assert response.usage is not None
    # 2 words of input + 3 of instructions; one output token per word.
    assert (response.usage.input_tokens, response.usage.output_tokens) == (5, WORDS)
    assert response.usage.total_tokens == 5 + WORDS


async def test_responses_stream_through_the_sdk(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.responses.create(
        model="demo-model",
        input=[
            {"role": "user", "content": "an earlier turn"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "input_text", "text": PROMPT}]},
        ],
        stream=True,
    )
    events = [event async for event in stream]
    assert [e.type for e in events] == RESPONSES_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == ANSWER
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == ANSWER
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == WORDS


async def test_responses_stream_helper_accumulates_the_answer(
    openai_client: openai.AsyncOpenAI,
) -> None:
    # The SDK's stream() helper checks the events against each other as it accumulates.
    async with openai_client.responses.stream(model="demo-model", input=PROMPT) as stream:
        texts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(texts) == ANSWER
    assert final.output_text == ANSWER


async def test_responses_sse_is_named_events(
    upstream: DemoUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "input": PROMPT, "stream": True}
    async with http.post(url(upstream, "/v1/responses"), json=body) as resp:
        assert resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    blocks = [b for b in raw.split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    assert names == RESPONSES_EVENTS
    for name, block in zip(names, blocks, strict=True):
        assert json.loads(block.split("\n")[1].removeprefix("data: "))["type"] == name


async def test_responses_without_input_is_an_openai_400(openai_client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await openai_client.responses.create(model="demo-model", input=42)  # type: ignore[arg-type]
    assert isinstance(err.value.body, dict)
    assert "input" in err.value.body["message"]


# --- Embeddings ---------------------------------------------------------------------------


async def test_embeddings_floats_and_the_sdk_default_base64(
    openai_client: openai.AsyncOpenAI,
) -> None:
    # The SDK asks for base64 unless told otherwise, and decodes it.
    default = await openai_client.embeddings.create(model="demo-embed", input=["one", "two words"])
    floats = await openai_client.embeddings.create(
        model="demo-embed", input=["one", "two words"], encoding_format="float"
    )
    for result in (default, floats):
        assert [d.index for d in result.data] == [0, 1]
        assert len(result.data[0].embedding) == DEFAULT_DIMENSIONS
        assert result.usage.prompt_tokens == 3
    for a, b in zip(default.data, floats.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    vector = floats.data[0].embedding
    assert vector == pytest.approx(embed("one", DEFAULT_DIMENSIONS))
    assert math.sqrt(sum(v * v for v in vector)) == pytest.approx(1.0)
    assert floats.data[0].embedding != floats.data[1].embedding


async def test_embeddings_dimensions_and_raw_base64(
    upstream: DemoUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "input": "hello", "dimensions": 3, "encoding_format": "base64"}
    async with http.post(url(upstream, "/v1/embeddings"), json=body) as resp:
        data = (await resp.json())["data"][0]["embedding"]
    assert struct.unpack("<3f", base64.b64decode(data)) == pytest.approx(embed("hello", 3))


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "input": []},
        {"model": "m", "input": "x", "dimensions": 0},
        {"model": "m", "input": "x", "encoding_format": "int8"},
        {"input": "x"},
    ],
)
async def test_bad_embeddings_requests_are_openai_400s(
    upstream: DemoUpstream, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    async with http.post(url(upstream, "/v1/embeddings"), json=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"


# --- Anthropic count_tokens and models ------------------------------------------------------


async def test_count_tokens_through_the_sdk(anthropic_client: anthropic.AsyncAnthropic) -> None:
    counted = await anthropic_client.messages.count_tokens(
        model="claude-demo",
        system="two words",
        messages=[{"role": "user", "content": PROMPT}],
    )
    assert counted.input_tokens == 4
    # The same count a message would be billed for.
    message = await anthropic_client.messages.create(
        model="claude-demo",
        max_tokens=64,
        system="two words",
        messages=[{"role": "user", "content": PROMPT}],
    )
    assert message.usage.input_tokens == counted.input_tokens


async def test_count_tokens_without_messages_is_an_anthropic_400(
    upstream: DemoUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.post(url(upstream, "/v1/messages/count_tokens"), json={"model": "m"}) as r:
        assert r.status == 400
        body = await r.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"


async def test_models_in_each_sdks_shape(
    openai_client: openai.AsyncOpenAI, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    assert [m.id async for m in openai_client.models.list()] == list(DEMO_MODELS)
    assert (await openai_client.models.retrieve(DEMO_MODELS[0])).id == DEMO_MODELS[0]
    page = await anthropic_client.models.list()
    assert [m.id for m in page.data] == list(DEMO_MODELS)
    assert (await anthropic_client.models.retrieve(DEMO_MODELS[1])).id == DEMO_MODELS[1]
    with pytest.raises(openai.NotFoundError):
        await openai_client.models.retrieve("no-such-model")
    with pytest.raises(anthropic.NotFoundError) as err:
        await anthropic_client.models.retrieve("no-such-model")
    assert isinstance(err.value.body, dict)
    assert err.value.body["error"]["type"] == "not_found_error"


# --- Unknown paths, wrong methods ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/no-such-thing", 404),
        ("POST", "/v2/chat/completions", 404),
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/v1/models", 405),
    ],
)
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_unknown_paths_and_methods_answer_json_in_the_callers_shape(
    upstream: DemoUpstream,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    status: int,
    api: str,
) -> None:
    headers = {"anthropic-version": "2023-06-01"} if api == "anthropic" else {}
    async with http.request(method, url(upstream, path), headers=headers) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        body = await resp.json()
    if api == "anthropic":
        assert body["type"] == "error"
        expected = "not_found_error" if status == 404 else "invalid_request_error"
        assert body["error"]["type"] == expected
        message = body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        message = body["error"]["message"]
    assert path in message


async def test_the_sdk_gets_an_api_error_for_an_unknown_path(
    openai_client: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await openai_client.post("/no-such-endpoint", body={}, cast_to=object)
    assert isinstance(err.value.body, dict)
    assert "does not serve" in err.value.body["message"]


# --- Client disconnects ----------------------------------------------------------------------


def _hang_up_after(port: int, path: str, body: dict[str, Any], read_bytes: int) -> None:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nx-demo-chunks: 400\r\nx-demo-delay-ms: 5\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + payload)
        received = 0
        while received < read_bytes:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += len(chunk)
        # RST rather than FIN, as a killed client does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


STREAM_BODIES = [
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"model": "m", "prompt": "hi"}),
    ("/v1/responses", {"model": "m", "input": "hi"}),
    (
        "/v1/messages",
        {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]},
    ),
]


@pytest.mark.parametrize(("path", "body"), STREAM_BODIES)
@pytest.mark.parametrize("read_bytes", [0, 1, 2000])
async def test_client_disconnects_leave_no_traceback(
    upstream: DemoUpstream,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: dict[str, Any],
    read_bytes: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    await asyncio.to_thread(
        _hang_up_after, upstream.port, path, {**body, "stream": True}, read_bytes
    )
    # The stream keeps writing into the reset connection for a while: give it time to fail.
    await asyncio.sleep(0.3)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []
    # And the server still serves.
    async with (
        aiohttp.ClientSession() as http,
        http.post(url(upstream, "/v1/chat/completions"), json=STREAM_BODIES[0][1]) as resp,
    ):
        assert resp.status == 200
