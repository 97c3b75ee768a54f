"""Midstream guardrails end to end: streamed answers checked while they flow, through real
Envoy + extproc, with the demo upstream (which echoes the prompt into its answer, so the
prompt decides where an offending phrase appears in the stream).

Tenants (``tests/conftest.py``): ``demo-egress`` / ``demo-egress-anthropic`` stop on
"project falcon" and redact PII in answers; ``demo-checked`` only logs PII.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from typing import Any

import anthropic
import openai

from checkstream.demo import answer_pieces
from tests.support import Gateway

# 60 pieces at 50 ms: the upstream needs ~3 s for the whole answer.
SLOW = {"x-demo-chunks": "60", "x-demo-delay-ms": "50"}


def _post_stream(gateway: Gateway, path: str, payload: dict[str, Any]) -> tuple[bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    started = time.monotonic()
    conn.request(
        "POST",
        path,
        body=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **SLOW},
    )
    response = conn.getresponse()
    assert response.status == 200
    body = response.read()
    elapsed = time.monotonic() - started
    conn.close()
    return body, elapsed


def _openai_text(body: bytes) -> tuple[str, list[dict[str, Any]]]:
    chunks = [
        json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")
    ]
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    return text, chunks


def _upstream_cancels(gateway: Gateway) -> int:
    """Upstream requests Envoy cut off (connection closed with the request still active)."""
    stats = urllib.request.urlopen(
        f"http://127.0.0.1:{gateway.envoy_admin_port}/stats?filter=destroy_local_with_active_rq"
    ).read()
    return sum(int(line.rsplit(b":", 1)[1]) for line in stats.splitlines() if line.strip())


def test_openai_stream_stopped_midway_ends_cleanly_and_early(gateway: Gateway) -> None:
    cancels_before = _upstream_cancels(gateway)
    prompt = "the plan is project falcon"
    payload = {"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    body, elapsed = _post_stream(gateway, "/tenant/demo-egress/v1/chat/completions", payload)
    text, chunks = _openai_text(body)
    assert "project falcon" not in text.lower()
    assert text.startswith("This is the CheckStream demo upstream.")  # good events first
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "content_filter"
    assert final["checkstream"]["rule"] == "no_falcon"
    assert body.rstrip().endswith(b"data: [DONE]")
    # The client's response ended at the stop, not when the upstream finished (~3 s),
    # and Envoy cancelled the upstream request instead of letting it generate on.
    assert elapsed < 2.0, elapsed
    assert _upstream_cancels(gateway) == cancels_before + 1


def test_anthropic_stream_stopped_midway(gateway: Gateway) -> None:
    payload = {
        "model": "claude",
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "the plan is project falcon"}],
    }
    body, elapsed = _post_stream(gateway, "/tenant/demo-egress-anthropic/v1/messages", payload)
    events = [
        json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")
    ]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2]["delta"]["stop_reason"] == "refusal"
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert "project falcon" not in text.lower()
    assert elapsed < 2.0, elapsed


def test_redact_midstream_in_both_formats(gateway: Gateway) -> None:
    prompt = "mail jane.doe@example.com now"
    payload = {"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    body, _ = _post_stream(gateway, "/tenant/demo-egress/v1/chat/completions", payload)
    text, _ = _openai_text(body)
    assert "You said: mail [REDACTED:EMAIL] now." in text
    assert b"jane" not in body
    payload = {**payload, "max_tokens": 100}
    body, _ = _post_stream(gateway, "/tenant/demo-egress-anthropic/v1/messages", payload)
    assert b"jane" not in body
    assert b"[REDACTED:EMAIL]" in body


def test_clean_checked_stream_equals_the_unchecked_one(gateway: Gateway) -> None:
    """Same request to a checked and an unchecked tenant: the same answer text and events."""
    payload = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    checked, _ = _post_stream(gateway, "/tenant/demo-egress/v1/chat/completions", payload)
    plain, _ = _post_stream(gateway, "/tenant/demo-openai/v1/chat/completions", payload)
    checked_text, checked_chunks = _openai_text(checked)
    plain_text, plain_chunks = _openai_text(plain)
    assert checked_text == plain_text == "".join(answer_pieces("hello", 60))
    # The usage chunk CheckStream asked for is not passed on: the client did not ask.
    assert [c["choices"] == [] for c in checked_chunks] == [
        c["choices"] == [] for c in plain_chunks
    ]
    assert all("usage" not in c for c in checked_chunks)


def test_sdks_consume_a_stopped_stream_without_raising(gateway: Gateway) -> None:
    client = openai.OpenAI(
        base_url=f"{gateway.url}/tenant/demo-egress/v1",
        api_key="x",
        max_retries=0,
        default_headers=SLOW,
    )
    stream = client.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": "about project falcon"}]
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    claude = anthropic.Anthropic(
        base_url=f"{gateway.url}/tenant/demo-egress-anthropic",
        api_key="x",
        max_retries=0,
        default_headers=SLOW,
    )
    with claude.messages.stream(
        model="claude",
        max_tokens=100,
        messages=[{"role": "user", "content": "about project falcon"}],
    ) as events:
        text = "".join(events.text_stream)
        final = events.get_final_message()
    assert final.stop_reason == "refusal"
    assert "project falcon" not in text.lower()


def test_streamed_n_above_one_is_refused_for_checked_tenants(gateway: Gateway) -> None:
    from tests.support import request

    payload = {"model": "m", "stream": True, "n": 2, "messages": [{"role": "user", "content": "x"}]}
    reply = request(f"{gateway.url}/tenant/demo-egress/v1/chat/completions", payload)
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "unsupported_parameter"
