"""Policies end to end: prompts and whole answers checked through real Envoy + extproc.

Tenants (``tests/conftest.py``): ``guarded`` blocks "project falcon" and redacts PII;
``lenient`` only logs "project falcon"; ``demo-egress*`` check answers of the demo upstream,
which echoes the prompt back, so a prompt decides what the answer contains.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai

from tests.support import Gateway, RecordingUpstream, request

FALCON = {"model": "m", "messages": [{"role": "user", "content": "Status of project Falcon?"}]}


def test_block_answers_400_with_rule_and_never_calls_backend(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    before = len(upstreams["a"].received)
    reply = request(f"{gateway.url}/v1/chat/completions", FALCON, {"X-Tenant-ID": "guarded"})
    assert reply.status == 400
    assert reply.headers["x-checkstream-rule"] == "no_falcon"
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "content_policy_violation")
    assert len(upstreams["a"].received) == before


def test_block_in_anthropic_format(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    before = len(upstreams["b"].received)
    payload = {
        "model": "claude",
        "max_tokens": 10,
        "system": "You are helpful.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is PROJECT  falcon"}]}
        ],
    }
    reply = request(f"{gateway.url}/v1/messages", payload, {"X-Tenant-ID": "guarded-anthropic"})
    assert reply.status == 400
    assert reply.headers["x-checkstream-rule"] == "no_falcon"
    body = reply.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert len(upstreams["b"].received) == before


def test_same_prompt_two_tenants_two_outcomes(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    blocked = request(f"{gateway.url}/v1/chat/completions", FALCON, {"X-Tenant-ID": "guarded"})
    logged = request(f"{gateway.url}/v1/chat/completions", FALCON, {"X-Tenant-ID": "lenient"})
    assert blocked.status == 400
    assert logged.status == 200
    assert b"project Falcon" in upstreams["a"].last().body
    # ``log`` records the trigger as a structured line, without the prompt text.
    lines = gateway.events("policy_trigger")
    assert any(
        x["tenant"] == "lenient" and x["rule"] == "falcon_seen" and x["action"] == "log"
        for x in lines
    ), gateway.log()[-2000:]
    assert "Status of project" not in gateway.log()


def test_redact_rewrites_what_the_backend_receives(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    payload = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Mail jane.doe@example.com or call 415-555-2671."}
                ],
            },
        ],
    }
    reply = request(f"{gateway.url}/v1/chat/completions", payload, {"X-Tenant-ID": "guarded"})
    assert reply.status == 200, reply.body
    got = upstreams["a"].last()
    sent = json.loads(got.body)
    text = sent["messages"][1]["content"][0]["text"]
    assert text == "Mail [REDACTED:EMAIL] or call [REDACTED:PHONE]."
    assert sent["messages"][0]["content"] == "Be brief."
    assert b"jane.doe" not in got.body
    # The backend got a well-formed request: its length matches what was sent.
    assert int(got.headers.get("content-length", len(got.body))) == len(got.body)


def test_clean_prompt_passes_untouched(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"What is 2+2?"}]}'
    reply = request(f"{gateway.url}/v1/chat/completions", raw, {"X-Tenant-ID": "guarded"})
    assert reply.status == 200
    assert upstreams["a"].last().body == raw


def _demo_chat(gateway: Gateway, tenant: str, prompt: str) -> Any:
    client = openai.OpenAI(
        base_url=f"{gateway.url}/tenant/{tenant}/v1",
        api_key="x",
        max_retries=0,
        default_headers={"x-demo-chunks": "40"},
    )
    return client.chat.completions.create(
        model="checkstream-demo", messages=[{"role": "user", "content": prompt}]
    )


def test_egress_redacts_a_whole_answer(gateway: Gateway) -> None:
    answer = _demo_chat(gateway, "demo-egress", "write to jane.doe@example.com")
    text = answer.choices[0].message.content
    assert "You said: write to [REDACTED:EMAIL]." in text
    assert "jane.doe" not in text
    assert answer.choices[0].finish_reason == "stop"


def test_egress_block_replaces_the_answer_with_content_filter(gateway: Gateway) -> None:
    answer = _demo_chat(gateway, "demo-egress", "say project falcon")
    choice = answer.choices[0]
    assert choice.finish_reason == "content_filter"
    assert "project falcon" not in (choice.message.content or "").lower()
    assert answer.model_extra is not None
    assert answer.model_extra["checkstream"] == {"action": "blocked", "rule": "no_falcon"}


def test_egress_in_anthropic_format(gateway: Gateway) -> None:
    client = anthropic.Anthropic(
        base_url=f"{gateway.url}/tenant/demo-egress-anthropic",
        api_key="x",
        max_retries=0,
        default_headers={"x-demo-chunks": "40"},
    )
    blocked = client.messages.create(
        model="claude-demo",
        max_tokens=64,
        messages=[{"role": "user", "content": "say project falcon"}],
    )
    assert blocked.stop_reason == "refusal"
    block = blocked.content[0]
    assert block.type == "text" and "project falcon" not in block.text.lower()
    redacted = client.messages.create(
        model="claude-demo",
        max_tokens=64,
        messages=[{"role": "user", "content": "mail jane.doe@example.com"}],
    )
    first = redacted.content[0]
    assert first.type == "text" and "[REDACTED:EMAIL]" in first.text
    assert redacted.stop_reason == "end_turn"


def test_egress_leaves_clean_answers_and_streams_alone(gateway: Gateway) -> None:
    answer = _demo_chat(gateway, "demo-egress", "hello there")
    assert answer.choices[0].finish_reason == "stop"
    assert "You said: hello there." in answer.choices[0].message.content
