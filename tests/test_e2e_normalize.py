"""Obfuscated text is still checked, through real Envoy + extproc (tenants in conftest.py):
zero-width characters, soft hyphens, full-width forms and Cyrillic look-alikes in prompts and
streamed answers; what is not redacted reaches its reader exactly as sent."""

from __future__ import annotations

import json

import pytest

from tests.support import Gateway, RecordingUpstream, request
from tests.test_e2e_midstream import _openai_text, _post_stream

pytestmark = pytest.mark.e2e

ZWSP, SOFT_HYPHEN = "\u200b", "\u00ad"


def _chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def test_obfuscated_keyword_in_prompt_is_blocked(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    before = len(upstreams["a"].received)
    for text in (
        f"Status of pro{ZWSP}ject fal{SOFT_HYPHEN}con?",
        "Status of ＰＲＯＪＥＣＴ ＦＡＬＣＯＮ?",
        "Status of prоjеct fаlcоn?",  # Cyrillic о, е, а
    ):
        reply = request(
            f"{gateway.url}/v1/chat/completions", _chat(text), {"X-Tenant-ID": "guarded"}
        )
        assert reply.status == 400, (text, reply.body)
        assert reply.headers["x-checkstream-rule"] == "no_falcon"
    assert len(upstreams["a"].received) == before


def test_full_width_email_in_prompt_is_redacted_and_the_rest_kept(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    card = ZWSP.join(["4111", "1111", "1111", "1111"])
    text = f"Ｈｉ{ZWSP}! mail ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ or card {card} — é"
    reply = request(f"{gateway.url}/v1/chat/completions", _chat(text), {"X-Tenant-ID": "guarded"})
    assert reply.status == 200, reply.body
    sent = json.loads(upstreams["a"].last().body)["messages"][0]["content"]
    assert sent == f"Ｈｉ{ZWSP}! mail [REDACTED:EMAIL] or card [REDACTED:CREDIT_CARD] — é"


def test_clean_obfuscated_looking_prompt_reaches_the_backend_byte_for_byte(
    gateway: Gateway, upstreams: dict[str, RecordingUpstream]
) -> None:
    raw = json.dumps(_chat(f"Ｈｅｌｌｏ{ZWSP} ｗｏｒｌｄ, prоject plans, 1０0%")).encode()
    reply = request(f"{gateway.url}/v1/chat/completions", raw, {"X-Tenant-ID": "guarded"})
    assert reply.status == 200, reply.body
    assert upstreams["a"].last().body == raw


def test_obfuscated_keyword_in_a_stream_stops_it(gateway: Gateway) -> None:
    payload = _chat("the plan is prоjеct fа\u200blcоn", stream=True)
    body, _ = _post_stream(gateway, "/tenant/demo-egress/v1/chat/completions", payload)
    text, chunks = _openai_text(body)
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert chunks[-1]["checkstream"]["rule"] == "no_falcon"
    assert "fа" not in text


def test_full_width_email_in_a_stream_is_redacted(gateway: Gateway) -> None:
    payload = _chat(f"mail ｊａｎｅ＠ｅｘａ{SOFT_HYPHEN}ｍｐｌｅ．ｃｏｍ now", stream=True)
    body, _ = _post_stream(gateway, "/tenant/demo-egress/v1/chat/completions", payload)
    text, _ = _openai_text(body)
    assert "You said: mail [REDACTED:EMAIL] now." in text
    assert "ｊａｎｅ" not in text
