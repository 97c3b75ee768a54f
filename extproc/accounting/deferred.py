"""Deferred accounting (``accounting: deferred``): a request counted from Envoy's access log.

An inline counted request costs five blocking ext_proc messages, because extproc reads the
answer to find its usage. A deferred one costs one (request headers) or two (and the
request body, when the tenant needs the prompt: ``tokens_per_minute``, ingress rules, a
model allowlist). Its answer never passes through extproc:

1. The blocking answer hands the request's ``Tally`` to Envoy as dynamic metadata
   (``handoff``): tenant, request id, lease, pre-paid tokens, start, ingress triggers.
2. Envoy's ``checkstream_usage`` Lua filter (``envoy_config.py``) reads, as the answer's
   bytes pass and without holding them, the model and the usage numbers at its start and
   end, into the ``checkstream.deferred`` namespace.
3. Envoy's gRPC access log brings both, with the status and byte counts, to a worker's
   ``AccessLogService`` (many requests per message), which rebuilds the Tally
   (``settled``) and closes it with ``Accounts.finish`` like any request.

Every request has exactly one access log entry (Envoy logs at the stream's end, client
resets and its own replies included), so every ``acquire`` still meets one ``finish``:
limits, budgets and usage totals are the inline path's numbers. What changes is *when*:
the usage row lands a flush interval after the client's last byte, not before it.

Pure functions; the gRPC service is ``gateway/access_log.py``. Run by the worker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from checkstream.accounting.accounts import CLIENT_CLOSED, Tally
from checkstream.accounting.client_text import store_safe
from checkstream.accounting.metering import CHARS_PER_TOKEN
from checkstream.formats.texts import Usage
from checkstream.limits.decisions import Decision

#: Where extproc's half lives (the namespace extproc may write, ``receiving_namespaces``).
NAMESPACE: Final = "checkstream"
#: The key under it that marks a request as deferred; the access log keeps only those.
HANDOFF_KEY: Final = "deferred"
#: The Lua filter's half (its own namespace: Lua cannot write extproc's).
LUA_NAMESPACE: Final = "checkstream.deferred"
#: Envoy's route response headers read the admission's X-RateLimit-* values from here.
LIMIT_HEADERS: Final = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
# A client-chosen model longer than this is not a model name (same cap as inline).
_MAX_MODEL_CHARS = 200


def handoff(tally: Tally, endpoint: str, limit_headers: list[tuple[str, str]]) -> dict[str, str]:
    """The fields of extproc's metadata namespace that carry ``tally`` to the end of its
    request, and the X-RateLimit-* values Envoy's route prints."""
    state = {
        "tenant": tally.tenant,
        "request_id": tally.request_id,
        "client_request_id": tally.client_request_id,
        # Wall clock: the entry may be closed by another worker, whose monotonic clock
        # has another origin.
        "started": time.time() - (time.monotonic() - tally.started),
        "endpoint": endpoint,
        "model": tally.model,
        "prompt_chars": tally.prompt_chars,
        "reserved_tokens": tally.reserved_tokens,
        "admitted": tally.admitted,
        "lease": tally.decision.lease if tally.decision is not None else None,
        "triggers": tally.triggers,
        "rules": tally.rules,
    }
    fields = {HANDOFF_KEY: json.dumps(state, separators=(",", ":"))}
    fields.update({name: value for name, value in limit_headers if name in LIMIT_HEADERS})
    return fields


@dataclass(frozen=True)
class Ending:
    """What Envoy's access log entry says about how a deferred request ended."""

    status: int
    #: The backend answered (``response_code_details == "via_upstream"``), not Envoy.
    from_upstream: bool
    #: The client went away before the response ended.
    client_left: bool
    request_body_bytes: int
    response_body_bytes: int
    #: The Lua filter's findings (digit strings), see ``envoy_config.USAGE_LUA``.
    found: Mapping[str, str]
    #: When the entry was logged (epoch seconds): the request's end.
    ended: float


def settled(state_json: str, ending: Ending) -> Tally:
    """The Tally ``handoff`` carried, completed with how its request ended."""
    state = json.loads(state_json)
    started_wall = float(state["started"])
    tally = Tally(
        tenant=str(state["tenant"]),
        request_id=str(state["request_id"]),
        # Latency is measured to the entry's end, on this process's monotonic clock.
        started=time.monotonic() - max(0.0, ending.ended - started_wall),
        model=str(state.get("model") or ""),
        prompt_chars=int(state.get("prompt_chars") or 0),
        reserved_tokens=int(state.get("reserved_tokens") or 0),
        admitted=bool(state.get("admitted")),
        triggers=list(state.get("triggers") or []),
        rules=list(state.get("rules") or []),
        client_request_id=state.get("client_request_id"),
    )
    lease = state.get("lease")
    if lease:
        tally.decision = Decision(True, None, None, None, None, 0.0, lease=str(lease))
    found = ending.found
    if not tally.model:
        # The request was not read: the model is the one the answer says served it.
        tally.model = store_safe(found.get("model", ""), _MAX_MODEL_CHARS)
    if not tally.prompt_chars:
        # No body was read: its size stands in for the prompt, should the answer not say.
        tally.prompt_chars = ending.request_body_bytes
    tally.billable = ending.from_upstream and 0 < ending.status < 400
    tally.status = CLIENT_CLOSED if ending.client_left else ending.status
    tally.usage = usage_found(str(state.get("endpoint") or ""), found)
    if tally.usage is None or tally.usage.output_tokens is None:
        # Estimated, as inline: a stream without a usage report at one token per event
        # (each carries about one), any other answer by its size.
        events = _number(found.get("events"))
        tally.answer_chars = CHARS_PER_TOKEN * events if events else ending.response_body_bytes
    return tally


def usage_found(endpoint: str, found: Mapping[str, str]) -> Usage | None:
    """The usage an answer reported, from the numbers the Lua filter found at its start
    (``head_*``) and end (the rest); None when it reported none.

    OpenAI chat and completions name them ``prompt_tokens``/``completion_tokens`` (a stream
    only when asked with ``stream_options.include_usage``); embeddings report prompt
    tokens only. Anthropic and the Responses API say ``input_tokens``/``output_tokens``;
    an Anthropic stream reports its input in ``message_start`` (the head) and its output
    in the last ``message_delta``, and its input total includes both cache counts.
    """
    if endpoint in ("chat_completions", "completions", "embeddings"):
        tokens_in = _maybe(found.get("prompt"))
        tokens_out = _maybe(found.get("completion"))
        if endpoint == "embeddings" and tokens_in is not None:
            tokens_out = 0
    else:
        tokens_in = _maybe(found.get("input"))
        cache = ("cache_creation", "cache_read")
        if tokens_in is None:
            tokens_in = _maybe(found.get("head_input"))
            cache = ("head_cache_creation", "head_cache_read")
        if tokens_in is not None and endpoint.startswith("messages"):
            tokens_in += sum(_number(found.get(key)) for key in cache)
        tokens_out = _maybe(found.get("output"))
    if tokens_in is None and tokens_out is None:
        return None
    return Usage(tokens_in, tokens_out)


def _maybe(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _number(value: str | None) -> int:
    return _maybe(value) or 0
