"""Malformed client JSON is a 400 in the tenant's format (extproc/formats/jsonbody.py), and
absurd backend JSON is never an exception (SSE events, whole answers)."""

from __future__ import annotations

import json
import time

import pytest

from checkstream.formats import FORMATS
from checkstream.formats.jsonbody import (
    MAX_DEPTH,
    MAX_INT_DIGITS,
    RequestJsonError,
    nesting_depth,
    parse_request_json,
)
from checkstream.formats.sse import SseDecoder, encode_event, json_data
from checkstream.gateway.runtime import Runtime
from checkstream.types import Span
from tests.test_exchange import _gated_exchange, body, immediate, runtime

__all__ = ["runtime"]  # the fixture, shared with test_exchange

DEEP = b"[" * 5000 + b"]" * 5000


def test_deep_nesting_is_refused_with_a_clear_message() -> None:
    with pytest.raises(RequestJsonError) as caught:
        parse_request_json(b'{"model": "m", "x": ' + DEEP + b"}")
    assert str(caught.value) == (
        f"request body nests 5001 levels deep; at most {MAX_DEPTH} are accepted"
    )
    assert caught.value.code == "invalid_request"


def test_nesting_at_the_limit_is_accepted() -> None:
    value = b"[" * (MAX_DEPTH - 1) + b"1" + b"]" * (MAX_DEPTH - 1)
    assert nesting_depth(b'{"a": ' + value + b"}") == MAX_DEPTH
    assert parse_request_json(b'{"a": ' + value + b"}")["a"][0][0]


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"content": "[" * 5000, "more": ['{"["]', '\\"[[']}).encode()
    assert nesting_depth(text) == 2
    assert parse_request_json(text)["content"] == "[" * 5000


def test_many_shallow_arrays_are_fine_and_cheap() -> None:
    wide = b"[" + b",".join([b"[1]"] * 300_000) + b"]"
    started = time.perf_counter()
    assert nesting_depth(wide) == 2
    # Not a timing goal: a guard that the scan is vectorised, with a 20x margin.
    assert time.perf_counter() - started < 1.0


def test_huge_integers_are_refused_with_a_clear_message() -> None:
    with pytest.raises(RequestJsonError, match="integer of 5000 digits; at most 100"):
        parse_request_json(b'{"max_tokens": ' + b"9" * 5000 + b"}")
    with pytest.raises(RequestJsonError, match="integer of 101 digits"):
        parse_request_json(b'{"seed": -' + b"1" * (MAX_INT_DIGITS + 1) + b"}")
    assert parse_request_json(b'{"seed": ' + b"1" * MAX_INT_DIGITS + b"}")["seed"] > 0


def test_non_json_constants_and_syntax_are_refused() -> None:
    with pytest.raises(RequestJsonError, match="NaN") as caught:
        parse_request_json(b'{"temperature": NaN}')
    assert caught.value.code == "invalid_request"
    with pytest.raises(RequestJsonError, match="not valid JSON") as caught:
        parse_request_json(b'{"model": ')
    assert caught.value.code == "invalid_json"
    with pytest.raises(RequestJsonError, match="not UTF-8"):
        parse_request_json(b'{"a": "\xff"}')


async def test_exchange_answers_400_invalid_request_in_openai_format(runtime: Runtime) -> None:
    for payload in (b'{"model": "gpt-4o", "x": ' + DEEP + b"}", b'{"n": ' + b"7" * 5000 + b"}"):
        exchange = await _gated_exchange(runtime)
        status, _, error = immediate(await exchange.on_request_body(body(payload)))
        assert status == 400
        assert error["error"]["code"] == "invalid_request"
        assert error["error"]["type"] == "invalid_request_error"
        assert "at most" in error["error"]["message"]


async def test_exchange_answers_400_invalid_request_in_anthropic_format(
    runtime: Runtime,
) -> None:
    exchange = await _gated_exchange(runtime, "claude")
    status, _, error = immediate(await exchange.on_request_body(body(b'{"m": ' + DEEP + b"}")))
    assert status == 400
    assert (error["type"], error["error"]["code"]) == ("error", "invalid_request")


@pytest.mark.parametrize("name", ["openai", "anthropic"])
def test_absurd_backend_events_never_raise(name: str) -> None:
    fmt = FORMATS[name]
    decoder = SseDecoder()
    deep = "[" * 100_000 + "]" * 100_000
    stream = (
        f"data: {deep}\n\n"
        f'data: {{"choices": [{{"delta": {{"content": {deep}}}}}]}}\n\n'
        f'event: content_block_delta\ndata: {{"delta": {deep}}}\n\n'
        f'data: {{"usage": {{"prompt_tokens": {"9" * 5000}}}}}\n\n'
    ).encode()
    events = decoder.feed(stream) + decoder.finish()
    assert len(events) == 4
    tracker = fmt.stream_tracker()
    for event in events:
        assert json_data(event) is None
        assert fmt.delta_text(event) is None
        assert fmt.usage(event) is None
        assert fmt.without_usage(event) is event
        assert fmt.ends_stream(event) is False
        tracker.observe(event)
    assert tracker.ending("r", "why")


@pytest.mark.parametrize("name", ["openai", "anthropic"])
def test_lone_surrogates_survive_redaction_blocking_and_stream_endings(name: str) -> None:
    fmt = FORMATS[name]
    payload = json.loads(
        '{"model": "m\\ud800", "system": "s\\udc00",'
        ' "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    )
    slots = fmt.prompt_texts(payload)
    redacted = fmt.redact_request(payload, slots, [(Span(0, 2, "X"),)] * len(slots))
    assert json.loads(redacted)["messages"][0]["content"] == "[REDACTED:X] \ud800 there"
    assert json.loads(fmt.blocked_answer(payload, "no \ud800", "rule"))
    tracker = fmt.stream_tracker()
    first = (
        '{"id": "x\\ud800", "model": "m\\ud800", "choices": [{"index": 0, "delta": {}}]}'
        if name == "openai"
        else '{"type": "message_start", "message": {"id": "x\\ud800", "model": "m\\ud800"}}'
    )
    decoder = SseDecoder()
    kind = None if name == "openai" else "message_start"
    for event in decoder.feed(encode_event(first, kind)):
        tracker.observe(event)
    ending = tracker.ending("rule", "why")
    if name == "openai":  # its final chunk repeats the stream's id and model
        assert b"\\ud800" in ending
    ending.decode("utf-8")  # valid UTF-8 on the wire


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ({"model": "gpt-4o-mini", "messages": [{"role": ["user"], "content": "hi"}]}, "role"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": 7}]}, "content"),
        ({"model": "gpt-4o-mini", "messages": "hello"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": ["hello"]}, "messages[0]"),
        ({"model": "gpt-4o-mini", "prompt": {"text": "x"}}, "prompt"),
        ([1, 2, 3], "object"),
    ],
)
async def test_known_fields_of_the_wrong_type_are_a_400_naming_them(
    runtime: Runtime, payload: object, named: str
) -> None:
    exchange = await _gated_exchange(runtime)
    answer = await exchange.on_request_body(body(json.dumps(payload).encode()))
    status, _, error = immediate(answer)
    assert status == 400
    assert error["error"]["code"] == "invalid_request"
    assert named in error["error"]["message"]


def test_each_endpoint_names_the_field_it_cannot_read() -> None:
    from checkstream.formats.endpoints import find_endpoint

    cases = {
        "/v1/messages": {"messages": [{"role": "user", "content": 1}], "system": "ok"},
        "/v1/responses": {"input": 3},
        "/v1/embeddings": {"input": {"a": 1}},
    }
    for path, payload in cases.items():
        endpoint = find_endpoint(path)
        assert endpoint is not None
        assert endpoint.fmt.request_problem(payload) is not None, path
        assert endpoint.fmt.request_problem({"model": "m"}) is None, path
