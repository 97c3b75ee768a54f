"""Streamed answers never release part of a protected span (issue: nothing passes unchecked).

The property, for the real ``pii_detector`` and ``keyword`` classifiers: whatever the
answer and however the upstream splits it (1..N characters per event, arbitrary network
reads), no character of a span that the non-streamed check finds reaches the client. It is
checked for OpenAI chat, Anthropic and Responses streams, with ``redact`` and ``stop``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkstream.formats import WireFormat, anthropic, openai, responses
from checkstream.formats.sse import SseDecoder
from checkstream.plugins.keyword import KeywordClassifier, KeywordSettings
from checkstream.plugins.pii import PiiDetector
from checkstream.policy.guardrails import PhasePlan, Rule
from checkstream.policy.midstream import MidstreamGuard
from checkstream.policy.pipeline import Checker
from checkstream.types import Span

PII = PiiDetector("pii_detector")
KEYWORD = KeywordClassifier(
    "banned", KeywordSettings(terms=["project falcon", "internal only"], label="BANNED")
)
EXECUTOR = ThreadPoolExecutor(1)
_PLACEHOLDER = re.compile(r"\[REDACTED:[A-Z_]+\]")

ENTITIES = [
    "jane.doe@example.com",
    "jonathan.richardson-smith@very-long-company-example.co.uk",
    "j.d@ex.io",
    "+1 415 555 0132",
    "(415) 555-0132",
    "4111 1111 1111 1111",
    "5500-0000-0000-0004",
    "GB82 WEST 1234 5698 7654 32",
    "192.168.10.20",
    "project falcon",
    "internal only",
]
WORDS = ["the", "lead", "at", "for", "Q3.", "and", "reach", "on", "Call", "is", "done.", "ok"]


def _chat(pieces: Sequence[str]) -> bytes:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    out = chunk({"role": "assistant", "content": ""})
    out += b"".join(chunk({"content": p}) for p in pieces)
    return out + chunk({}, "stop") + b"data: [DONE]\n\n"


def _anthropic(pieces: Sequence[str]) -> bytes:
    def event(kind: str, data: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

    start = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": []}
    out = event("message_start", {"message": {**start, "usage": {"input_tokens": 1}}})
    out += event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    for p in pieces:
        delta = {"type": "text_delta", "text": p}
        out += event("content_block_delta", {"index": 0, "delta": delta})
    out += event("content_block_stop", {"index": 0})
    out += event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {}})
    return out + event("message_stop", {})


def _responses(pieces: Sequence[str]) -> bytes:
    seq = iter(range(10_000))

    def event(kind: str, data: dict[str, Any]) -> bytes:
        body = {"type": kind, "sequence_number": next(seq), **data}
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode()

    text = "".join(pieces)
    response = {"id": "resp_1", "object": "response", "model": "m", "status": "in_progress"}
    item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed"}
    part = {"type": "output_text", "text": text, "annotations": []}
    out = event("response.created", {"response": {**response, "output": []}})
    for p in pieces:
        where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
        out += event("response.output_text.delta", {**where, "delta": p})
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    out += event("response.output_text.done", {**where, "text": text})
    out += event("response.content_part.done", {**where, "part": part})
    out += event(
        "response.output_item.done", {"output_index": 0, "item": {**item, "content": [part]}}
    )
    done = {**response, "status": "completed", "output": [{**item, "content": [part]}]}
    return out + event("response.completed", {"response": done})


STREAMS = {"openai": (openai.FORMAT, _chat), "anthropic": (anthropic.FORMAT, _anthropic)}
STREAMS["responses"] = (responses.FORMAT, _responses)


def _guard(fmt: WireFormat, action: str) -> MidstreamGuard:
    rules = (
        Rule("pii", "pii_detector", 0.5, action, None, None),  # type: ignore[arg-type]
        Rule("banned", "banned", 0.5, action, None, None),  # type: ignore[arg-type]
    )
    checker = Checker({"pii_detector": PII, "banned": KEYWORD}, EXECUTOR, 5.0)
    return MidstreamGuard(
        fmt,
        checker,
        PhasePlan(("pii_detector", "banned"), rules),
        window_tokens=128,
        holdback_tokens=16,
        drop_usage_chunk=False,
        fail_open=False,
        on_verdict=lambda *_: None,
    )


def _spans(text: str) -> list[Span]:
    found = PII.classify([text])[0].spans + KEYWORD.classify([text])[0].spans
    return sorted(found, key=lambda s: s.start)


def _split(text: str, sizes: list[int]) -> list[str]:
    pieces, i, k = [], 0, 0
    while i < len(text):
        n = sizes[k % len(sizes)]
        pieces.append(text[i : i + n])
        i, k = i + n, k + 1
    return pieces


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        chunks.append(data[i : i + n])
        i, k = i + n, k + 1
    return chunks


async def _stream_through(guard: MidstreamGuard, chunks: list[bytes]) -> bytes:
    out = bytearray()
    for chunk in chunks:
        release = await guard.feed(chunk)
        out += release.body
        if release.end:
            return bytes(out)
    out += (await guard.finish()).body
    return bytes(out)


def _client_text(fmt: WireFormat, body: bytes) -> str:
    """The answer text the client sees, as its SDK assembles it from the deltas."""
    return "".join(fmt.delta_text(e) or "" for e in SseDecoder().feed(body + b"\n\n"))


def _hides(answer: str, seen: str, spans: list[Span]) -> bool:
    """Whether ``seen`` is ``answer`` with some regions replaced by placeholders (nothing
    else changed) such that every character of every span is inside a replaced region."""
    kept = _PLACEHOLDER.split(seen)
    protected = [False] * len(answer)
    for span in spans:
        for i in range(span.start, span.end):
            protected[i] = True

    def align(k: int, pos: int) -> bool:
        # kept[k] starts at pos; the text before pos back to the previous piece was replaced.
        piece = kept[k]
        if answer[pos : pos + len(piece)] != piece or any(protected[pos : pos + len(piece)]):
            return False
        end = pos + len(piece)
        if k == len(kept) - 1:
            return end == len(answer)
        nxt = kept[k + 1]
        start = answer.find(nxt, end + 1)
        while start >= 0:
            if align(k + 1, start):
                return True
            start = answer.find(nxt, start + 1)
        return False

    return align(0, 0)


answers = st.lists(
    st.one_of(st.sampled_from(WORDS), st.sampled_from(ENTITIES)), min_size=3, max_size=25
).map(" ".join)
event_sizes = st.lists(st.integers(1, 6), min_size=1, max_size=5)
read_sizes = st.lists(st.integers(1, 400), min_size=1, max_size=5).filter(lambda r: sum(r) > 20)


async def _check_no_leak(
    api: str, action: str, answer: str, sizes: list[int], reads: list[int]
) -> None:
    fmt, build = STREAMS[api]
    spans = _spans(answer)
    body = await _stream_through(_guard(fmt, action), _cut(build(_split(answer, sizes)), reads))
    seen = _client_text(fmt, body)
    if action == "stop":
        # Stopped before the first protected character: what was sent is a clean prefix.
        first = spans[0].start if spans else len(answer)
        assert answer.startswith(seen) and len(seen) <= first, (answer, seen)
    else:
        assert _hides(answer, seen, spans), (answer, seen)
    if api == "responses" and action == "redact":
        # The texts the stream repeats (output_text.done, content_part.done, completed) carry
        # the same redactions: nothing of a span survives there either.
        for event in SseDecoder().feed(body + b"\n\n"):
            for repeated in re.findall(r'"text":\s*"((?:[^"\\]|\\.)*)"', event.data or ""):
                assert _hides(answer, json.loads(f'"{repeated}"'), spans), (answer, repeated)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=answers, sizes=event_sizes, reads=read_sizes)
async def test_openai_redact_releases_no_part_of_a_span(
    answer: str, sizes: list[int], reads: list[int]
) -> None:
    await _check_no_leak("openai", "redact", answer, sizes, reads)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=answers, sizes=event_sizes, reads=read_sizes)
async def test_anthropic_redact_releases_no_part_of_a_span(
    answer: str, sizes: list[int], reads: list[int]
) -> None:
    await _check_no_leak("anthropic", "redact", answer, sizes, reads)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=answers, sizes=event_sizes, reads=read_sizes)
async def test_responses_redact_releases_no_part_of_a_span(
    answer: str, sizes: list[int], reads: list[int]
) -> None:
    await _check_no_leak("responses", "redact", answer, sizes, reads)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(api=st.sampled_from(sorted(STREAMS)), answer=answers, sizes=event_sizes, reads=read_sizes)
async def test_stop_ends_before_any_part_of_a_span(
    api: str, answer: str, sizes: list[int], reads: list[int]
) -> None:
    await _check_no_leak(api, "stop", answer, sizes, reads)


async def test_the_reported_address_split_is_redacted_whole() -> None:
    """The case that leaked: 3-character deltas, ``jane.doe@example.[REDACTED:EMAIL]``."""
    answer = "Contact the lead at jane.doe@example.com for the Q3 numbers."
    for size in (1, 2, 3):
        body = await _stream_through(
            _guard(openai.FORMAT, "redact"), [_chat(_split(answer, [size]))]
        )
        assert _client_text(openai.FORMAT, body) == (
            "Contact the lead at [REDACTED:EMAIL] for the Q3 numbers."
        )


async def test_a_private_key_longer_than_the_window_is_redacted_line_by_line() -> None:
    """A PEM key is longer than the check window: its later lines are still caught after
    its BEGIN line left the window."""
    lines = [
        "".join(chr(65 + (i * 7 + j * 3) % 26) for j in range(64)) for i in range(30)
    ]  # 30 base64-looking lines: about 2 KB, four windows long
    key = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END RSA PRIVATE KEY-----"
    answer = f"Here is the key you asked for:\n{key}\nKeep it safe."
    assert _spans(answer), "the detector finds the key in the whole answer"
    for size in (3, 17):
        chunks = _cut(_chat(_split(answer, [size])), [97])  # network reads of a few events
        body = await _stream_through(_guard(openai.FORMAT, "redact"), chunks)
        seen = _client_text(openai.FORMAT, body)
        for line in lines:
            assert line[:20] not in seen, (size, line)
        assert seen.startswith("Here is the key you asked for:")
        assert seen.endswith("Keep it safe.")
