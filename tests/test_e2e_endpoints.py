"""Every endpoint, encoding and split a real client or backend uses, through real Envoy.

The backend here behaves like real ones do: it streams 1-3-character deltas (LiteLLM's
mock), compresses when told to ignore ``accept-encoding`` (some servers do), and serves
the Responses API as well as chat completions.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.support import (
    Gateway,
    Received,
    gateway_ports,
    request,
    start_gateway,
    write_config,
    write_policy,
)

pytestmark = pytest.mark.e2e

EMAIL_ANSWER = "Contact the lead at jane.doe@example.com for the Q3 numbers."


class RealisticBackend:
    """Answers chat completions and Responses, streamed in 1-3-character deltas."""

    def __init__(self) -> None:
        self.port = 0
        self.received: list[Received] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _handle(self, req: web.Request) -> web.StreamResponse:
        raw = await req.read()
        headers = {k.lower(): v for k, v in req.headers.items()}
        self.received.append(Received(req.method, req.path_qs, headers, raw))
        answer = headers.get("x-test-answer", EMAIL_ANSWER)
        payload = json.loads(raw) if raw else {}
        if "x-test-error-echo" in headers:
            # Some backends repeat the offending input in their error message.
            error = {"error": {"message": f"invalid input: {answer}", "type": "invalid_request"}}
            return web.json_response(error, status=400)
        if req.path.endswith("/responses"):
            if payload.get("stream"):
                return await self._sse(req, _responses_events(answer))
            body = _response_object(answer, "completed")
        elif req.path.endswith("/chat/completions"):
            if payload.get("stream"):
                return await self._sse(req, _chat_events(answer))
            body = _chat_completion(answer, headers.get("x-test-tool-args"))
        else:
            body = {"object": "list", "data": []}
        data = json.dumps(body).encode()
        out = {"content-type": "application/json"}
        if "x-test-force-gzip" in headers:
            data, out["content-encoding"] = gzip.compress(data), "gzip"
        return web.Response(body=data, headers=out)

    async def _sse(self, req: web.Request, events: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(req)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    def start(self) -> RealisticBackend:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            assert site._server is not None
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


def _pieces(text: str) -> list[str]:
    sizes, out, i, k = (1, 3, 2), [], 0, 0
    while i < len(text):
        out.append(text[i : i + sizes[k % 3]])
        i, k = i + sizes[k % 3], k + 1
    return out


def _chat_events(answer: str) -> list[bytes]:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in _pieces(answer)]
    return [*events, chunk({}, "stop"), b"data: [DONE]\n\n"]


def _response_object(answer: str, status: str) -> dict[str, Any]:
    item = {
        "type": "message",
        "id": "msg_1",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": answer, "annotations": []}],
    }
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": "m",
        "status": status,
        "output": [item] if status == "completed" else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {"input_tokens": 5, "output_tokens": 9, "total_tokens": 14},
    }


def _responses_events(answer: str) -> list[bytes]:
    seq = iter(range(1000))

    def event(kind: str, data: dict[str, Any]) -> bytes:
        body = {"type": kind, "sequence_number": next(seq), **data}
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode()

    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": answer, "annotations": []}
    events = [event("response.created", {"response": _response_object("", "in_progress")})]
    events += [
        event("response.output_text.delta", {**where, "delta": p, "logprobs": []})
        for p in _pieces(answer)
    ]
    events.append(event("response.output_text.done", {**where, "text": answer, "logprobs": []}))
    events.append(event("response.content_part.done", {**where, "part": part}))
    return [
        *events,
        event("response.completed", {"response": _response_object(answer, "completed")}),
    ]


def _chat_completion(answer: str, tool_args: str | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer}
    if tool_args is not None:
        message["tool_calls"] = [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": tool_args}}
        ]
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
    }


@pytest.fixture(scope="module")
def backend() -> Iterator[RealisticBackend]:
    server = RealisticBackend().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, backend: RealisticBackend) -> Iterator[Gateway]:
    directory: Path = tmp_path_factory.mktemp("endpoints")
    url = f"http://127.0.0.1:{backend.port}/v1"
    redact = write_policy(
        directory,
        "redact.yaml",
        [("mask_pii", "pii_detector", "redact"), ("no_falcon", "falcon", "stop")],
    )
    block = write_policy(directory, "block.yaml", [("no_pii", "pii_detector", "block")])
    config = {
        "classifiers": {"falcon": {"type": "keyword", "terms": ["project falcon"]}},
        # Small, so that one test can cross it; every other answer here is far below.
        "server": {"host": "127.0.0.1", **gateway_ports(), "max_response_bytes": 4096},
        "usage": {"enabled": False},
        "tenants": {
            "resolution": [{"header": "X-Tenant-ID"}],
            "configs": {
                "redacting": {
                    "backend_url": url,
                    "classifiers": ["pii_detector", "falcon"],
                    "policy_path": str(redact),
                    "passthrough_paths": ["/v1/files"],
                },
                "blocking": {
                    "backend_url": url,
                    "classifiers": ["pii_detector"],
                    "policy_path": str(block),
                },
                "open": {"backend_url": url},
                "media-ok": {
                    "backend_url": url,
                    "classifiers": ["pii_detector"],
                    "policy_path": str(block),
                    "passthrough_media": True,
                },
            },
        },
    }
    gateway = start_gateway(write_config(directory, config))
    yield gateway
    assert gateway.stop() == 0, gateway.log()


def _post(gw: Gateway, tenant: str, path: str, body: Any, **headers: str) -> Any:
    return request(f"{gw.url}{path}", body, {"X-Tenant-ID": tenant, **headers})


def test_streamed_chat_in_tiny_deltas_redacts_the_whole_address(gw: Gateway) -> None:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    reply = _post(gw, "redacting", "/v1/chat/completions", body)
    assert reply.status == 200
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in reply.body.decode().splitlines()
        if line.startswith("data: {")
    )
    assert text == "Contact the lead at [REDACTED:EMAIL] for the Q3 numbers."


@pytest.mark.parametrize(
    "payload",
    [
        {"input": "My email is jane.doe@example.com"},
        {"input": [{"role": "user", "content": "write to jane.doe@example.com"}]},
        {
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "jane.doe@example.com"}],
                }
            ]
        },
        {"input": "hello", "instructions": "Sign as jane.doe@example.com"},
        {
            "input": [
                {"type": "function_call_output", "call_id": "c", "output": "jane.doe@example.com"}
            ]
        },
    ],
    ids=["string", "messages", "parts", "instructions", "function-output"],
)
def test_responses_prompts_are_checked_in_every_shape(gw: Gateway, payload: dict[str, Any]) -> None:
    reply = _post(gw, "blocking", "/v1/responses", {"model": "m", **payload})
    assert reply.status == 400, reply.body
    assert json.loads(reply.body)["error"]["code"] == "content_policy_violation"


def test_responses_answer_is_redacted_whole_and_streamed(gw: Gateway) -> None:
    reply = _post(gw, "redacting", "/v1/responses", {"model": "m", "input": "hi"})
    assert reply.status == 200
    output = json.loads(reply.body)["output"][0]["content"][0]["text"]
    assert output == "Contact the lead at [REDACTED:EMAIL] for the Q3 numbers."

    streamed = _post(
        gw, "redacting", "/v1/responses", {"model": "m", "input": "hi", "stream": True}
    )
    assert streamed.status == 200
    assert b"jane" not in streamed.body and b"example.com" not in streamed.body
    assert streamed.body.count(b"[REDACTED:EMAIL]") >= 4  # deltas, done, part, completed


def test_sdk_iterates_a_stopped_responses_stream(gw: Gateway) -> None:
    client = openai.OpenAI(
        base_url=f"{gw.url}/v1",
        api_key="x",
        max_retries=0,
        default_headers={
            "X-Tenant-ID": "redacting",
            "x-test-answer": "All about project falcon today.",
        },
    )
    events = list(client.responses.create(model="m", input="hi", stream=True))
    assert events[-1].type == "response.incomplete"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "falcon" not in text
    assert events[-1].response.incomplete_details is not None
    assert events[-1].response.incomplete_details.reason == "content_filter"


def test_gzip_answer_is_decoded_and_checked(gw: Gateway, backend: RealisticBackend) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    reply = _post(gw, "redacting", "/v1/chat/completions", body, **{"x-test-force-gzip": "1"})
    assert reply.status == 200
    assert "content-encoding" not in reply.headers
    answer = json.loads(reply.body)["choices"][0]["message"]["content"]
    assert answer == "Contact the lead at [REDACTED:EMAIL] for the Q3 numbers."
    # The gateway asked for an answer it can read.
    assert backend.received[-1].headers.get("accept-encoding") == "identity"


def test_gzip_request_is_decoded_then_checked(gw: Gateway, backend: RealisticBackend) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "mail jane.doe@example.com"}]}
    data = gzip.compress(json.dumps(body).encode())
    reply = request(
        f"{gw.url}/v1/chat/completions",
        data,
        {
            "X-Tenant-ID": "redacting",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
    )
    assert reply.status == 200, reply.body
    sent = json.loads(backend.received[-1].body)
    assert sent["messages"][0]["content"] == "mail [REDACTED:EMAIL]"
    assert "content-encoding" not in backend.received[-1].headers
    refused = request(
        f"{gw.url}/v1/chat/completions",
        b"\x00\x01",
        {"X-Tenant-ID": "redacting", "Content-Type": "application/json", "Content-Encoding": "br"},
    )
    assert refused.status == 415


def test_tool_call_arguments_in_an_answer_are_checked(gw: Gateway) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    args = json.dumps({"to": "jane.doe@example.com"})
    reply = _post(gw, "redacting", "/v1/chat/completions", body, **{"x-test-tool-args": args})
    call = json.loads(reply.body)["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"to": "[REDACTED:EMAIL]"}


def test_tool_call_arguments_in_a_prompt_are_checked(gw: Gateway) -> None:
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "f", "arguments": '{"to": "jane.doe@example.com"}'},
    }
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "sent"},
    ]
    reply = _post(gw, "blocking", "/v1/chat/completions", {"model": "m", "messages": messages})
    assert reply.status == 400


def test_unknown_endpoints_with_a_body_are_refused_for_guarded_tenants(gw: Gateway) -> None:
    reply = _post(gw, "blocking", "/v1/audio/speech", {"input": "jane.doe@example.com"})
    assert reply.status == 400
    assert json.loads(reply.body)["error"]["code"] == "unsupported_endpoint"
    # Bodiless requests pass; named pass-through paths pass; unguarded tenants pass.
    assert request(f"{gw.url}/v1/models", headers={"X-Tenant-ID": "blocking"}).status == 200
    assert _post(gw, "redacting", "/v1/files", {"purpose": "x"}).status == 200
    assert _post(gw, "open", "/v1/audio/speech", {"input": "x"}).status == 200


def test_a_lone_surrogate_is_no_server_error(gw: Gateway) -> None:
    text = b'"x\\ud800y jane.doe@example.com"'
    data = b'{"model": "m", "messages": [{"role": "user", "content": ' + text + b"}]}"
    reply = request(f"{gw.url}/v1/chat/completions", data, {"X-Tenant-ID": "blocking"})
    assert reply.status == 400
    assert json.loads(reply.body)["error"]["code"] == "content_policy_violation"


def test_the_gateways_own_placeholder_passes(gw: Gateway) -> None:
    messages = [
        {"role": "user", "content": "Please forward the invoice to [REDACTED:EMAIL] today."}
    ]
    reply = _post(gw, "blocking", "/v1/chat/completions", {"model": "m", "messages": messages})
    assert reply.status == 200, reply.body


def test_images_are_refused_unless_the_tenant_passes_them(gw: Gateway) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]
    body = {"model": "m", "messages": messages}
    refused = _post(gw, "blocking", "/v1/chat/completions", body)
    assert refused.status == 400
    assert json.loads(refused.body)["error"]["code"] == "unsupported_content"
    assert _post(gw, "media-ok", "/v1/chat/completions", body).status == 200


def test_a_backend_error_that_echoes_protected_text_is_withheld(gw: Gateway) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    echoed = _post(gw, "redacting", "/v1/chat/completions", body, **{"x-test-error-echo": "1"})
    assert echoed.status == 400
    assert b"jane.doe" not in echoed.body
    assert json.loads(echoed.body)["error"]["code"] == "upstream_error_withheld"
    # An error with nothing to hide passes as the backend wrote it.
    plain = {"x-test-error-echo": "1", "x-test-answer": "the model field is required"}
    passed = _post(gw, "redacting", "/v1/chat/completions", body, **plain)
    assert passed.status == 400
    assert b"the model field is required" in passed.body


def test_a_whole_answer_larger_than_the_gateway_checks_is_a_502(gw: Gateway) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    big = "All fine here. " * 400  # about 6 KB of answer: over max_response_bytes
    reply = _post(gw, "redacting", "/v1/chat/completions", body, **{"x-test-answer": big})
    assert reply.status == 502
    error = json.loads(reply.body)["error"]
    assert error["code"] == "response_too_large"
    assert "max_response_bytes" in error["message"]
    assert b"All fine here" not in reply.body
