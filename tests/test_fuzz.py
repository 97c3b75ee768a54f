"""Fuzzing the parsers that read untrusted input: the SSE decoder, both formats' request,
answer and stream-event readers, client JSON bodies, and the config and policy loaders.

Each raises nothing but its documented error type (formats: nothing at all; loaders:
``ConfigError``; client JSON: ``RequestJsonError``). Bounded, so the file runs in seconds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkstream.config.model import load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.formats import FORMATS as PROVIDERS
from checkstream.formats import responses
from checkstream.formats.jsonbody import RequestJsonError, parse_request_json
from checkstream.formats.sse import SseDecoder, SseEvent, encode_event
from checkstream.policy.files import load_policy_file
from checkstream.types import Span

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORK = Path(tempfile.mkdtemp(prefix="checkstream-fuzz-"))

# Lone surrogates too: "\ud800" is a valid JSON escape that no UTF-8 encoder accepts.
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
surrogates = st.sampled_from(["\ud800", "a\udfff b", "\udbff\udfff"])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text | surrogates
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# Values of the keys the formats read, of the right type or any other.
FIELD_NAMES = [
    "model", "messages", "role", "content", "type", "text", "system", "tools", "function",
    "description", "tool_calls", "arguments", "choices", "delta", "message", "usage",
    "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "max_tokens",
    "max_completion_tokens", "stream", "stream_options", "input", "prompt", "source",
    "data", "index", "content_block", "finish_reason", "stop_reason", "image_url", "name",
]  # fmt: skip
shaped = st.recursive(
    scalars | st.sampled_from(["user", "assistant", "system", "tool", "text", "image"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=5)
    ),
    max_leaves=25,
)
# Requests and answers of the right outline with anything in their fields.
messages = st.lists(
    st.dictionaries(st.sampled_from(["role", "content", "type", "text", "name"]), shaped),
    max_size=3,
)
choices = st.lists(
    st.fixed_dictionaries(
        {"message": st.dictionaries(st.sampled_from(["role", "content"]), shaped)}
    ),
    max_size=2,
)
outlined = st.fixed_dictionaries(
    {"model": shaped, "messages": messages},
    optional={"system": shaped, "choices": choices, "content": messages},
)
payloads = shaped | json_values | outlined


# Every endpoint format: the providers' and the Responses API's.
FORMATS = {**PROVIDERS, "responses": responses.FORMAT}


@FAST
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
def test_sse_decoder_keeps_every_byte_however_split(data: bytes, cuts: list[int]) -> None:
    whole = SseDecoder()
    expected = whole.feed(data) + whole.finish()
    assert b"".join(e.raw for e in expected) == data
    decoder = SseDecoder()
    events: list[SseEvent] = []
    start = 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        events += decoder.feed(data[start:cut])
        start = cut
    events += decoder.feed(data[start:]) + decoder.finish()
    assert events == expected


sse_text = st.text(alphabet=st.sampled_from(list('data:event :\r\n{}[]",0a\ufeff')), max_size=80)


@FAST
@given(st.sampled_from(sorted(FORMATS)), st.lists(payloads | sse_text, min_size=1, max_size=5))
def test_stream_event_readers_never_raise(name: str, datas: list[Any]) -> None:
    fmt = FORMATS[name]
    raw = b"".join(
        d.encode("utf-8", "surrogatepass") if isinstance(d, str) else encode_event(json.dumps(d))
        for d in datas
    )
    decoder = SseDecoder()
    tracker = fmt.stream_tracker()
    for event in decoder.feed(raw) + decoder.finish():
        text = fmt.delta_text(event)
        if text is not None:
            fmt.with_delta_text(event, text.upper())
        fmt.usage(event)
        fmt.without_usage(event)
        fmt.ends_stream(event)
        fmt.stream_delta(event)
        fmt.rewrite_repeats(event, {("text", 0, 0): "x", 0: "x", "content": "x"})
        tracker.observe(event)
    assert isinstance(tracker.ending("rule", "reason"), bytes)


@FAST
@given(st.sampled_from(sorted(FORMATS)), payloads)
def test_request_and_answer_readers_never_raise(name: str, payload: Any) -> None:
    fmt = FORMATS[name]
    slots = fmt.prompt_texts(payload)
    assert all(isinstance(slot.text, str) for slot in slots)
    fmt.redact_request(payload, slots, [(Span(0, 1, "X"),)] * len(slots))
    fmt.max_answer_tokens(payload)
    fmt.ensure_stream_usage(payload)
    answers = fmt.answer_texts(payload)
    fmt.redact_answer(payload, answers, [(Span(0, 1, "X"),)] * len(answers))
    fmt.answer_usage(payload)
    fmt.blocked_answer(payload, "blocked", "rule")


@FAST
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_client_json_is_parsed_or_refused_with_request_json_error(data: bytes) -> None:
    try:
        parse_request_json(data)
    except RequestJsonError as exc:
        assert str(exc)


@FAST
@given(st.integers(1, 400), st.sampled_from(["[", '{"a":']))
def test_client_json_nesting_is_refused_past_the_limit(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    data = (opener * depth + "1" + closer * depth).encode()
    try:
        parse_request_json(data)
    except RequestJsonError as exc:
        assert depth > 128 and "levels deep" in str(exc)
    else:
        assert depth <= 128


yaml_text = st.lists(
    st.sampled_from(
        [*"ab: -[]{}&*!|>'\"#\n\t\\0\x00\u00e9", "!!float", "!!timestamp", "!!int", "<<", "1e9"]
    ),
    max_size=60,
).map("".join)
config_like = st.fixed_dictionaries(
    {
        "tenants": st.fixed_dictionaries(
            {"configs": st.dictionaries(st.text(max_size=6), shaped, max_size=2)}
        )
    }
).map(lambda d: yaml.safe_dump(d))


@FAST
@given(yaml_text | config_like)
def test_config_loader_raises_only_config_error(text: str) -> None:
    path = WORK / "checkstream.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path, require_secrets=False)
    except ConfigError as exc:
        assert all(p.file == str(path) or p.file.startswith(str(WORK)) for p in exc.problems)


@FAST
@given(yaml_text | shaped.map(lambda d: yaml.safe_dump({"version": "1.0", "policies": d})))
def test_policy_loader_raises_only_config_error(text: str) -> None:
    path = WORK / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_policy_file(path)
    except ConfigError as exc:
        assert exc.problems
