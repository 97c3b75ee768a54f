"""SSE framing and the streamed-answer methods of the wire formats (pure functions), and the
official SDKs reading the endings CheckStream writes when it stops a stream."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkstream.formats import FORMATS, StreamTracker, WireFormat
from checkstream.formats.anthropic import FORMAT as ANTHROPIC
from checkstream.formats.openai import FORMAT as OPENAI
from checkstream.formats.sse import SseDecoder, SseEvent, encode_event, json_data, with_data
from checkstream.formats.texts import Usage

BOM = b"\xef\xbb\xbf"


def decode(chunks: Iterable[bytes]) -> list[SseEvent]:
    decoder = SseDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.finish()


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def fields(events: Iterable[SseEvent]) -> list[tuple[str | None, str | None]]:
    return [(event.event, event.data) for event in events]


def sse(data: Any, event: str | None = None, *, compact: bool = True) -> bytes:
    """An event as providers send it: LF line endings, JSON data."""
    separators = (",", ":") if compact else (", ", ": ")
    return encode_event(json.dumps(data, separators=separators, ensure_ascii=False), event)


def one(raw: bytes) -> SseEvent:
    [event] = decode([raw])
    return event


# --- SseDecoder ---------------------------------------------------------------------------


def test_lf_events() -> None:
    events = SseDecoder().feed(b"data: a\n\ndata: b\n\n")
    assert events == [SseEvent(b"data: a\n\n", None, "a"), SseEvent(b"data: b\n\n", None, "b")]


def test_crlf_events() -> None:
    events = SseDecoder().feed(b"event: x\r\ndata: a\r\n\r\ndata: b\r\n\r\n")
    assert events == [
        SseEvent(b"event: x\r\ndata: a\r\n\r\n", "x", "a"),
        SseEvent(b"data: b\r\n\r\n", None, "b"),
    ]


def test_cr_events_wait_for_the_byte_after_a_final_cr() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\r\rdata: b\r") == [SseEvent(b"data: a\r\r", None, "a")]
    # The blank line's CR might be the start of a CRLF: only the next byte tells.
    assert decoder.feed(b"\r") == []
    assert decoder.feed(b"data: c\r\n\r\n") == [
        SseEvent(b"data: b\r\r", None, "b"),
        SseEvent(b"data: c\r\n\r\n", None, "c"),
    ]
    assert decoder.feed(b"data: d\r\r") == []
    assert decoder.finish() == [SseEvent(b"data: d\r\r", None, "d")]


def test_mixed_line_endings() -> None:
    raw = b"event: e\rdata: 1\r\ndata: 2\n\r\n"
    assert decode([raw]) == [SseEvent(raw, "e", "1\n2")]


def test_comments_and_keep_alives_are_events_without_data() -> None:
    stream = b": keep-alive\n\n:\n\ndata: x\n: a comment inside an event\n\n\n"
    assert fields(decode([stream])) == [(None, None), (None, None), (None, "x"), (None, None)]
    assert b"".join(event.raw for event in decode([stream])) == stream


def test_event_field_without_data() -> None:
    assert one(b"event: ping\n\n") == SseEvent(b"event: ping\n\n", "ping", None)


def test_multi_line_data_and_field_syntax() -> None:
    raw = b"data: first\ndata\ndata:no-space\ndata:  two spaces\n\n"
    assert one(raw).data == "first\n\nno-space\n two spaces"


def test_other_fields_are_ignored_but_kept_in_raw() -> None:
    raw = b"id: 7\nretry: 1000\nfoo: bar\nevent: x\ndata: d\n\n"
    assert one(raw) == SseEvent(raw, "x", "d")


def test_the_last_event_field_wins() -> None:
    assert one(b"event: a\nevent: b\ndata: d\n\n").event == "b"


def test_event_split_mid_line() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"event: content_block_del") == []
    assert decoder.feed(b'ta\ndata: {"a"') == []
    assert decoder.feed(b":1}\n") == []
    assert decoder.feed(b"\ndata: next") == [
        SseEvent(b'event: content_block_delta\ndata: {"a":1}\n\n', "content_block_delta", '{"a":1}')
    ]


def test_event_split_inside_a_multibyte_character() -> None:
    raw = 'data: {"content":"日本🎉"}\n\n'.encode()
    emoji = raw.index("🎉".encode())
    decoder = SseDecoder()
    assert decoder.feed(raw[: emoji + 2]) == []
    assert decoder.feed(raw[emoji + 2 :]) == [SseEvent(raw, None, '{"content":"日本🎉"}')]


def test_every_split_of_an_event_gives_the_same_event() -> None:
    stream = "event: é\r\ndata: 🎉 x\r\n\r\ndata: 中\r\r".encode()
    expected = decode([stream])
    assert fields(expected) == [("é", "🎉 x"), (None, "中")]
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert decode([stream[:i], stream[i:j], stream[j:]]) == expected


def test_leading_bom_is_skipped_and_kept_in_raw() -> None:
    stream = BOM + b"data: a\n\ndata: b\n\n"
    events = decode([stream])
    assert events == [
        SseEvent(BOM + b"data: a\n\n", None, "a"),
        SseEvent(b"data: b\n\n", None, "b"),
    ]
    assert decode([stream[:1], stream[1:2], stream[2:]]) == events


def test_bom_before_a_blank_line() -> None:
    assert decode([BOM + b"\ndata: a\n\n"]) == [
        SseEvent(BOM + b"\n", None, None),
        SseEvent(b"data: a\n\n", None, "a"),
    ]


def test_only_the_first_bom_is_skipped() -> None:
    assert one(BOM + BOM + b"data: a\n\n").data is None  # the field is "\ufeffdata"


def test_finish_returns_an_unterminated_tail() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\ndata: c") == [SseEvent(b"data: a\n\n", None, "a")]
    assert decoder.finish() == [SseEvent(b"data: b\ndata: c", None, "b\nc")]
    assert decoder.finish() == []


def test_finish_keeps_a_cut_multibyte_character() -> None:
    decoder = SseDecoder()
    decoder.feed("data: 🎉".encode()[:-1])
    [event] = decoder.finish()
    assert event.raw == "data: 🎉".encode()[:-1]
    assert event.data == "\ufffd"


def test_finish_of_a_bom_prefix() -> None:
    decoder = SseDecoder()
    assert decoder.feed(BOM[:2]) == []
    assert decoder.finish() == [SseEvent(BOM[:2], None, None)]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert one(b"data: \xff\n\n").data == "\ufffd"


def test_a_long_line_is_kept_until_its_event_ends() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: ") == []
    for _ in range(1000):
        assert decoder.feed(b"A" * 100) == []
    [event] = decoder.feed(b"\n\n")
    assert event.data == "A" * 100_000


def test_encode_event() -> None:
    assert encode_event('{"a":1}') == b'data: {"a":1}\n\n'
    assert encode_event("x\ny", "e") == b"event: e\ndata: x\ndata: y\n\n"
    assert encode_event("") == b"data: \n\n"
    with pytest.raises(ValueError):
        encode_event("x", "a\n\ndata: injected")


def test_with_data_keeps_other_lines_and_line_endings() -> None:
    event = one(b"event: x\r\nid: 3\r\ndata: a\r\n: note\r\ndata: b\r\n\r\n")
    assert with_data(event, "new") == SseEvent(
        b"event: x\r\nid: 3\r\ndata: new\r\n: note\r\n\r\n", "x", "new"
    )
    first = decode([BOM + b"data: a\n\n"])[0]
    assert with_data(first, "b") == SseEvent(BOM + b"data: b\n\n", None, "b")
    with pytest.raises(ValueError):
        with_data(one(b": comment\n\n"), "x")


# --- property tests -----------------------------------------------------------------------

# Realistic answer text: ASCII, accents, CJK, emoji (some with ZWJ and variation selectors),
# and the characters JSON must escape or that look like SSE framing.
TEXT_PIECES = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6),
        st.sampled_from(
            [
                "Hello",
                " world",
                "café",
                "日本語",
                "中文",
                "한국어",
                "🎉",
                "👩‍💻",
                "❤️",
                "\n\n",
                "\r\n",
                "data: x",
                ": y",
                '"',
                "\\",
            ]
        ),
    ),
    min_size=1,
    max_size=8,
)
LINE_ENDINGS = st.sampled_from(["\n", "\r\n", "\r", "mixed"])


@st.composite
def openai_stream(draw: st.DrawFn) -> list[tuple[str | None, str]]:
    """(event name, data) of a chat completions stream, as OpenAI sends it."""
    head = {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_eb9dce56a8",
    }
    include_usage = draw(st.booleans())
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    ascii_only = draw(st.booleans())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return json.dumps({**head, "choices": [choice], **extra}, ensure_ascii=ascii_only)

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": piece}) for piece in draw(TEXT_PIECES)]
    if draw(st.booleans()):
        call = {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
        events.append(chunk({"tool_calls": [call]}))
    events.append(chunk({}, "stop"))
    if include_usage:
        usage = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
        events.append(json.dumps({**head, "choices": [], "usage": usage}))
    events.append("[DONE]")
    return [(None, data) for data in events]


@st.composite
def anthropic_stream(draw: st.DrawFn) -> list[tuple[str | None, str]]:
    """(event name, data) of a Messages stream, as Anthropic sends it."""
    compact = draw(st.booleans())

    def event(data: dict[str, Any]) -> tuple[str, str]:
        separators = (",", ":") if compact else (", ", ": ")
        return data["type"], json.dumps(data, separators=separators, ensure_ascii=False)

    message = {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-sonnet-4-5",
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 472, "output_tokens": 2},
    }
    events = [event({"type": "message_start", "message": message})]
    events.append(
        event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        )
    )
    events.append(event({"type": "ping"}))
    for piece in draw(TEXT_PIECES):
        delta = {"type": "text_delta", "text": piece}
        events.append(event({"type": "content_block_delta", "index": 0, "delta": delta}))
    events.append(event({"type": "content_block_stop", "index": 0}))
    if draw(st.booleans()):
        block = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}
        events.append(event({"type": "content_block_start", "index": 1, "content_block": block}))
        for part in ['{"location": ', '"San Francisco, CA"}']:
            delta = {"type": "input_json_delta", "partial_json": part}
            events.append(event({"type": "content_block_delta", "index": 1, "delta": delta}))
        events.append(event({"type": "content_block_stop", "index": 1}))
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    events.append(event({**delta, "usage": {"output_tokens": 15}}))
    events.append(event({"type": "message_stop"}))
    return [(name, data) for name, data in events]


@st.composite
def wire(
    draw: st.DrawFn, stream: st.SearchStrategy[list[tuple[str | None, str]]]
) -> tuple[bytes, list[tuple[str | None, str | None]]]:
    """A stream's bytes, with comments, line endings and maybe a BOM or an unterminated
    last event; and the (event, data) of every event in it."""
    style = draw(LINE_ENDINGS)

    def eol() -> str:
        return draw(st.sampled_from(["\n", "\r\n", "\r"])) if style == "mixed" else style

    def blank() -> str:
        """A line's end and a blank line: a CR then a lone LF would be one CRLF."""
        first, second = eol(), eol()
        return first + ("\r\n" if first == "\r" and second == "\n" else second)

    expected: list[tuple[str | None, str | None]] = []
    text = ""
    for name, data in draw(stream):
        if draw(st.integers(0, 5)) == 0:
            text += ": keep-alive" + blank()
            expected.append((None, None))
        if name is not None:
            text += f"event: {name}" + eol()
        if draw(st.integers(0, 5)) == 0:
            text += ": comment" + eol()
        text += f"data: {data}" + blank()
        expected.append((name, data))
    if draw(st.booleans()):
        # Cut the stream short inside its last blank line or last line.
        text = text[: -draw(st.integers(1, 3))]
    bom = BOM if draw(st.integers(0, 4)) == 0 else b""
    return bom + text.encode(), expected


STREAMS = st.one_of(wire(openai_stream()), wire(anthropic_stream()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STREAMS, st.data())
def test_any_split_decodes_to_the_same_events(
    stream: tuple[bytes, list[tuple[str | None, str | None]]], data: st.DataObject
) -> None:
    raw, expected = stream
    whole = decode([raw])
    assert b"".join(event.raw for event in whole) == raw
    got = fields(whole)
    assert got[:-1] == expected[:-1]
    # The stream may have been cut inside the last event's data line.
    (name, last), (expected_name, expected_last) = got[-1], expected[-1]
    assert name == expected_name and last is not None and expected_last is not None
    assert expected_last.startswith(last)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20), label="cuts")
    assert decode(split(raw, cuts)) == whole


@settings(deadline=None)  # a shared CI machine can be slow; the property is what counts
@given(STREAMS)
def test_byte_by_byte_decodes_to_the_same_events(
    stream: tuple[bytes, list[tuple[str | None, str | None]]],
) -> None:
    raw, _ = stream
    assert decode(raw[i : i + 1] for i in range(len(raw))) == decode([raw])


@given(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",))),
    st.none()
    | st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\r\n")),
)
def test_encode_event_round_trips(data: str, event: str | None) -> None:
    raw = encode_event(data, event)
    decoder = SseDecoder()
    normalized = data.replace("\r\n", "\n").replace("\r", "\n")
    assert decoder.feed(raw) == [SseEvent(raw, event, normalized)]
    assert decoder.finish() == []


# --- OpenAI stream events -----------------------------------------------------------------

CHUNK_HEAD: dict[str, Any] = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1694268190,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_44709d6fcb",
}


def chat_chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return sse({**CHUNK_HEAD, "choices": [choice]})


COMPLETION_HEAD: dict[str, Any] = {
    "id": "cmpl-7iA7iJjj8V2zOkCGvWF2hAkDWBQZe",
    "object": "text_completion",
    "created": 1690759702,
    "model": "gpt-3.5-turbo-instruct",
    "system_fingerprint": "fp_44709d6fcb",
}


def completion_chunk(text: str, finish: str | None = None) -> bytes:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return sse({**COMPLETION_HEAD, "choices": [choice]})


USAGE_CHUNK = sse(
    {
        **CHUNK_HEAD,
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
    }
)
ROLE_CHUNK = chat_chunk({"role": "assistant", "content": "", "refusal": None})
TOOL_CALL_START = chat_chunk(
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "index": 0,
                "id": "call_abc123",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ],
    }
)
TOOL_CALL_ARGUMENTS = chat_chunk(
    {"tool_calls": [{"index": 0, "function": {"arguments": '{"content": "Paris"'}}]}
)
OPENAI_NON_TEXT = [
    ROLE_CHUNK,
    TOOL_CALL_START,
    chat_chunk({"refusal": "I can't help with that."}),
    chat_chunk({}, "stop"),
    USAGE_CHUNK,
    b"data: [DONE]\n\n",
    b": keep-alive\n\n",
    chat_chunk({"content": "choice one"}, index=1),
    sse({"error": {"message": "overloaded", "type": "server_error"}}),
]


def test_openai_delta_text() -> None:
    assert OPENAI.delta_text(one(chat_chunk({"content": "Hello 🎉"}))) == "Hello 🎉"
    assert OPENAI.delta_text(one(completion_chunk("This"))) == "This"
    spaced = sse(
        {**CHUNK_HEAD, "choices": [{"index": 0, "delta": {"content": "a"}}]}, compact=False
    )
    assert OPENAI.delta_text(one(spaced)) == "a"
    crlf = chat_chunk({"content": "x"}).replace(b"\n", b"\r\n")
    assert OPENAI.delta_text(one(crlf)) == "x"


@pytest.mark.parametrize("raw", OPENAI_NON_TEXT)
def test_openai_events_without_text(raw: bytes) -> None:
    assert OPENAI.delta_text(one(raw)) is None


def test_openai_tool_call_arguments_are_a_channel_of_their_own() -> None:
    delta = OPENAI.stream_delta(one(TOOL_CALL_ARGUMENTS))
    assert delta is not None and delta.channel == ("tool", 0)
    assert delta.text == '{"content": "Paris"'
    rewritten = OPENAI.with_delta_text(one(TOOL_CALL_ARGUMENTS), '{"content": "[REDACTED:X]"')
    assert OPENAI.delta_text(rewritten) == '{"content": "[REDACTED:X]"'
    content = OPENAI.stream_delta(one(chat_chunk({"content": "hi"})))
    assert content is not None and content.channel == "content"


def test_openai_choice_zero_is_found_among_several() -> None:
    choices = [
        {"index": 1, "delta": {"content": "other"}, "logprobs": None, "finish_reason": None},
        {"index": 0, "delta": {"content": "zero"}, "logprobs": None, "finish_reason": None},
    ]
    assert OPENAI.delta_text(one(sse({**CHUNK_HEAD, "choices": choices}))) == "zero"


def test_openai_with_delta_text() -> None:
    logprobs = {"content": [{"token": "bob", "logprob": -0.1, "bytes": [98, 111, 98]}]}
    choice = {"index": 0, "delta": {"content": "bob@x.io"}, "logprobs": logprobs}
    event = one(
        encode_event(json.dumps({**CHUNK_HEAD, "choices": [choice]}), None).replace(b"\n", b"\r\n")
    )
    new = OPENAI.with_delta_text(event, "[REDACTED:EMAIL]")
    assert OPENAI.delta_text(new) == "[REDACTED:EMAIL]"
    assert new.raw.endswith(b"}\r\n\r\n") and b" " not in new.raw.removeprefix(b"data: ")
    assert json_data(new) == {
        **CHUNK_HEAD,
        "choices": [{"index": 0, "delta": {"content": "[REDACTED:EMAIL]"}, "logprobs": None}],
    }
    legacy = OPENAI.with_delta_text(one(completion_chunk("bob")), "日本")
    assert OPENAI.delta_text(legacy) == "日本"
    assert "日本".encode() in legacy.raw  # compact UTF-8, not \u escapes
    # OpenAI-compatible servers may leave logprobs out; none is added then.
    bare = sse({"id": "c", "choices": [{"index": 0, "delta": {"content": "bob"}}]})
    assert json_data(OPENAI.with_delta_text(one(bare), "x")) == {
        "id": "c",
        "choices": [{"index": 0, "delta": {"content": "x"}}],
    }
    with pytest.raises(ValueError):
        OPENAI.with_delta_text(one(ROLE_CHUNK), "x")


def test_openai_usage() -> None:
    assert OPENAI.usage(one(USAGE_CHUNK)) == Usage(9, 12)
    assert OPENAI.without_usage(one(USAGE_CHUNK)) is None
    with_null_usage = sse({**CHUNK_HEAD, "choices": [], "usage": None})
    for raw in [chat_chunk({"content": "x"}), with_null_usage, b"data: [DONE]\n\n"]:
        assert OPENAI.usage(one(raw)) is None
        assert OPENAI.without_usage(one(raw)) == one(raw)
    # Some servers report usage on every chunk, or on the last content chunk: the content
    # stays, only the usage goes.
    choice = {"index": 0, "delta": {"content": "x"}, "finish_reason": None}
    every = sse({**CHUNK_HEAD, "choices": [choice], "usage": {"prompt_tokens": 3}})
    assert OPENAI.usage(one(every)) == Usage(3, None)
    kept = OPENAI.without_usage(one(every))
    assert kept is not None and json_data(kept) == {**CHUNK_HEAD, "choices": [choice]}
    assert OPENAI.delta_text(kept) == "x"


USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}


@pytest.mark.parametrize(
    "choices",
    [
        [],
        [{"index": 0, "delta": {}}],  # LiteLLM
        [{"index": 0, "delta": {}, "finish_reason": None, "logprobs": None}],
        [{"index": 0, "delta": {"content": None}, "finish_reason": None}],
        [{"index": 0, "text": ""}],  # legacy completions
    ],
)
def test_openai_usage_only_chunks_in_every_shape_are_dropped(choices: list[object]) -> None:
    event = one(sse({**CHUNK_HEAD, "choices": choices, "usage": USAGE}))
    assert OPENAI.usage(event) == Usage(9, 12)
    assert OPENAI.without_usage(event) is None


@pytest.mark.parametrize(
    "choice",
    [
        {"index": 0, "delta": {"content": "end."}, "finish_reason": "stop"},
        {"index": 0, "delta": {}, "finish_reason": "stop"},  # the finish reason is content
        {"index": 0, "delta": {"role": "assistant"}},
        {"index": 0, "text": "end."},
    ],
)
def test_openai_usage_on_a_content_chunk_keeps_the_content(choice: dict[str, object]) -> None:
    event = one(sse({**CHUNK_HEAD, "choices": [choice], "usage": USAGE}))
    kept = OPENAI.without_usage(event)
    assert kept is not None
    assert json_data(kept) == {**CHUNK_HEAD, "choices": [choice]}


def test_openai_ensure_stream_usage() -> None:
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert OPENAI.ensure_stream_usage(chat) == {**chat, "stream_options": {"include_usage": True}}
    assert "stream_options" not in chat  # the caller's payload is untouched
    completion = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say", "stream": True}
    assert OPENAI.ensure_stream_usage(completion) == {
        **completion,
        "stream_options": {"include_usage": True},
    }
    other_option = {**chat, "stream_options": {"include_obfuscation": False}}
    assert OPENAI.ensure_stream_usage(other_option) == {
        **chat,
        "stream_options": {"include_obfuscation": False, "include_usage": True},
    }
    declined = {**chat, "stream_options": {"include_usage": False}}
    assert OPENAI.ensure_stream_usage(declined) == {
        **chat,
        "stream_options": {"include_usage": True},
    }
    null_options = {**chat, "stream_options": None}
    assert OPENAI.ensure_stream_usage(null_options) == {
        **chat,
        "stream_options": {"include_usage": True},
    }
    unchanged = [
        {**chat, "stream_options": {"include_usage": True}},
        {**chat, "stream": False},
        {k: v for k, v in chat.items() if k != "stream"},
        {"model": "gpt-4o", "input": "hi", "stream": True},  # Responses API
        {"model": "text-embedding-3-small", "input": "hi"},
        {**chat, "stream_options": "bad"},
        None,
        [],
    ]
    for payload in unchanged:
        assert OPENAI.ensure_stream_usage(payload) is None


def test_openai_ending() -> None:
    tracker = OPENAI.stream_tracker()
    for raw in [ROLE_CHUNK, chat_chunk({"content": "Hi"})]:
        tracker.observe(one(raw))
    first, done = decode([tracker.ending("pii", "stopped by policy rule 'pii'")])
    assert done.data == "[DONE]"
    assert json_data(first) == {
        **CHUNK_HEAD,
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}],
        "checkstream": {"action": "stop", "rule": "pii", "reason": "stopped by policy rule 'pii'"},
    }


def test_openai_ending_of_a_completions_stream() -> None:
    tracker = OPENAI.stream_tracker()
    tracker.observe(one(completion_chunk("This")))
    first, _ = decode([tracker.ending("r", "why")])
    assert json_data(first) == {
        **COMPLETION_HEAD,
        "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "content_filter"}],
        "checkstream": {"action": "stop", "rule": "r", "reason": "why"},
    }


def test_openai_ending_skips_azure_prompt_filter_chunk() -> None:
    tracker = OPENAI.stream_tracker()
    azure = {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": [],
    }
    tracker.observe(one(sse(azure)))
    tracker.observe(one(ROLE_CHUNK))
    chunk = json_data(decode([tracker.ending("r", "why")])[0])
    assert (chunk["id"], chunk["model"]) == (CHUNK_HEAD["id"], CHUNK_HEAD["model"])


def test_openai_ending_before_any_chunk() -> None:
    chunk = json_data(decode([OPENAI.stream_tracker().ending("r", "why")])[0])
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0]["finish_reason"] == "content_filter"


# --- Anthropic stream events --------------------------------------------------------------

MESSAGE: dict[str, Any] = {
    "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
    "type": "message",
    "role": "assistant",
    "content": [],
    "model": "claude-opus-4-20250514",
    "stop_reason": None,
    "stop_sequence": None,
    "usage": {"input_tokens": 25, "output_tokens": 1},
}
MESSAGE_START = sse({"type": "message_start", "message": MESSAGE}, "message_start", compact=False)


def block_start(index: int, block: dict[str, Any]) -> bytes:
    data = {"type": "content_block_start", "index": index, "content_block": block}
    return sse(data, "content_block_start", compact=False)


def block_delta(index: int, delta: dict[str, Any]) -> bytes:
    data = {"type": "content_block_delta", "index": index, "delta": delta}
    return sse(data, "content_block_delta", compact=False)


def text_delta(text: str, index: int = 0) -> bytes:
    return block_delta(index, {"type": "text_delta", "text": text})


def block_stop(index: int) -> bytes:
    return sse({"type": "content_block_stop", "index": index}, "content_block_stop")


TEXT_START = block_start(0, {"type": "text", "text": ""})
TOOL_START = block_start(
    1,
    {
        "type": "tool_use",
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "name": "get_weather",
        "input": {},
    },
)
TOOL_DELTA = block_delta(1, {"type": "input_json_delta", "partial_json": '{"text_delta": "San Fra'})
MESSAGE_DELTA = sse(
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
    "message_delta",
    compact=False,
)
ANTHROPIC_NON_TEXT = [
    MESSAGE_START,
    TEXT_START,
    sse({"type": "ping"}, "ping"),
    TOOL_START,
    block_delta(2, {"type": "thinking_delta", "thinking": "Let me think"}),
    block_delta(2, {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA"}),
    block_stop(0),
    MESSAGE_DELTA,
    sse({"type": "message_stop"}, "message_stop"),
    sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error"),
    b": keep-alive\n\n",
]


def test_anthropic_tool_input_is_a_channel_of_its_own() -> None:
    delta = ANTHROPIC.stream_delta(one(TOOL_DELTA))
    assert delta is not None and (delta.channel, delta.text) == (1, '{"text_delta": "San Fra')
    rewritten = ANTHROPIC.with_delta_text(one(TOOL_DELTA), '{"text_delta": "[X]')
    assert ANTHROPIC.delta_text(rewritten) == '{"text_delta": "[X]'


def test_anthropic_delta_text() -> None:
    assert ANTHROPIC.delta_text(one(text_delta("Hello 日本"))) == "Hello 日本"
    compact = sse(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}
    )
    assert ANTHROPIC.delta_text(one(compact)) == "x"


@pytest.mark.parametrize("raw", ANTHROPIC_NON_TEXT)
def test_anthropic_events_without_text(raw: bytes) -> None:
    assert ANTHROPIC.delta_text(one(raw)) is None


def test_anthropic_with_delta_text() -> None:
    event = one(text_delta("call 555-0100").replace(b"\n", b"\r"))
    new = ANTHROPIC.with_delta_text(event, "call [REDACTED:PHONE] 🎉")
    assert new.event == "content_block_delta"
    assert new.raw.startswith(b"event: content_block_delta\rdata: {") and new.raw.endswith(b"}\r\r")
    assert ANTHROPIC.delta_text(new) == "call [REDACTED:PHONE] 🎉"
    assert json_data(new) == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "call [REDACTED:PHONE] 🎉"},
    }
    with pytest.raises(ValueError):
        ANTHROPIC.with_delta_text(one(MESSAGE_DELTA), "x")


def test_anthropic_usage() -> None:
    # message_start's output_tokens (1) is a placeholder, not a count.
    assert ANTHROPIC.usage(one(MESSAGE_START)) == Usage(25, None)
    assert ANTHROPIC.usage(one(MESSAGE_DELTA)) == Usage(None, 15)
    cached = {
        "input_tokens": 50,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 2000,
        "output_tokens": 503,
    }
    final = sse(
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": cached},
        "message_delta",
    )
    assert ANTHROPIC.usage(one(final)) == Usage(3050, 503)
    for raw in [text_delta("usage"), TEXT_START, sse({"type": "ping"}, "ping")]:
        assert ANTHROPIC.usage(one(raw)) is None
    assert ANTHROPIC.without_usage(one(MESSAGE_DELTA)) == one(MESSAGE_DELTA)
    assert ANTHROPIC.ensure_stream_usage({"model": "m", "messages": [], "stream": True}) is None


def anthropic_ending_events(tracker: StreamTracker) -> list[tuple[str | None, Any]]:
    return [(event.event, json_data(event)) for event in decode([tracker.ending("r", "why")])]


def test_anthropic_ending_closes_open_blocks() -> None:
    tracker = ANTHROPIC.stream_tracker()
    for raw in [MESSAGE_START, TEXT_START, text_delta("Hi"), block_stop(0), TOOL_START, TOOL_DELTA]:
        tracker.observe(one(raw))
    assert anthropic_ending_events(tracker) == [
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "refusal", "stop_sequence": None},
                "usage": {"output_tokens": 1},
                "checkstream": {"action": "stop", "rule": "r", "reason": "why"},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def test_anthropic_ending_before_message_start() -> None:
    names = [name for name, _ in anthropic_ending_events(ANTHROPIC.stream_tracker())]
    assert names == ["message_start", "message_delta", "message_stop"]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_malformed_events_never_raise(name: str) -> None:
    fmt: WireFormat = FORMATS[name]
    tracker = fmt.stream_tracker()
    for raw in [
        b"data: {\n\n",
        b'data: "content" "text_delta" "usage" "prompt_tokens"\n\n',
        b'data: {"choices": [1, {"index": 0, "delta": 5, "text": 3}], "usage": 7}\n\n',
        b'data: {"choices": {"content": 1}, "prompt_tokens": 1}\n\n',
        b'event: message_start\ndata: {"type": "message_start", "message": 3, "usage": 1}\n\n',
        b'event: content_block_start\ndata: {"index": "0"}\n\n',
        b'event: message_delta\ndata: {"usage": {"output_tokens": "x"}}\n\n',
        b'data: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": 1}}\n\n',
        b"event: message_delta\n\n",
    ]:
        event = one(raw)
        assert fmt.delta_text(event) is None
        fmt.usage(event)
        fmt.without_usage(event)
        tracker.observe(event)
    decode([tracker.ending("r", "why")])


# --- the official SDKs read the endings -----------------------------------------------------


@asynccontextmanager
async def serving(body: bytes) -> AsyncIterator[str]:
    """A server on 127.0.0.1 that answers every request with the SSE stream ``body``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def stopped(fmt: WireFormat, prefix: list[bytes]) -> tuple[bytes, str]:
    """The prefix and its ending, as CheckStream sends a stream it stops; and its answer
    text (tool-call arguments left out)."""
    tracker = fmt.stream_tracker()
    texts = []
    for event in decode([b"".join(prefix)]):
        tracker.observe(event)
        delta = fmt.stream_delta(event)
        if delta is not None and delta.channel in ("content", 0):
            texts.append(delta.text)
    return b"".join(prefix) + tracker.ending("pii", "stopped by policy rule 'pii'"), "".join(texts)


def openai_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


def anthropic_client(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)


CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
MESSAGES: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 64, **CHAT}
CHAT_PREFIX = [ROLE_CHUNK, chat_chunk({"content": "Hello"}), chat_chunk({"content": " wörld 🎉"})]


async def test_openai_sdk_reads_a_stopped_chat_stream() -> None:
    body, text = stopped(OPENAI, CHAT_PREFIX)
    assert text == "Hello wörld 🎉"
    async with serving(body) as url, openai_client(url) as client:
        stream = await client.chat.completions.create(**CHAT, stream=True)
        chunks = [chunk async for chunk in stream]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == text
    last = chunks[-1]
    assert last.choices[0].finish_reason == "content_filter"
    assert last.id == CHUNK_HEAD["id"]
    assert last.model_extra is not None and last.model_extra["checkstream"]["rule"] == "pii"


async def test_openai_sdk_stream_helper_reports_a_content_filter() -> None:
    """The ``stream()`` helper raises at the end, as for OpenAI's own content filter."""
    body, text = stopped(OPENAI, CHAT_PREFIX)
    async with (
        serving(body) as url,
        openai_client(url) as client,
        client.chat.completions.stream(**CHAT) as stream,
    ):
        deltas = [event.delta async for event in stream if event.type == "content.delta"]
        with pytest.raises(openai.ContentFilterFinishReasonError):
            await stream.get_final_completion()
    assert "".join(deltas) == text


async def test_openai_sdk_reads_a_stopped_completions_stream() -> None:
    body, text = stopped(OPENAI, [completion_chunk("This"), completion_chunk(" is")])
    async with serving(body) as url, openai_client(url) as client:
        stream = await client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="Say", stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(chunk.choices[0].text for chunk in chunks) == text == "This is"
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert chunks[-1].object == "text_completion"


async def test_openai_sdk_reads_a_stream_stopped_before_any_chunk() -> None:
    body, _ = stopped(OPENAI, [])
    async with serving(body) as url, openai_client(url) as client:
        stream = await client.chat.completions.create(**CHAT, stream=True)
        chunks = [chunk async for chunk in stream]
    assert [chunk.choices[0].finish_reason for chunk in chunks] == ["content_filter"]


ANTHROPIC_PREFIX = [
    MESSAGE_START,
    TEXT_START,
    sse({"type": "ping"}, "ping"),
    text_delta("Hello"),
    text_delta(" wörld 🎉"),
]


@pytest.mark.parametrize(
    "prefix",
    [
        ANTHROPIC_PREFIX,
        [*ANTHROPIC_PREFIX, block_stop(0)],
        [*ANTHROPIC_PREFIX, block_stop(0), TOOL_START, TOOL_DELTA],
    ],
    ids=["open-text-block", "closed-block", "open-tool-block"],
)
async def test_anthropic_sdk_reads_a_stopped_stream(prefix: list[bytes]) -> None:
    body, text = stopped(ANTHROPIC, prefix)
    assert text == "Hello wörld 🎉"
    async with (
        serving(body) as url,
        anthropic_client(url) as client,
        client.messages.stream(**MESSAGES) as stream,
    ):
        streamed = "".join([piece async for piece in stream.text_stream])
        message = await stream.get_final_message()
    assert streamed == text
    assert message.stop_reason == "refusal"
    assert message.content[0].type == "text" and message.content[0].text == text
    assert message.usage.input_tokens == 25


async def test_anthropic_sdk_raw_events_of_a_stopped_stream() -> None:
    body, _ = stopped(ANTHROPIC, ANTHROPIC_PREFIX)
    async with serving(body) as url, anthropic_client(url) as client:
        stream = await client.messages.create(**MESSAGES, stream=True)
        events = [event async for event in stream]
    delta = next(event for event in events if event.type == "message_delta")
    assert delta.delta.stop_reason == "refusal"
    assert delta.model_extra is not None and delta.model_extra["checkstream"]["rule"] == "pii"
    assert events[-1].type == "message_stop"


async def test_anthropic_sdk_reads_a_stream_stopped_before_message_start() -> None:
    body, _ = stopped(ANTHROPIC, [])
    async with (
        serving(body) as url,
        anthropic_client(url) as client,
        client.messages.stream(**MESSAGES) as stream,
    ):
        message = await stream.get_final_message()
    assert message.stop_reason == "refusal"
    assert message.content == []
