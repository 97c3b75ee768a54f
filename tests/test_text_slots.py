"""Every text slot of every API the gateway checks, one row each: the table is the proof.

Each row puts a marker word in one slot of a real-shaped request or answer and asserts that
the endpoint's format hands exactly that text to the classifiers (prompt or answer), so a
slot that stops being read fails here by name.
"""

from __future__ import annotations

from typing import Any

import pytest

from checkstream.formats.endpoints import find_endpoint

M = "MARKER-7f3a"

PROMPTS: list[tuple[str, str, dict[str, Any]]] = [
    ("/v1/chat/completions", "system message", {"messages": [{"role": "system", "content": M}]}),
    (
        "/v1/chat/completions",
        "user text part",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": M}]}]},
    ),
    (
        "/v1/chat/completions",
        "assistant tool-call arguments",
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": M}}],
                }
            ]
        },
    ),
    (
        "/v1/chat/completions",
        "legacy function_call arguments",
        {"messages": [{"role": "assistant", "function_call": {"name": "f", "arguments": M}}]},
    ),
    ("/v1/chat/completions", "tool result", {"messages": [{"role": "tool", "content": M}]}),
    (
        "/v1/chat/completions",
        "tool description",
        {"messages": [], "tools": [{"type": "function", "function": {"description": M}}]},
    ),
    ("/v1/completions", "prompt", {"prompt": M}),
    ("/v1/completions", "prompt list", {"prompt": ["x", M]}),
    ("/v1/completions", "suffix", {"prompt": "x", "suffix": M}),
    ("/v1/embeddings", "input", {"input": M}),
    ("/v1/embeddings", "input list", {"input": ["x", M]}),
    ("/v1/responses", "instructions", {"instructions": M, "input": "x"}),
    ("/v1/responses", "input string", {"input": M}),
    ("/v1/responses", "input message", {"input": [{"role": "user", "content": M}]}),
    (
        "/v1/responses",
        "input_text part",
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": M}]}]},
    ),
    (
        "/v1/responses",
        "earlier output_text",
        {
            "input": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": M}],
                }
            ]
        },
    ),
    (
        "/v1/responses",
        "function_call arguments",
        {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": M}]},
    ),
    (
        "/v1/responses",
        "function_call_output",
        {"input": [{"type": "function_call_output", "call_id": "c", "output": M}]},
    ),
    (
        "/v1/responses",
        "tool description",
        {"input": "x", "tools": [{"type": "function", "description": M}]},
    ),
    ("/v1/messages", "system string", {"system": M, "messages": []}),
    ("/v1/messages", "system block", {"system": [{"type": "text", "text": M}], "messages": []}),
    ("/v1/messages", "user string", {"messages": [{"role": "user", "content": M}]}),
    (
        "/v1/messages",
        "tool_result content",
        {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": M}]}]},
    ),
    (
        "/v1/messages",
        "tool_use input",
        {
            "messages": [
                {"role": "assistant", "content": [{"type": "tool_use", "input": {"q": [M]}}]}
            ]
        },
    ),
    (
        "/v1/messages",
        "text document",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "document", "source": {"type": "text", "data": M}}],
                }
            ]
        },
    ),
    (
        "/v1/messages",
        "content document",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "content", "content": [{"type": "text", "text": M}]},
                        }
                    ],
                }
            ]
        },
    ),
    (
        "/v1/messages",
        "search_result",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "search_result", "content": [{"type": "text", "text": M}]}
                    ],
                }
            ]
        },
    ),
    ("/v1/messages/count_tokens", "user string", {"messages": [{"role": "user", "content": M}]}),
]

ANSWERS: list[tuple[str, str, dict[str, Any]]] = [
    ("/v1/chat/completions", "content", {"choices": [{"message": {"content": M}}]}),
    (
        "/v1/chat/completions",
        "second choice",
        {"choices": [{"message": {"content": "x"}}, {"message": {"content": M}}]},
    ),
    (
        "/v1/chat/completions",
        "reasoning_content",
        {"choices": [{"message": {"reasoning_content": M}}]},
    ),
    (
        "/v1/chat/completions",
        "tool-call arguments",
        {"choices": [{"message": {"tool_calls": [{"function": {"arguments": M}}]}}]},
    ),
    ("/v1/completions", "text", {"choices": [{"text": M}]}),
    (
        "/v1/responses",
        "output_text",
        {"output": [{"type": "message", "content": [{"type": "output_text", "text": M}]}]},
    ),
    (
        "/v1/responses",
        "function_call arguments",
        {"output": [{"type": "function_call", "arguments": M}]},
    ),
    ("/v1/messages", "text block", {"content": [{"type": "text", "text": M}]}),
    ("/v1/messages", "tool_use input", {"content": [{"type": "tool_use", "input": {"to": M}}]}),
]


@pytest.mark.parametrize(
    ("path", "slot", "payload"), PROMPTS, ids=[f"{p} {s}" for p, s, _ in PROMPTS]
)
def test_prompt_slot_is_checked(path: str, slot: str, payload: dict[str, Any]) -> None:
    endpoint = find_endpoint(path)
    assert endpoint is not None
    assert M in [s.text for s in endpoint.fmt.prompt_texts(payload)], slot


@pytest.mark.parametrize(
    ("path", "slot", "payload"), ANSWERS, ids=[f"{p} {s}" for p, s, _ in ANSWERS]
)
def test_answer_slot_is_checked(path: str, slot: str, payload: dict[str, Any]) -> None:
    endpoint = find_endpoint(path)
    assert endpoint is not None and endpoint.checks_answer
    assert M in [s.text for s in endpoint.fmt.answer_texts(payload)], slot


def test_embeddings_and_token_counts_have_no_answer_text() -> None:
    for path in ("/v1/embeddings", "/v1/messages/count_tokens"):
        endpoint = find_endpoint(path)
        assert endpoint is not None and not endpoint.checks_answer


@pytest.mark.parametrize(
    ("path", "payload", "kind"),
    [
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "image_url",
        ),
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input_image",
        ),
        (
            "/v1/messages",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}
                ]
            },
            "image",
        ),
        (
            "/v1/messages",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "document", "source": {"type": "base64"}}],
                    }
                ]
            },
            "document",
        ),
    ],
)
def test_media_parts_are_found(path: str, payload: dict[str, Any], kind: str) -> None:
    endpoint = find_endpoint(path)
    assert endpoint is not None
    assert endpoint.fmt.media_parts(payload) == [kind]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/v1/chat/completions", "chat_completions"),
        ("/openai/v1/chat/completions?x=1", "chat_completions"),
        ("/v1/completions", "completions"),
        ("/v1/responses", "responses"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/messages", "messages"),
        ("/v1/messages/count_tokens", "messages_count_tokens"),
    ],
)
def test_endpoint_dispatch(path: str, name: str) -> None:
    endpoint = find_endpoint(path)
    assert endpoint is not None and endpoint.name == name


@pytest.mark.parametrize(
    "path", ["/v1/files", "/v1/audio/speech", "/v1/models", "/v1/responses/r1/cancel"]
)
def test_other_paths_are_no_endpoint(path: str) -> None:
    assert find_endpoint(path) is None
