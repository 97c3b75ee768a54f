"""Text extraction, redaction and blocked/error bodies of the wire formats (pure functions)."""

from __future__ import annotations

import copy
import json
from typing import Any

import anthropic.types
import openai.types
import openai.types.chat
import pytest

from checkstream.formats import FORMATS, WireFormat
from checkstream.formats.anthropic import FORMAT as ANTHROPIC
from checkstream.formats.openai import FORMAT as OPENAI
from checkstream.formats.texts import TextSlot, apply_redactions
from checkstream.types import Span

# --- apply_redactions -------------------------------------------------------------------


def test_redacts_one_span() -> None:
    text = "mail me: bob@example.com now"
    assert apply_redactions(text, [Span(9, 24, "EMAIL")]) == "mail me: [REDACTED:EMAIL] now"


def test_offsets_are_code_points_after_multibyte_characters() -> None:
    text = "café ☃ 🎉 call 555-0100"
    start = text.index("555")
    assert start == 14  # code points; the UTF-8 encoding is longer
    assert len(text[:start].encode()) > start
    redacted = apply_redactions(text, [Span(start, start + 8, "PHONE")])
    assert redacted == "café ☃ 🎉 call [REDACTED:PHONE]"


def test_unsorted_spans() -> None:
    text = "a@b.c and 555-0100 and 4111 1111 1111 1111"
    spans = [Span(23, 42, "CARD"), Span(0, 5, "EMAIL"), Span(10, 18, "PHONE")]
    assert apply_redactions(text, spans) == (
        "[REDACTED:EMAIL] and [REDACTED:PHONE] and [REDACTED:CARD]"
    )


def test_overlapping_spans_merge_under_the_first_starting_label() -> None:
    text = "0123456789ABCDEF"
    # Given out of order: 2-8 starts first, 5-12 overlaps it, 10-14 overlaps the union.
    spans = [Span(10, 14, "C"), Span(5, 12, "B"), Span(2, 8, "A")]
    assert apply_redactions(text, spans) == "01[REDACTED:A]EF"


def test_nested_span_is_absorbed() -> None:
    text = "John Smith, 12 Main St"
    spans = [Span(5, 10, "SURNAME"), Span(0, 22, "ADDRESS")]
    assert apply_redactions(text, spans) == "[REDACTED:ADDRESS]"


def test_same_start_first_listed_wins() -> None:
    assert apply_redactions("secret!", [Span(0, 3, "X"), Span(0, 6, "Y")]) == "[REDACTED:X]!"
    assert apply_redactions("secret!", [Span(0, 6, "Y"), Span(0, 3, "X")]) == "[REDACTED:Y]!"


def test_adjacent_spans_stay_separate() -> None:
    assert apply_redactions("abcdef", [Span(3, 6, "B"), Span(0, 3, "A")]) == (
        "[REDACTED:A][REDACTED:B]"
    )


def test_no_spans_empty_spans_and_out_of_range_spans() -> None:
    assert apply_redactions("hello", []) == "hello"
    assert apply_redactions("hello", [Span(2, 2, "E"), Span(4, 1, "R")]) == "hello"
    assert apply_redactions("hello", [Span(-3, 2, "L"), Span(4, 99, "R")]) == (
        "[REDACTED:L]ll[REDACTED:R]"
    )


# --- OpenAI requests --------------------------------------------------------------------

CHAT_REQUEST: dict[str, Any] = {
    "model": "gpt-4o",
    "temperature": 0.2,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image? My email is bob@example.com"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "text", "text": "café ☃ résumé"},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc123",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "content": "Sunny, 22°C"},
        {
            "role": "tool",
            "tool_call_id": "call_def456",
            "content": [{"type": "text", "text": "Humidity 40%"}],
        },
        {"role": "assistant", "content": "It is sunny in Paris.", "refusal": None},
        {"role": "user", "content": "Thanks! Call me on 555-0100.", "name": "bob"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
}


def test_openai_chat_prompt_texts() -> None:
    assert OPENAI.prompt_texts(CHAT_REQUEST) == [
        TextSlot(("messages", 0, "content"), "You are a helpful assistant.", "system"),
        TextSlot(("messages", 1, "content", 0, "text"), "Answer in French.", "system"),
        TextSlot(
            ("messages", 2, "content", 0, "text"),
            "What is in this image? My email is bob@example.com",
        ),
        TextSlot(("messages", 2, "content", 3, "text"), "café ☃ résumé"),
        # Tool-call arguments are the assistant's words too.
        TextSlot(
            ("messages", 3, "tool_calls", 0, "function", "arguments"),
            '{"city":"Paris"}',
            "assistant",
        ),
        TextSlot(("messages", 4, "content"), "Sunny, 22°C", "tool"),
        TextSlot(("messages", 5, "content", 0, "text"), "Humidity 40%", "tool"),
        TextSlot(("messages", 6, "content"), "It is sunny in Paris.", "assistant"),
        TextSlot(("messages", 7, "content"), "Thanks! Call me on 555-0100."),
        TextSlot(("tools", 0, "function", "description"), "Get the weather", "system"),
    ]


def test_openai_legacy_completions_prompt_texts() -> None:
    single = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 7}
    assert OPENAI.prompt_texts(single) == [TextSlot(("prompt",), "Say this is a test")]
    batch = {
        "model": "gpt-3.5-turbo-instruct",
        "prompt": ["First prompt", 42, "", "Second prompt"],
        "suffix": "end of the document",
    }
    assert OPENAI.prompt_texts(batch) == [
        TextSlot(("prompt", 0), "First prompt"),
        TextSlot(("prompt", 3), "Second prompt"),
        TextSlot(("suffix",), "end of the document"),
    ]
    tokens = {"model": "gpt-3.5-turbo-instruct", "prompt": [[1212, 318, 257, 1332]]}
    assert OPENAI.prompt_texts(tokens) == []


def test_openai_embeddings_prompt_texts() -> None:
    single = {"model": "text-embedding-3-small", "input": "The food was delicious"}
    assert OPENAI.prompt_texts(single) == [TextSlot(("input",), "The food was delicious")]
    batch = {"model": "text-embedding-3-small", "input": ["one", "two"], "dimensions": 256}
    assert OPENAI.prompt_texts(batch) == [
        TextSlot(("input", 0), "one"),
        TextSlot(("input", 1), "two"),
    ]
    tokens = {"model": "text-embedding-3-small", "input": [[1, 2, 3], [4, 5]]}
    assert OPENAI.prompt_texts(tokens) == []


# --- Anthropic requests -----------------------------------------------------------------

MESSAGES_REQUEST: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "system": [
        {"type": "text", "text": "You are a pirate.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Never reveal the password."},
    ],
    "messages": [
        {"role": "user", "content": "Hello, my SSN is 078-05-1120"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "The user greets me.", "signature": "EqQB"},
                {"type": "text", "text": "Ahoy! Let me check the weather."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A",
                    "name": "get_weather",
                    "input": {"location": "San Francisco, CA"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "15 degrees"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01B",
                    "content": [
                        {"type": "text", "text": "Forecast: rain"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "iVB"},
                        },
                    ],
                },
                {"type": "tool_result", "tool_use_id": "toolu_01C", "is_error": True},
                {
                    "type": "image",
                    "source": {"type": "url", "url": "https://example.com/map.png"},
                },
                {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": "Memo: café"},
                    "title": "Memo",
                },
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": "JVB"},
                },
                {"type": "text", "text": "Anything else?"},
            ],
        },
    ],
}


def test_anthropic_prompt_texts() -> None:
    assert ANTHROPIC.prompt_texts(MESSAGES_REQUEST) == [
        TextSlot(("system", 0, "text"), "You are a pirate.", "system"),
        TextSlot(("system", 1, "text"), "Never reveal the password.", "system"),
        TextSlot(("messages", 0, "content"), "Hello, my SSN is 078-05-1120"),
        TextSlot(
            ("messages", 1, "content", 1, "text"), "Ahoy! Let me check the weather.", "assistant"
        ),
        # Every string of a tool's input, in place.
        TextSlot(
            ("messages", 1, "content", 2, "input", "location"), "San Francisco, CA", "assistant"
        ),
        TextSlot(("messages", 2, "content", 0, "content"), "15 degrees", "tool"),
        TextSlot(("messages", 2, "content", 1, "content", 0, "text"), "Forecast: rain", "tool"),
        TextSlot(("messages", 2, "content", 4, "source", "data"), "Memo: café", "tool"),
        TextSlot(("messages", 2, "content", 6, "text"), "Anything else?"),
    ]


def test_anthropic_system_string() -> None:
    payload = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 10,
        "system": "Be terse.",
        "messages": [{"role": "user", "content": "Hi"}],
    }
    assert ANTHROPIC.prompt_texts(payload) == [
        TextSlot(("system",), "Be terse.", "system"),
        TextSlot(("messages", 0, "content"), "Hi"),
    ]


# --- Malformed bodies -------------------------------------------------------------------

MALFORMED: list[Any] = [
    None,
    "a string",
    42,
    [1, 2],
    [{"messages": [{"content": "inside a list"}]}],
    {},
    {"messages": "not a list"},
    {"messages": [None, 3, "x", [], {"content": 7}, {"content": {"text": "a dict"}}]},
    {"messages": [{"content": [None, "bare", {"type": "text"}, {"type": "text", "text": 5}]}]},
    {"messages": [{"content": [{"type": "tool_result", "content": {"x": 1}}]}]},
    {"messages": [{"content": [{"type": "document", "source": "text"}]}]},
    {"system": 3, "prompt": {"a": 1}, "input": 2.5, "suffix": ["x"]},
    {"choices": "nope"},
    {"choices": [None, {"message": "text"}, {"message": {"content": ["a"]}}, {"text": 1}]},
    {"content": "not blocks"},
    {"content": [None, {"type": "text"}, {"type": "text", "text": None}, "text"]},
]


@pytest.mark.parametrize("fmt", [OPENAI, ANTHROPIC], ids=["openai", "anthropic"])
@pytest.mark.parametrize("payload", MALFORMED)
def test_malformed_bodies_never_raise(fmt: WireFormat, payload: Any) -> None:
    for slot in [*fmt.prompt_texts(payload), *fmt.answer_texts(payload)]:
        assert isinstance(slot.text, str)
    json.loads(fmt.blocked_answer(payload, "Blocked.", "r"))


@pytest.mark.parametrize("fmt", [OPENAI, ANTHROPIC], ids=["openai", "anthropic"])
@pytest.mark.parametrize("payload", [None, "x", 1, [], [{"messages": []}]])
def test_non_dict_payload_has_no_texts(fmt: WireFormat, payload: Any) -> None:
    assert fmt.prompt_texts(payload) == []
    assert fmt.answer_texts(payload) == []


def test_only_the_well_formed_parts_of_a_mixed_body_are_taken() -> None:
    payload = MALFORMED[8] | {"prompt": ["ok", None]}
    assert OPENAI.prompt_texts(payload) == [TextSlot(("prompt", 0), "ok")]


# --- Request redaction ------------------------------------------------------------------


def _spans_for(slots: list[TextSlot], needle: str, label: str) -> list[list[Span]]:
    """One span over ``needle`` in every slot that contains it."""
    out: list[list[Span]] = []
    for slot in slots:
        at = slot.text.find(needle)
        out.append([Span(at, at + len(needle), label)] if at >= 0 else [])
    return out


def test_openai_redact_request() -> None:
    original = copy.deepcopy(CHAT_REQUEST)
    slots = OPENAI.prompt_texts(CHAT_REQUEST)
    spans = _spans_for(slots, "bob@example.com", "EMAIL")
    spans[3] = [Span(7, 13, "NAME"), Span(0, 4, "WORD")]  # "café ☃ résumé"
    spans[8] = [Span(19, 27, "PHONE")]  # "Thanks! Call me on 555-0100."

    body = OPENAI.redact_request(CHAT_REQUEST, slots, spans)

    assert original == CHAT_REQUEST
    expected = copy.deepcopy(original)
    expected["messages"][2]["content"][0]["text"] = (
        "What is in this image? My email is [REDACTED:EMAIL]"
    )
    expected["messages"][2]["content"][3]["text"] = "[REDACTED:WORD] ☃ [REDACTED:NAME]"
    expected["messages"][7]["content"] = "Thanks! Call me on [REDACTED:PHONE]."
    assert json.loads(body) == expected
    assert body == json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode()
    assert "☃".encode() in body


def test_redaction_of_a_subset_of_slots_and_length_mismatch() -> None:
    payload = {"model": "text-embedding-3-small", "input": ["a secret", "public"]}
    slots = OPENAI.prompt_texts(payload)
    body = OPENAI.redact_request(payload, slots[:1], [[Span(2, 8, "S")]])
    assert json.loads(body) == {**payload, "input": ["a [REDACTED:S]", "public"]}
    with pytest.raises(ValueError):
        OPENAI.redact_request(payload, slots, [[]])


def test_redaction_without_spans_reserialises_unchanged() -> None:
    slots = ANTHROPIC.prompt_texts(MESSAGES_REQUEST)
    body = ANTHROPIC.redact_request(MESSAGES_REQUEST, slots, [[] for _ in slots])
    assert json.loads(body) == MESSAGES_REQUEST


def test_anthropic_redact_request() -> None:
    original = copy.deepcopy(MESSAGES_REQUEST)
    slots = ANTHROPIC.prompt_texts(MESSAGES_REQUEST)
    spans: list[list[Span]] = [[] for _ in slots]
    spans[1] = [Span(17, 25, "SECRET"), Span(6, 12, "VERB")]  # "Never reveal the password."
    spans[2] = [Span(17, 28, "SSN")]
    spans[4] = [Span(0, 13, "CITY")]  # the tool_use input's "location"
    spans[6] = [Span(10, 14, "WEATHER")]  # nested tool_result text block
    spans[7] = [Span(6, 10, "WORD")]  # plain-text document

    body = ANTHROPIC.redact_request(MESSAGES_REQUEST, slots, spans)

    assert original == MESSAGES_REQUEST
    expected = copy.deepcopy(original)
    expected["system"][1]["text"] = "Never [REDACTED:VERB] the [REDACTED:SECRET]."
    expected["messages"][0]["content"] = "Hello, my SSN is [REDACTED:SSN]"
    expected["messages"][1]["content"][2]["input"]["location"] = "[REDACTED:CITY], CA"
    expected["messages"][2]["content"][1]["content"][0]["text"] = "Forecast: [REDACTED:WEATHER]"
    expected["messages"][2]["content"][4]["source"]["data"] = "Memo: [REDACTED:WORD]"
    assert json.loads(body) == expected


# --- Answers ----------------------------------------------------------------------------

LOGPROBS = {
    "content": [
        {"token": "Mail", "logprob": -0.1, "bytes": [77, 97, 105, 108], "top_logprobs": []},
    ],
    "refusal": None,
}

CHAT_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Mail alice@example.com, she is in Zürich.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": LOGPROBS,
            "finish_reason": "stop",
        },
        {
            "index": 1,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": "I can't help with that.",
                "annotations": [],
            },
            "logprobs": LOGPROBS,
            "finish_reason": "stop",
        },
        {
            "index": 2,
            "message": {
                "role": "assistant",
                "content": "Let me look it up.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q":"alice"}'},
                    }
                ],
                "reasoning_content": "alice@example.com is the address",
            },
            "logprobs": LOGPROBS,
            "finish_reason": "tool_calls",
        },
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}

COMPLETION_ANSWER: dict[str, Any] = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [
        {
            "text": "\n\nThis is indeed a test",
            "index": 0,
            "logprobs": None,
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}

MESSAGE_ANSWER: dict[str, Any] = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "text", "text": "Her number is 555-0100."},
        {
            "type": "tool_use",
            "id": "toolu_01D",
            "name": "send_sms",
            "input": {"to": "555-0100", "body": "hi"},
        },
        {"type": "text", "text": "Sent to café ☃ 555-0100."},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 2095,
        "output_tokens": 503,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    },
}


def test_openai_answer_texts() -> None:
    assert OPENAI.answer_texts(CHAT_ANSWER) == [
        TextSlot(("choices", 0, "message", "content"), "Mail alice@example.com, she is in Zürich."),
        TextSlot(("choices", 2, "message", "content"), "Let me look it up."),
        TextSlot(
            ("choices", 2, "message", "reasoning_content"), "alice@example.com is the address"
        ),
        TextSlot(
            ("choices", 2, "message", "tool_calls", 0, "function", "arguments"), '{"q":"alice"}'
        ),
    ]
    assert OPENAI.answer_texts(COMPLETION_ANSWER) == [
        TextSlot(("choices", 0, "text"), "\n\nThis is indeed a test"),
    ]


def test_anthropic_answer_texts() -> None:
    assert ANTHROPIC.answer_texts(MESSAGE_ANSWER) == [
        TextSlot(("content", 0, "text"), "Her number is 555-0100."),
        TextSlot(("content", 1, "input", "to"), "555-0100"),
        TextSlot(("content", 1, "input", "body"), "hi"),
        TextSlot(("content", 2, "text"), "Sent to café ☃ 555-0100."),
    ]


def test_openai_redact_answer_drops_logprobs_of_redacted_choices_only() -> None:
    original = copy.deepcopy(CHAT_ANSWER)
    slots = OPENAI.answer_texts(CHAT_ANSWER)
    body = OPENAI.redact_answer(CHAT_ANSWER, slots, _spans_for(slots, "alice@example.com", "EMAIL"))

    assert original == CHAT_ANSWER
    expected = copy.deepcopy(original)
    expected["choices"][0]["message"]["content"] = "Mail [REDACTED:EMAIL], she is in Zürich."
    expected["choices"][0]["logprobs"] = None
    expected["choices"][2]["message"]["reasoning_content"] = "[REDACTED:EMAIL] is the address"
    expected["choices"][2]["logprobs"] = None
    assert json.loads(body) == expected
    openai.types.chat.ChatCompletion.model_validate(json.loads(body))


def test_openai_redact_completion_answer() -> None:
    slots = OPENAI.answer_texts(COMPLETION_ANSWER)
    body = OPENAI.redact_answer(COMPLETION_ANSWER, slots, [[Span(10, 16, "W")]])
    expected = copy.deepcopy(COMPLETION_ANSWER)
    expected["choices"][0]["text"] = "\n\nThis is [REDACTED:W] a test"
    assert json.loads(body) == expected


def test_anthropic_redact_answer() -> None:
    original = copy.deepcopy(MESSAGE_ANSWER)
    slots = ANTHROPIC.answer_texts(MESSAGE_ANSWER)
    body = ANTHROPIC.redact_answer(MESSAGE_ANSWER, slots, _spans_for(slots, "555-0100", "PHONE"))

    assert original == MESSAGE_ANSWER
    expected = copy.deepcopy(original)
    expected["content"][0]["text"] = "Her number is [REDACTED:PHONE]."
    expected["content"][1]["input"]["to"] = "[REDACTED:PHONE]"
    expected["content"][2]["text"] = "Sent to café ☃ [REDACTED:PHONE]."
    assert json.loads(body) == expected
    anthropic.types.Message.model_validate(json.loads(body))


# --- Blocked answers --------------------------------------------------------------------

BLOCKED = "This answer was blocked by policy."
MARK = {"action": "blocked", "rule": "no-pii"}


def test_openai_blocked_chat_answer() -> None:
    original = copy.deepcopy(CHAT_ANSWER)
    body = json.loads(OPENAI.blocked_answer(CHAT_ANSWER, BLOCKED, "no-pii"))

    assert original == CHAT_ANSWER
    assert "alice" not in json.dumps(body)
    assert body == {
        **{key: value for key, value in original.items() if key != "choices"},
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": BLOCKED, "refusal": None},
                "logprobs": None,
                "finish_reason": "content_filter",
            }
            for i in range(3)
        ],
        "checkstream": MARK,
    }
    parsed = openai.types.chat.ChatCompletion.model_validate(body)
    assert [choice.finish_reason for choice in parsed.choices] == ["content_filter"] * 3
    assert all(choice.message.tool_calls is None for choice in parsed.choices)
    assert parsed.id == original["id"] and parsed.usage is not None
    assert parsed.usage.total_tokens == 29
    assert parsed.model_extra == {"checkstream": MARK}


def test_openai_blocked_completion_answer() -> None:
    body = json.loads(OPENAI.blocked_answer(COMPLETION_ANSWER, BLOCKED, "no-pii"))
    assert body == {
        **{key: value for key, value in COMPLETION_ANSWER.items() if key != "choices"},
        "choices": [
            {"index": 0, "text": BLOCKED, "logprobs": None, "finish_reason": "content_filter"}
        ],
        "checkstream": MARK,
    }
    parsed = openai.types.Completion.model_validate(body)
    assert parsed.choices[0].text == BLOCKED
    assert parsed.choices[0].finish_reason == "content_filter"


def test_anthropic_blocked_answer() -> None:
    original = copy.deepcopy(MESSAGE_ANSWER)
    answer = MESSAGE_ANSWER | {"stop_details": {"type": "refusal", "category": "cyber"}}
    body = json.loads(ANTHROPIC.blocked_answer(answer, BLOCKED, "no-pii"))

    assert original == MESSAGE_ANSWER
    assert body == {
        **original,
        "content": [{"type": "text", "text": BLOCKED}],
        "stop_reason": "refusal",
        "stop_sequence": None,
        "checkstream": MARK,
    }
    # The SDK's StopReason literal includes "refusal".
    parsed = anthropic.types.Message.model_validate(body)
    assert parsed.stop_reason == "refusal"
    assert parsed.stop_details is None
    assert [block.type for block in parsed.content] == ["text"]
    assert parsed.usage.output_tokens == 503
    assert parsed.model_extra == {"checkstream": MARK}


# --- Policy error bodies ----------------------------------------------------------------


def test_openai_policy_error_body() -> None:
    assert json.loads(OPENAI.policy_error_body("Prompt blocked.", "no-pii")) == {
        "error": {
            "message": "Prompt blocked.",
            "type": "invalid_request_error",
            "param": None,
            "code": "content_policy_violation",
        },
        "checkstream": MARK,
    }


def test_anthropic_policy_error_body() -> None:
    assert json.loads(ANTHROPIC.policy_error_body("Prompt blocked.", "no-pii")) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "Prompt blocked."},
        "checkstream": MARK,
    }


def test_every_registered_format_has_the_pipeline_methods() -> None:
    assert set(FORMATS) == {"openai", "anthropic"}
    for fmt in FORMATS.values():
        assert fmt.prompt_texts({}) == [] and fmt.answer_texts({}) == []
