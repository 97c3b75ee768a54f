"""checkstream.accounting.metering: what is read from answers that pass through unguarded, and the
format
methods it relies on (``answer_usage``, ``max_answer_tokens``).

Streams are built as the providers send them and cut at every byte boundary and at random
places, since Envoy hands extproc whatever its reads of the upstream give.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from checkstream.accounting import metering
from checkstream.accounting.metering import (
    MAX_METERED_BODY,
    BodyMeter,
    StreamMeter,
    estimate_tokens,
    merge_usage,
)
from checkstream.formats import WireFormat
from checkstream.formats.anthropic import FORMAT as ANTHROPIC
from checkstream.formats.openai import FORMAT as OPENAI
from checkstream.formats.texts import Usage

# Multi-byte characters (2, 3 and 4 bytes in UTF-8), so that cuts fall inside characters and
# chars (code points) differ from bytes.
PIECES = ["Grüße", ", ", "世界", " 🌍🌍", " and", " done."]
ANSWER_CHARS = sum(len(p) for p in PIECES)


@dataclass(frozen=True)
class Stream:
    """A provider's stream and what a meter must find in it."""

    fmt: WireFormat
    data: bytes
    #: The bytes the client gets when CheckStream asked for the usage chunk itself.
    without_usage_chunk: bytes
    #: Offsets where events end in ``without_usage_chunk``.
    kept_boundaries: frozenset[int]
    usage: Usage
    #: Characters the model wrote: the answer, and tool-call arguments (output tokens too).
    answer_chars: int = ANSWER_CHARS


def _assemble(events: Sequence[tuple[bytes, bool]]) -> tuple[bytes, bytes, frozenset[int]]:
    """The stream, the stream without its usage-only events, and where the latter's end."""
    data = b"".join(raw for raw, _ in events)
    kept = [raw for raw, usage_only in events if not usage_only]
    return data, b"".join(kept), frozenset(itertools.accumulate(len(raw) for raw in kept))


def _event(data: Any, eol: bytes, name: str | None = None) -> bytes:
    lines = [] if name is None else [b"event: " + name.encode()]
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    lines.append(b"data: " + text.encode())
    return eol.join(lines) + eol + eol


def openai_stream(eol: bytes = b"\n") -> Stream:
    """A chat completions stream with ``stream_options.include_usage``: every chunk carries
    ``"usage": null``, the usage chunk has no choices, then ``[DONE]``."""
    head = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _event({**head, "choices": [choice], "usage": None}, eol)

    usage = {"prompt_tokens": 17, "completion_tokens": 23, "total_tokens": 40}
    events = [
        (chunk({"role": "assistant", "content": ""}), False),
        *((chunk({"content": p}), False) for p in PIECES[:3]),
        (b": keep-alive" + eol + eol, False),
        *((chunk({"content": p}), False) for p in PIECES[3:]),
        (chunk({}, "stop"), False),
        (_event({**head, "choices": [], "usage": usage}, eol), True),
        (_event("[DONE]", eol), False),
    ]
    data, kept, ends = _assemble(events)
    return Stream(OPENAI, data, kept, ends, Usage(17, 23))


def anthropic_stream(eol: bytes = b"\n") -> Stream:
    """A Messages stream: input tokens (with both cache counts) in ``message_start``, the
    output count in ``message_delta``; a tool call's JSON counts as written text."""

    def event(kind: str, data: dict[str, Any]) -> bytes:
        return _event({"type": kind, **data}, eol, kind)

    start_usage = {
        "input_tokens": 25,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 7,
        "output_tokens": 1,
    }
    message: dict[str, Any] = {
        "id": "msg_9",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-haiku",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    text_block = {"type": "text", "text": ""}
    tool_block = {"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {}}
    events = [
        event("message_start", {"message": message}),
        event("content_block_start", {"index": 0, "content_block": text_block}),
        event("ping", {}),
        *(
            event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}})
            for p in PIECES
        ),
        event("content_block_stop", {"index": 0}),
        event("content_block_start", {"index": 1, "content_block": tool_block}),
        event(
            "content_block_delta",
            {"index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"q": "text"}'}},
        ),
        event("content_block_stop", {"index": 1}),
        event(
            "message_delta",
            {
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 31},
            },
        ),
        event("message_stop", {}),
    ]
    data, kept, ends = _assemble([(raw, False) for raw in events])
    return Stream(ANTHROPIC, data, kept, ends, Usage(25 + 100 + 7, 31), ANSWER_CHARS + 13)


STREAMS = {
    "openai": openai_stream(),
    "openai-crlf": openai_stream(b"\r\n"),
    "anthropic": anthropic_stream(),
    "anthropic-crlf": anthropic_stream(b"\r\n"),
}


def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def random_cuts(rng: random.Random, size: int) -> list[int]:
    return rng.sample(range(1, size), rng.randint(1, 25))


def meter_through(
    stream: Stream, chunks: Sequence[bytes], *, drop: bool
) -> tuple[StreamMeter, list[bytes], bytes]:
    meter = StreamMeter(stream.fmt, drop_usage_chunk=drop)
    outs = [meter.feed(chunk) for chunk in chunks]
    return meter, outs, meter.finish()


# --- StreamMeter ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_pass_through_is_byte_identical_chunk_by_chunk_at_every_cut(name: str) -> None:
    stream = STREAMS[name]
    for cut in range(len(stream.data) + 1):
        chunks = pieces(stream.data, [cut])
        meter, outs, tail = meter_through(stream, chunks, drop=False)
        # Each chunk goes on as it came, when it came: nothing held back, nothing added.
        assert outs == chunks, cut
        assert tail == b""
        assert meter.usage == stream.usage, cut
        assert meter.answer_chars == stream.answer_chars, cut


@pytest.mark.parametrize("name", STREAMS)
def test_pass_through_is_byte_identical_at_random_cuts_and_byte_by_byte(name: str) -> None:
    stream = STREAMS[name]
    rng = random.Random(f"pass-{name}")
    splits = [random_cuts(rng, len(stream.data)) for _ in range(300)]
    splits.append(list(range(1, len(stream.data))))  # one byte per chunk
    for cuts in splits:
        chunks = pieces(stream.data, cuts)
        meter, outs, tail = meter_through(stream, chunks, drop=False)
        assert outs == chunks
        assert tail == b""
        assert (meter.usage, meter.answer_chars) == (stream.usage, stream.answer_chars)


@pytest.mark.parametrize("name", STREAMS)
def test_dropping_removes_only_the_usage_chunk_at_every_cut(name: str) -> None:
    stream = STREAMS[name]
    rng = random.Random(f"drop-{name}")
    splits = [[cut] for cut in range(len(stream.data) + 1)]
    splits += [random_cuts(rng, len(stream.data)) for _ in range(300)]
    splits.append(list(range(1, len(stream.data))))
    for cuts in splits:
        meter, outs, tail = meter_through(stream, pieces(stream.data, cuts), drop=True)
        assert b"".join(outs) + tail == stream.without_usage_chunk, cuts
        # Whole events only: what the client has so far always ends where an event ends.
        sent = 0
        for out in outs:
            sent += len(out)
            assert sent == 0 or sent in stream.kept_boundaries, cuts
        # The usage is read even though the chunk that carried it is gone.
        assert (meter.usage, meter.answer_chars) == (stream.usage, stream.answer_chars)


def test_the_streams_really_have_a_usage_chunk_to_drop() -> None:
    # Guards the tests above: the OpenAI streams differ once dropped, Anthropic ones do not.
    for name, stream in STREAMS.items():
        assert (stream.without_usage_chunk != stream.data) == name.startswith("openai")


def test_usage_on_chunks_with_choices_is_read_and_only_the_usage_removed() -> None:
    # vLLM with continuous usage stats: every chunk reports usage next to its choice. The
    # client did not ask for usage, so it loses the usage field and keeps every choice.
    def chunk(text: str, completion: int | None) -> bytes:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        body: dict[str, object] = {"id": "c", "choices": [choice]}
        if completion is not None:
            body["usage"] = {"prompt_tokens": 5, "completion_tokens": completion}
        return _event(body, b"\n")

    data = chunk("ab", 1) + chunk("cde", 2) + b"data: [DONE]\n\n"
    meter = StreamMeter(OPENAI, drop_usage_chunk=True)
    out = meter.feed(data) + meter.finish()
    assert [json.loads(line[6:]) for line in out.split(b"\n\n")[:2]] == [
        json.loads(chunk(text, None)[6:]) for text in ("ab", "cde")
    ]
    assert out.endswith(b"data: [DONE]\n\n")
    assert (meter.usage, meter.answer_chars) == (Usage(5, 2), 5)
    # A client that asked for usage gets the stream byte for byte.
    asked = StreamMeter(OPENAI, drop_usage_chunk=False)
    assert asked.feed(data) + asked.finish() == data


def test_a_stream_without_usage_leaves_usage_none_and_counts_chars() -> None:
    stream = STREAMS["openai"]
    data = stream.without_usage_chunk
    meter = StreamMeter(OPENAI, drop_usage_chunk=True)
    assert meter.feed(data[:100]) + meter.feed(data[100:]) + meter.finish() == data
    assert (meter.usage, meter.answer_chars) == (None, ANSWER_CHARS)


def test_an_unterminated_last_event_is_released_by_finish_when_dropping() -> None:
    data = b'data: {"choices":[{"index":0,"delta":{"content":"hey"}}]}'
    meter = StreamMeter(OPENAI, drop_usage_chunk=True)
    assert meter.feed(data) == b""  # no blank line yet: the event may still grow
    assert meter.finish() == data
    assert meter.answer_chars == 3


def test_anthropic_usage_merges_message_start_and_message_delta() -> None:
    stream = STREAMS["anthropic"]
    end_of_start = min(stream.kept_boundaries)
    meter = StreamMeter(ANTHROPIC, drop_usage_chunk=False)
    meter.feed(stream.data[:end_of_start])
    # message_start's output count is a placeholder, unknown until message_delta; its input
    # count (cache included) stays.
    assert meter.usage == Usage(132, None)
    meter.feed(stream.data[end_of_start:])
    assert meter.usage == Usage(132, 31)


def test_merge_usage_later_fields_supersede_earlier_ones() -> None:
    assert merge_usage(None, Usage(3, None)) == Usage(3, None)
    assert merge_usage(Usage(3, 1), Usage(None, 9)) == Usage(3, 9)
    assert merge_usage(Usage(3, 1), Usage(4, None)) == Usage(4, 1)
    assert merge_usage(Usage(3, 1), Usage(None, None)) == Usage(3, 1)


@pytest.mark.parametrize(
    ("chars", "tokens"), [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (4001, 1001)]
)
def test_estimate_tokens_is_chars_over_four_rounded_up(chars: int, tokens: int) -> None:
    assert estimate_tokens(chars) == tokens


# --- BodyMeter -----------------------------------------------------------------------------

OPENAI_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Grüße 🌍"},
            "finish_reason": "stop",
        },
        {"index": 1, "message": {"role": "assistant", "content": "世界"}, "finish_reason": "stop"},
        # A tool call has no content: its JSON arguments are written text all the same.
        {
            "index": 2,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}],
            },
            "finish_reason": "tool_calls",
        },
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
}
ANTHROPIC_ANSWER = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-3-5-haiku",
    "content": [
        {"type": "text", "text": "Grüße 🌍"},
        {"type": "tool_use", "id": "tu", "name": "lookup", "input": {"q": "not text"}},
        {"type": "text", "text": "世界"},
    ],
    "stop_reason": "end_turn",
    "usage": {
        "input_tokens": 25,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 7,
        "output_tokens": 40,
    },
}
ANSWERS: dict[str, tuple[WireFormat, bytes, Usage, int]] = {
    "openai": (OPENAI, json.dumps(OPENAI_ANSWER).encode(), Usage(12, 30), 9 + 8),
    "anthropic": (ANTHROPIC, json.dumps(ANTHROPIC_ANSWER).encode(), Usage(132, 40), 9 + 8),
}


@pytest.mark.parametrize("name", ANSWERS)
def test_body_meter_reads_usage_and_chars_across_chunks(name: str) -> None:
    fmt, data, usage, chars = ANSWERS[name]
    for cut in range(0, len(data) + 1, 7):
        meter = BodyMeter(fmt)
        for chunk in pieces(data, [cut, cut // 2]):
            meter.feed(chunk)
        assert meter.result() == (usage, chars), cut


@pytest.mark.parametrize("name", ANSWERS)
def test_body_meter_answer_without_usage(name: str) -> None:
    fmt, data, _, chars = ANSWERS[name]
    payload = json.loads(data)
    del payload["usage"]
    meter = BodyMeter(fmt)
    meter.feed(json.dumps(payload).encode())
    assert meter.result() == (None, chars)


@pytest.mark.parametrize("fmt", [OPENAI, ANTHROPIC], ids=["openai", "anthropic"])
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b'{"usage": {"prompt_tokens": 1',  # cut short
        b"<html>502 Bad Gateway</html>",
        b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "x": "\xff"}',  # not UTF-8
    ],
)
def test_body_meter_unreadable_body_is_none_and_zero(fmt: WireFormat, data: bytes) -> None:
    meter = BodyMeter(fmt)
    meter.feed(data)
    assert meter.result() == (None, 0)


@pytest.mark.parametrize("fmt", [OPENAI, ANTHROPIC], ids=["openai", "anthropic"])
def test_body_meter_non_object_json_is_none_and_zero(fmt: WireFormat) -> None:
    meter = BodyMeter(fmt)
    meter.feed(b"[1, 2, 3]")
    assert meter.result() == (None, 0)


def _padded(data: bytes, size: int) -> bytes:
    """``data`` (a JSON object) grown to ``size`` bytes with whitespace, still valid JSON."""
    assert data.endswith(b"}")
    return data[:-1] + b" " * (size - len(data)) + b"}"


@pytest.mark.parametrize("name", ANSWERS)
def test_body_meter_reads_an_answer_of_exactly_the_cap(name: str) -> None:
    fmt, data, usage, chars = ANSWERS[name]
    big = _padded(data, MAX_METERED_BODY)
    meter = BodyMeter(fmt)
    meter.feed(big[:1000])
    meter.feed(big[1000:])
    assert not meter.overflow
    assert meter.result() == (usage, chars)


@pytest.mark.parametrize("name", ANSWERS)
def test_body_meter_overflow_is_none_and_zero_and_frees_the_body(name: str) -> None:
    fmt, data, _, _ = ANSWERS[name]
    big = _padded(data, MAX_METERED_BODY + 1)
    meter = BodyMeter(fmt)
    meter.feed(big[:1000])
    meter.feed(big[1000:])
    assert meter.overflow
    assert len(meter.body) == 0
    meter.feed(b"}")  # later chunks are ignored, not kept
    assert len(meter.body) == 0
    assert meter.result() == (None, 0)


def test_body_meter_overflow_follows_the_module_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    fmt, data, usage, chars = ANSWERS["openai"]
    monkeypatch.setattr(metering, "MAX_METERED_BODY", len(data))
    meter = BodyMeter(fmt)
    meter.feed(data)
    assert meter.result() == (usage, chars)
    meter = BodyMeter(fmt)
    meter.feed(data + b" ")
    assert meter.result() == (None, 0)


# --- answer_usage and max_answer_tokens ------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "usage"),
    [
        ({"usage": {"prompt_tokens": 12, "completion_tokens": 30}}, Usage(12, 30)),
        ({"usage": {"prompt_tokens": 0, "completion_tokens": 0}}, Usage(0, 0)),
        # Cached prompt tokens are already part of prompt_tokens.
        (
            {
                "usage": {
                    "prompt_tokens": 1200,
                    "completion_tokens": 5,
                    "prompt_tokens_details": {"cached_tokens": 1024},
                }
            },
            Usage(1200, 5),
        ),
        ({"usage": {"prompt_tokens": 12}}, Usage(12, None)),
        ({"usage": {"prompt_tokens": True, "completion_tokens": 3}}, Usage(None, 3)),
        ({"usage": {"prompt_tokens": 12.0, "completion_tokens": "3"}}, Usage(None, None)),
        ({"usage": None}, None),
        ({"usage": [12, 30]}, None),
        ({}, None),
        ([], None),
        ("usage", None),
        (None, None),
    ],
)
def test_openai_answer_usage(payload: Any, usage: Usage | None) -> None:
    assert OPENAI.answer_usage(payload) == usage


@pytest.mark.parametrize(
    ("payload", "usage"),
    [
        ({"usage": {"input_tokens": 25, "output_tokens": 40}}, Usage(25, 40)),
        (
            {
                "usage": {
                    "input_tokens": 25,
                    "cache_creation_input_tokens": 100,
                    "cache_read_input_tokens": 7,
                    "output_tokens": 40,
                }
            },
            Usage(132, 40),
        ),
        # Null or non-integer cache counts add nothing.
        (
            {
                "usage": {
                    "input_tokens": 25,
                    "cache_creation_input_tokens": None,
                    "cache_read_input_tokens": False,
                    "output_tokens": 40,
                }
            },
            Usage(25, 40),
        ),
        # Without the uncached count the total is unknown.
        ({"usage": {"cache_read_input_tokens": 7, "output_tokens": 40}}, Usage(None, 40)),
        ({"usage": {"input_tokens": True, "output_tokens": False}}, Usage(None, None)),
        ({"usage": None}, None),
        ({}, None),
        ([{"usage": {}}], None),
    ],
)
def test_anthropic_answer_usage(payload: Any, usage: Usage | None) -> None:
    assert ANTHROPIC.answer_usage(payload) == usage


@pytest.mark.parametrize(
    ("payload", "tokens"),
    [
        ({"max_completion_tokens": 50, "max_tokens": 300}, 50),
        ({"max_tokens": 300, "max_completion_tokens": 50}, 50),
        ({"max_tokens": 300}, 300),
        ({"max_completion_tokens": 50}, 50),
        ({"max_completion_tokens": None, "max_tokens": 300}, 300),
        # A bool is not a count (True == 1 in Python): it is skipped, not read as 1.
        ({"max_completion_tokens": True, "max_tokens": 300}, 300),
        ({"max_completion_tokens": True, "max_tokens": False}, None),
        ({"max_completion_tokens": 50.0, "max_tokens": "300"}, None),
        ({"max_tokens": 0}, 0),
        ({}, None),
        ([], None),
        (None, None),
    ],
)
def test_openai_max_answer_tokens(payload: Any, tokens: int | None) -> None:
    assert OPENAI.max_answer_tokens(payload) == tokens


@pytest.mark.parametrize(
    ("payload", "tokens"),
    [
        ({"max_tokens": 1024}, 1024),
        # Not an Anthropic parameter: ignored.
        ({"max_completion_tokens": 50}, None),
        ({"max_completion_tokens": 50, "max_tokens": 700}, 700),
        ({"max_tokens": True}, None),
        ({"max_tokens": 1024.0}, None),
        ({}, None),
        ("max_tokens", None),
    ],
)
def test_anthropic_max_answer_tokens(payload: Any, tokens: int | None) -> None:
    assert ANTHROPIC.max_answer_tokens(payload) == tokens
