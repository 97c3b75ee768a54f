"""Operations end to end: audit trails, metrics, admin endpoints, hot reload and request logs,
through real Envoy + extproc + the demo upstream on 127.0.0.1.

Gateways (each its own directory, config and ports):

- ``ops``: audited tenants ``audit-a`` and ``audit-b`` (ingress ``log``/``block`` and
  midstream ``redact``/``stop`` keyword rules), ``audit-t`` (trails to tamper with), ``plain``
  (no audit) and ``managed`` (managed upstream auth). Used by the audit and log tests.
- ``metered``: fresh counts for ``/metrics``; no admin token, so admin actions answer 403.
- ``reloadable``: admin token set; the reload tests rewrite its policy and config files.
- one short-lived gateway per SIGKILL test.

The demo upstream echoes the prompt into its answer ("This is the CheckStream demo upstream.
You said: <prompt>. ..."), so a prompt decides which midstream rule its answer triggers.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from checkstream.config.model import load_config
from checkstream.demo import answer_pieces
from checkstream.gateway.runtime import config_version
from tests.support import (
    DemoUpstreamThread,
    Gateway,
    Reply,
    child_processes,
    free_port,
    gateway_ports,
    request,
    start_gateway,
    wait_until,
    write_config,
)

# In every prompt of the ops gateway: it must never reach a log line or an audit file.
MARKER = "quokka7731"
UPSTREAM_SECRET = "sk-upstream-ops-5ecr3t-91d2e7"
CLIENT_KEY = "sk-client-own-key-4f1e0b"
ADMIN_TOKEN = "adm-tok-8c1f33a0"
WRONG_TOKEN = "wrong-tok-77aa21"
REG_A = "EU AI Act Art. 12"
REG_B = "FCA COBS 9A.2.1R"

KEYWORDS = {
    "kw_zephyr": {"type": "keyword", "terms": ["zephyr"]},
    "kw_falcon": {"type": "keyword", "terms": ["falcon"]},
    "kw_pelican": {"type": "keyword", "terms": ["pelican"]},
    "kw_walrus": {"type": "keyword", "terms": ["walrus"]},
    "kw_narwhal": {"type": "keyword", "terms": ["narwhal"]},
}
TRIGGER_KEYS = {
    "type", "time", "request_id", "tenant", "phase", "rule", "action", "classifier",
    "score", "threshold", "regulation", "model", "replica", "prev", "hash",
}  # fmt: skip
SUMMARY_KEYS = {
    "type", "time", "request_id", "tenant", "model", "status", "input_tokens",
    "output_tokens", "tokens_estimated", "latency_ms", "rules", "replica", "prev", "hash",
}  # fmt: skip


# -- helpers ---------------------------------------------------------------------------------
def _rule(name: str, classifier: str, action: str, regulation: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": name,
        "trigger": {"classifier": classifier, "threshold": 0.5},
        "action": action,
    }
    if regulation is not None:
        rule["regulation"] = regulation
    return rule


def _policy(path: Path, *rules: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"version": "1.0", "name": path.stem, "policies": list(rules)}))
    return path


def _pipeline(ingress: list[str], midstream: list[str]) -> dict[str, Any]:
    return {"ingress": {"classifiers": ingress}, "midstream": {"classifiers": midstream}}


def _rid() -> str:
    return f"ops-{uuid.uuid4().hex[:16]}"


def _chat(prompt: str, *, stream: bool = False, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]}


def _post(
    gw: Gateway,
    tenant: str,
    payload: dict[str, Any] | bytes,
    rid: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    # The counts below are of 12-word answers (the demo's first 12 words) unless a test asks
    # for another length.
    sent = {
        "X-Tenant-ID": tenant,
        "x-request-id": rid or _rid(),
        "x-demo-chunks": "12",
        **(headers or {}),
    }
    return request(f"{gw.url}/v1/chat/completions", payload, sent)


def _sse_events(body: bytes) -> list[dict[str, Any]]:
    lines = body.decode().splitlines()
    return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: {")]


def _sse_text(body: bytes) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in _sse_events(body) if c["choices"]
    )


def _finish_reason(body: bytes) -> str | None:
    reasons = [c["choices"][0].get("finish_reason") for c in _sse_events(body) if c["choices"]]
    return reasons[-1] if reasons else None


def _trail(directory: Path) -> list[dict[str, Any]]:
    """Every record of a trail, in chain order (day files oldest first)."""
    records: list[dict[str, Any]] = []
    for file in sorted(directory.glob("*.jsonl")):
        records += [json.loads(line) for line in file.read_text().splitlines()]
    return records


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "checkstream", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _verified(records: list[dict[str, Any]]) -> str:
    """What ``audit verify`` prints for an intact trail of these records (one day file per
    UTC day the records span)."""
    days = len({datetime.fromisoformat(r["time"]).date() for r in records})
    return f"ok: {len(records)} records in {days} file{'s' * (days != 1)}\n"


def _log_events(gw: Gateway, event: str) -> list[dict[str, Any]]:
    """The gateway's log records (JSON Lines, every line) of one event."""
    return gw.events(event)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(url: str) -> Samples:
    reply = request(url)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            if sample.name.startswith("checkstream_"):
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _series(samples: Samples, name: str, **match: str) -> dict[tuple[str, ...], float]:
    """Samples of metric ``name`` whose labels include ``match``, keyed by the other labels'
    values (in label-name order)."""
    out: dict[tuple[str, ...], float] = {}
    for (sample_name, labels), value in samples.items():
        found = dict(labels)
        if sample_name != name or any(found.get(k) != v for k, v in match.items()):
            continue
        key = tuple(v for k, v in sorted(found.items()) if k not in match and k != "le")
        out[key] = value
    return out


# -- the ops gateway: audit trails and request logs ------------------------------------------
@dataclass(frozen=True)
class Ops:
    gw: Gateway
    config: Path

    @property
    def directory(self) -> Path:
        return self.config.parent


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoUpstreamThread]:
    up = DemoUpstreamThread().start(chunk_delay_ms=2)
    yield up
    up.stop()


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, demo: DemoUpstreamThread) -> Iterator[Ops]:
    directory = tmp_path_factory.mktemp("ops")
    policy_a = _policy(
        directory / "policy-a.yaml",
        _rule("zephyr_seen", "kw_zephyr", "log", REG_A),
        _rule("pelican_mask", "kw_pelican", "redact"),
    )
    policy_b = _policy(
        directory / "policy-b.yaml",
        _rule("falcon_block", "kw_falcon", "block", REG_B),
        _rule("pelican_stop", "kw_pelican", "stop"),
    )
    backend = f"http://127.0.0.1:{demo.port}/v1"
    audited_a = {
        "backend_url": backend,
        "pipeline": _pipeline(["kw_zephyr"], ["kw_pelican"]),
        "policy_path": str(policy_a),
    }
    config = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "classifiers": KEYWORDS,
        "pricing": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}},
        "tenants": {
            "configs": {
                "audit-a": {**audited_a, "audit": {"enabled": True}},
                "audit-b": {
                    "backend_url": backend,
                    "pipeline": _pipeline(["kw_falcon"], ["kw_pelican"]),
                    "policy_path": str(policy_b),
                    "audit": {"enabled": True, "path": "./trails/b", "retention_days": 30},
                },
                "audit-t": {**audited_a, "audit": {"enabled": True}},
                "plain": {"backend_url": backend},
                "managed": {
                    "backend_url": backend,
                    "auth": {"type": "bearer", "token_env": "OPS_UPSTREAM_KEY"},
                    "allow_unauthenticated": True,
                },
            }
        },
    }
    path = write_config(directory, config)
    gw = start_gateway(path, env={"OPS_UPSTREAM_KEY": UPSTREAM_SECRET})
    yield Ops(gw, path)
    assert gw.stop() == 0, gw.log()[-3000:]


def _summary_on_disk(directory: Path, rid: str) -> bool:
    return any(r["type"] == "request" and r["request_id"] == rid for r in _trail(directory))


def _audited(
    ops: Ops,
    tenant: str,
    trail: Path,
    payload: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[str, Reply]:
    """One request; its summary must be on disk the moment its response has ended."""
    rid = _rid()
    reply = _post(ops.gw, tenant, payload, rid, headers)
    assert _summary_on_disk(trail, rid), f"{rid}: summary not written before the response ended"
    return rid, reply


def _trigger(
    rid: str,
    tenant: str,
    phase: str,
    rule: str,
    action: str,
    classifier: str,
    regulation: str | None,
) -> dict[str, Any]:
    return {
        "type": "trigger",
        "request_id": rid,
        "tenant": tenant,
        "phase": phase,
        "rule": rule,
        "action": action,
        "classifier": classifier,
        "score": 1.0,
        "threshold": 0.5,
        "regulation": regulation,
        "model": "gpt-4o-mini",
    }


def _summary(rid: str, tenant: str, status: int, rules: list[str], **tokens: Any) -> dict[str, Any]:
    return {
        "type": "request",
        "request_id": rid,
        "tenant": tenant,
        "model": "gpt-4o-mini",
        "status": status,
        "rules": rules,
        **tokens,
    }


def _check_records(records: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [{k: r.get(k) for k in e} for r, e in zip(records, expected, strict=False)] == expected
    assert len(records) == len(expected), records
    for record in records:
        keys = TRIGGER_KEYS if record["type"] == "trigger" else SUMMARY_KEYS
        assert set(record) == keys, record
        assert datetime.fromisoformat(record["time"]).tzinfo is not None
        assert len(record["hash"]) == len(record["prev"]) == 64
        if record["type"] == "request":
            assert isinstance(record["latency_ms"], float) and record["latency_ms"] >= 0


def test_audit_trails_hold_each_tenants_own_requests_and_verify(ops: Ops) -> None:
    trail_a = ops.directory / "audit" / "audit-a"
    trail_b = ops.directory / "trails" / "b"
    # audit-a: an ingress log, a midstream redact (streamed), a clean request.
    a1, reply = _audited(ops, "audit-a", trail_a, _chat(f"zephyr {MARKER} hello"))
    assert reply.status == 200
    # "pelican" ends the 12-word answer, so exactly one midstream check sees it (see
    # test_one_midstream_match_is_one_trigger for a match that stays in the window).
    a2, reply = _audited(ops, "audit-a", trail_a, _chat(f"{MARKER} is a pelican", stream=True))
    assert reply.status == 200
    assert _sse_text(reply.body) == (
        f"This is the CheckStream demo upstream. You said: {MARKER} is a [REDACTED:KEYWORD]."
    )
    assert b"pelican" not in reply.body
    a3, reply = _audited(ops, "audit-a", trail_a, _chat(f"plain {MARKER} words here"))
    assert reply.status == 200
    # audit-b: an ingress block, a midstream stop.
    b1, reply = _audited(ops, "audit-b", trail_b, _chat(f"falcon {MARKER}"))
    assert reply.status == 400
    assert reply.headers["x-checkstream-rule"] == "falcon_block"
    b2, reply = _audited(ops, "audit-b", trail_b, _chat(f"pelican {MARKER} again", stream=True))
    assert reply.status == 200
    assert _finish_reason(reply.body) == "content_filter"
    assert reply.body.rstrip().endswith(b"data: [DONE]")
    # plain: not audited.
    assert _post(ops.gw, "plain", _chat(f"hello {MARKER}")).status == 200

    exact = {"output_tokens": 12, "tokens_estimated": False}
    records_a = _trail(trail_a)
    _check_records(
        records_a,
        [
            _trigger(a1, "audit-a", "ingress", "zephyr_seen", "log", "kw_zephyr", REG_A),
            _summary(a1, "audit-a", 200, ["zephyr_seen"], input_tokens=3, **exact),
            _trigger(a2, "audit-a", "midstream", "pelican_mask", "redact", "kw_pelican", None),
            _summary(a2, "audit-a", 200, ["pelican_mask"], input_tokens=4, **exact),
            _summary(a3, "audit-a", 200, [], input_tokens=4, **exact),
        ],
    )
    records_b = _trail(trail_b)
    _check_records(
        records_b,
        [
            _trigger(b1, "audit-b", "ingress", "falcon_block", "block", "kw_falcon", REG_B),
            # Answered by CheckStream itself: no model read anything.
            _summary(
                b1,
                "audit-b",
                400,
                ["falcon_block"],
                input_tokens=0,
                output_tokens=0,
                tokens_estimated=False,
            ),
            _trigger(b2, "audit-b", "midstream", "pelican_stop", "stop", "kw_pelican", None),
            # Stopped before the backend's usage arrived: counts are estimates.
            _summary(b2, "audit-b", 200, ["pelican_stop"], tokens_estimated=True),
        ],
    )
    assert {r["request_id"] for r in records_a}.isdisjoint({r["request_id"] for r in records_b})
    # The chain links each record to the one before it.
    for records in (records_a, records_b):
        assert records[0]["prev"] == "0" * 64
        assert [r["prev"] for r in records[1:]] == [r["hash"] for r in records[:-1]]
    # Prompt and answer text never reach a trail.
    for root in (ops.directory / "audit", ops.directory / "trails"):
        for file in root.rglob("*"):
            if file.is_file():
                assert MARKER.encode() not in file.read_bytes(), file
    # A tenant without audit has no trail at all.
    assert sorted(p.name for p in (ops.directory / "audit").iterdir()) == ["audit-a", "audit-t"]
    assert sorted(p.name for p in (ops.directory / "trails").iterdir()) == ["b"]

    config = str(ops.config)
    for tenant, records in (("audit-a", records_a), ("audit-b", records_b)):
        done = _cli("audit", "verify", "-c", config, "--tenant", tenant)
        assert (done.returncode, done.stdout) == (0, _verified(records)), done.stderr
    done = _cli("audit", "verify", "-c", config, "--tenant", "plain")
    assert done.returncode == 1
    assert "tenant 'plain' has no audit trail" in done.stderr


def test_one_midstream_match_is_one_trigger(ops: Ops) -> None:
    """A redacted word is one policy trigger, however many later windows still contain it."""
    trail = ops.directory / "audit" / "audit-t"
    prompt = "pelican and then a few more words"
    payload = _chat(prompt, stream=True)
    # 30 words: "pelican" is the 9th; every later check's window (512 chars) still holds it.
    rid, reply = _audited(ops, "audit-t", trail, payload, {"x-demo-chunks": "30"})
    assert reply.status == 200
    text = _sse_text(reply.body)
    assert text == "".join(answer_pieces(prompt, 30)).replace("pelican", "[REDACTED:KEYWORD]")
    assert text.count("[REDACTED:KEYWORD]") == 1
    records = [r for r in _trail(trail) if r["request_id"] == rid]
    assert [(r["type"], r.get("rule")) for r in records] == [
        ("trigger", "pelican_mask"),
        ("request", None),
    ]


@pytest.fixture(scope="module")
def tamper_source(ops: Ops) -> Path:
    """A trail with four or more records in one day file (audit-t: trigger + summary each)."""
    trail = ops.directory / "audit" / "audit-t"
    for word in ("zephyr one", "zephyr two", "zephyr three"):
        assert _post(ops.gw, "audit-t", _chat(f"{word} {MARKER}")).status == 200
    assert max(len(f.read_text().splitlines()) for f in trail.glob("*.jsonl")) >= 4
    return trail


def _tamper_edit(lines: list[str]) -> tuple[list[str], int, str]:
    record = json.loads(lines[1])
    record["rule" if record["type"] == "trigger" else "status"] = "tampered"
    edited = json.dumps(record, separators=(",", ":"))
    return (
        [lines[0], edited, *lines[2:]],
        2,
        "hash does not match the record (the record was edited)",
    )


def _tamper_delete(lines: list[str]) -> tuple[list[str], int, str]:
    moved = "prev is not the hash of the record before it (a record was removed, moved or added)"
    return [lines[0], *lines[2:]], 2, moved


def _tamper_swap(lines: list[str]) -> tuple[list[str], int, str]:
    moved = "prev is not the hash of the record before it (a record was removed, moved or added)"
    return [lines[0], lines[2], lines[1], *lines[3:]], 2, moved


@pytest.mark.parametrize("tamper", [_tamper_edit, _tamper_delete, _tamper_swap])
def test_audit_verify_names_the_tampered_line(
    tamper_source: Path,
    tmp_path: Path,
    tamper: Callable[[list[str]], tuple[list[str], int, str]],
) -> None:
    copy = tmp_path / "trail"
    shutil.copytree(tamper_source, copy)
    # Tamper with the file holding the most records (the only one, unless past midnight).
    file = max(copy.glob("*.jsonl"), key=lambda f: len(f.read_text().splitlines()))
    intact = _cli("audit", "verify", str(copy))
    assert intact.returncode == 0 and intact.stdout.startswith("ok: "), intact.stdout
    lines = file.read_text().splitlines()
    changed, line, why = tamper(lines)
    file.write_text("".join(x + "\n" for x in changed))
    done = _cli("audit", "verify", str(copy))
    assert (done.returncode, done.stdout) == (1, f"BROKEN: {file}:{line}: {why}\n")


# -- request logs ----------------------------------------------------------------------------
def test_one_request_log_line_per_request_and_no_secrets_in_the_log(ops: Ops) -> None:
    gw = ops.gw
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    sent: list[tuple[str, str, int, Reply]] = []

    def send(tenant: str, payload: dict[str, Any] | bytes, **headers: str) -> None:
        rid = _rid()
        reply = _post(gw, tenant, payload, rid, {**auth, **headers})
        sent.append((rid, tenant, reply.status, reply))

    send("managed", _chat(f"hello {MARKER}"))
    send("managed", _chat(f"stream {MARKER}", stream=True))
    send("plain", _chat(f"fail {MARKER}"), **{"x-demo-status": "503"})
    send("plain", b'{"model": "gpt-4o-mini", "messages": [' + MARKER.encode())
    send("audit-t", _chat(f"zephyr {MARKER}"))
    assert [status for _, _, status, _ in sent] == [200, 200, 503, 400, 200]
    assert sent[3][3].json()["error"]["code"] == "invalid_json"

    ids = {rid for rid, *_ in sent}
    assert wait_until(lambda: ids <= {e["request_id"] for e in _log_events(gw, "request")}), (
        "one request log line per request"
    )
    lines = [e for e in _log_events(gw, "request") if e["request_id"] in ids]
    assert sorted((e["request_id"], e["tenant"], e["status"]) for e in lines) == sorted(
        (rid, tenant, status) for rid, tenant, status, _ in sent
    )
    keys = {
        "time", "level", "logger", "event", "replica", "worker",
        "request_id", "tenant", "model", "status", "latency_ms", "input_tokens",
        "output_tokens", "tokens_estimated", "cost_usd", "rules",
    }  # fmt: skip
    assert all(set(e) == keys for e in lines), lines
    by_id = {e["request_id"]: e for e in lines}
    first = by_id[sent[0][0]]
    assert (first["model"], first["input_tokens"], first["output_tokens"]) == ("gpt-4o-mini", 2, 12)
    assert first["cost_usd"] == pytest.approx((2 * 0.15 + 12 * 0.6) / 1e6)
    assert by_id[sent[4][0]]["rules"] == ["zephyr_seen"]

    log = gw.log()
    assert UPSTREAM_SECRET not in log
    assert CLIENT_KEY not in log
    assert MARKER not in log


# -- metrics ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metered:
    gw: Gateway
    admin_url: str


@pytest.fixture(scope="module")
def metered(
    tmp_path_factory: pytest.TempPathFactory, demo: DemoUpstreamThread
) -> Iterator[Metered]:
    directory = tmp_path_factory.mktemp("metered")
    backend = f"http://127.0.0.1:{demo.port}/v1"
    config = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "classifiers": KEYWORDS,
        "pricing": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}},
        "tenants": {
            "configs": {
                "meter": {
                    "backend_url": backend,
                    "pipeline": _pipeline(["kw_zephyr"], []),
                    "policy_path": str(
                        _policy(directory / "meter.yaml", _rule("zephyr_seen", "kw_zephyr", "log"))
                    ),
                    "rate_limit": {"requests_per_minute": 5},
                },
                "meter-b": {
                    "backend_url": backend,
                    "pipeline": _pipeline(["kw_falcon"], []),
                    "policy_path": str(
                        _policy(
                            directory / "meter-b.yaml", _rule("falcon_block", "kw_falcon", "block")
                        )
                    ),
                },
            }
        },
    }
    path = write_config(directory, config)
    # The gateway inherits this environment: admin actions must be off (403).
    assert "CHECKSTREAM_ADMIN_TOKEN" not in os.environ
    gw = start_gateway(path)
    admin_url = f"http://127.0.0.1:{config['server']['admin_port']}"  # type: ignore[index]
    yield Metered(gw, admin_url)
    assert gw.stop() == 0, gw.log()[-3000:]


def test_metrics_count_exactly_what_happened(metered: Metered) -> None:
    gw = metered.gw
    prompt_tokens: dict[str, int] = {"gpt-4o-mini": 0, "other": 0}
    completion_tokens: dict[str, int] = {"gpt-4o-mini": 0, "other": 0}

    def ok(prompt: str, model: str = "gpt-4o-mini", label: str = "gpt-4o-mini") -> None:
        reply = _post(gw, "meter", _chat(prompt, model=model))
        assert reply.status == 200, reply.body
        usage = reply.json()["usage"]
        prompt_tokens[label] += usage["prompt_tokens"]
        completion_tokens[label] += usage["completion_tokens"]

    ok("zephyr one")
    ok("zephyr two words")
    streamed = {
        **_chat("a streamed answer", stream=True),
        "stream_options": {"include_usage": True},
    }
    reply = _post(gw, "meter", streamed)
    assert reply.status == 200
    usage = [e["usage"] for e in _sse_events(reply.body) if e.get("usage")]
    assert len(usage) == 1
    prompt_tokens["gpt-4o-mini"] += usage[0]["prompt_tokens"]
    completion_tokens["gpt-4o-mini"] += usage[0]["completion_tokens"]
    ok("which model is this", model="mystery-model-9", label="other")
    ok("fifth request")
    for _ in range(2):
        refused = _post(gw, "meter", _chat("one too many"))
        assert refused.status == 429
        assert refused.headers["retry-after"]
    blocked = _post(gw, "meter-b", _chat("falcon inbound"))
    assert blocked.status == 400

    direct = _scrape(f"{metered.admin_url}/metrics")
    via_envoy = _scrape(f"{gw.url}/metrics")
    assert via_envoy == direct
    m = direct

    assert _series(m, "checkstream_requests_total") == {
        ("200", "meter"): 5,
        ("429", "meter"): 2,
        ("400", "meter-b"): 1,
    }
    assert _series(m, "checkstream_policy_triggers_total") == {
        ("log", "zephyr_seen", "meter"): 2,
        ("block", "falcon_block", "meter-b"): 1,
    }
    assert _series(m, "checkstream_rate_limited_total") == {("requests_per_minute", "meter"): 2}
    assert prompt_tokens["other"] > 0 and completion_tokens["gpt-4o-mini"] == 48
    assert _series(m, "checkstream_tokens_total") == {
        ("input", "gpt-4o-mini", "meter"): prompt_tokens["gpt-4o-mini"],
        ("output", "gpt-4o-mini", "meter"): completion_tokens["gpt-4o-mini"],
        # The unknown model and the refused requests (no model read) count as "other".
        ("input", "other", "meter"): prompt_tokens["other"],
        ("output", "other", "meter"): completion_tokens["other"],
        ("input", "gpt-4o-mini", "meter-b"): 0,
        ("output", "gpt-4o-mini", "meter-b"): 0,
    }
    assert not any("mystery-model-9" in str(labels) for _, labels in m)
    assert _series(m, "checkstream_latency_ms_count", phase="total") == {
        ("meter",): 7,
        ("meter-b",): 1,
    }
    # Ingress ran for every admitted request (the 429s were refused at their headers).
    assert _series(m, "checkstream_latency_ms_count", phase="ingress") == {
        ("meter",): 5,
        ("meter-b",): 1,
    }
    assert _series(m, "checkstream_classifier_latency_ms_count") == {
        ("kw_zephyr",): 5,
        ("kw_falcon",): 1,
    }
    assert _series(m, "checkstream_extproc_errors_total") == {}
    assert _series(m, "checkstream_classifier_errors_total") == {}


# -- admin -----------------------------------------------------------------------------------
def test_health_ready_and_admin_disabled_without_a_token(metered: Metered) -> None:
    for base in (metered.admin_url, metered.gw.url):
        assert request(f"{base}/healthz").status == 200
        ready = request(f"{base}/readyz")
        assert (ready.status, ready.json()) == (200, {"status": "ready"})
        for headers in ({}, {"x-checkstream-admin-token": WRONG_TOKEN}):
            refused = request(f"{base}/admin/reload", b"", headers, method="POST")
            assert refused.status == 403, (base, refused.body)
            assert "CHECKSTREAM_ADMIN_TOKEN" in refused.json()["error"]
            assert WRONG_TOKEN.encode() not in refused.body


# -- reload ----------------------------------------------------------------------------------
def _reloaded_policy(path: Path, walrus: str, narwhal: str) -> None:
    _policy(
        path,
        _rule("walrus_rule", "kw_walrus", walrus),
        _rule("narwhal_rule", "kw_narwhal", narwhal),
    )


@dataclass(frozen=True)
class Reloadable:
    gw: Gateway
    config: Path
    policy: Path
    admin_url: str

    def write_policy(self, walrus: str, narwhal: str) -> None:
        _reloaded_policy(self.policy, walrus, narwhal)

    def reload(self, via: str | None = None) -> Reply:
        """POST /admin/reload with the token, to the admin port unless ``via`` is given."""
        base = via or self.admin_url
        headers = {"x-checkstream-admin-token": ADMIN_TOKEN}
        return request(f"{base}/admin/reload", b"", headers, method="POST", timeout=60)

    def apply(self, walrus: str, narwhal: str) -> str:
        """Write the policy and reload; the new version."""
        self.write_policy(walrus, narwhal)
        reply = self.reload()
        assert reply.status == 200, reply.body
        body = reply.json()
        assert body == {"status": "reloaded", "version": self.expected_version()}
        return str(body["version"])

    def expected_version(self) -> str:
        return config_version(load_config(self.config))

    def tenant_info(self, tenant: str = "reloaded") -> dict[str, Any]:
        reply = request(f"{self.gw.url}/admin/tenant-info", headers={"X-Tenant-ID": tenant})
        assert reply.status == 200, reply.body
        info: dict[str, Any] = reply.json()
        return info

    def walrus(self) -> Reply:
        return _post(self.gw, "reloaded", _chat("the walrus question"))


@pytest.fixture(scope="module")
def reloadable(
    tmp_path_factory: pytest.TempPathFactory, demo: DemoUpstreamThread
) -> Iterator[Reloadable]:
    directory = tmp_path_factory.mktemp("reloadable")
    policy = directory / "reloaded-policy.yaml"
    config = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "classifiers": KEYWORDS,
        "tenants": {
            "configs": {
                "reloaded": {
                    "backend_url": f"http://127.0.0.1:{demo.port}/v1",
                    "pipeline": _pipeline(["kw_walrus"], ["kw_narwhal"]),
                    "policy_path": str(policy),
                },
                "bystander": {"backend_url": f"http://127.0.0.1:{free_port()}/v1"},
            }
        },
    }
    path = write_config(directory, config)
    _reloaded_policy(policy, "log", "log")
    gw = start_gateway(path, env={"CHECKSTREAM_ADMIN_TOKEN": ADMIN_TOKEN})
    admin_url = f"http://127.0.0.1:{config['server']['admin_port']}"  # type: ignore[index]
    yield Reloadable(gw, path, policy, admin_url)
    assert gw.stop() == 0, gw.log()[-3000:]


def test_admin_token_is_checked_and_never_echoed(reloadable: Reloadable) -> None:
    for base in (reloadable.admin_url, reloadable.gw.url):
        for headers in ({}, {"x-checkstream-admin-token": WRONG_TOKEN}):
            refused = request(f"{base}/admin/reload", b"", headers, method="POST")
            assert refused.status == 401, (base, headers, refused.body)
            assert WRONG_TOKEN.encode() not in refused.body
            assert ADMIN_TOKEN.encode() not in refused.body
    assert ADMIN_TOKEN not in reloadable.gw.log()


def test_tenant_info_shows_only_the_callers_tenant(reloadable: Reloadable) -> None:
    version = reloadable.expected_version()
    for base in (reloadable.gw.url, reloadable.admin_url):
        mine = request(f"{base}/admin/tenant-info", headers={"X-Tenant-ID": "reloaded"})
        assert mine.status == 200, mine.body
        info = mine.json()
        assert info["tenant"] == "reloaded"
        assert info["config_version"] == version
        assert info["policy"]["rules"] == ["walrus_rule", "narwhal_rule"]
        assert b"bystander" not in mine.body
    other = reloadable.tenant_info("bystander")
    assert (other["tenant"], other["config_version"]) == ("bystander", version)
    assert b"reloaded" not in json.dumps(other).encode()


def test_reload_applies_a_changed_policy(reloadable: Reloadable) -> None:
    before = reloadable.apply("log", "log")
    assert reloadable.walrus().status == 200
    # This time through Envoy's listener, which routes /admin/* to the admin server.
    reloadable.write_policy("block", "log")
    reply = reloadable.reload(via=reloadable.gw.url)
    assert reply.status == 200, reply.body
    after = reloadable.expected_version()
    assert reply.json() == {"status": "reloaded", "version": after}
    assert after != before
    blocked = reloadable.walrus()
    assert blocked.status == 400
    assert blocked.headers["x-checkstream-rule"] == "walrus_rule"
    assert reloadable.tenant_info()["config_version"] == after
    # Reloading unchanged files keeps the version.
    assert reloadable.reload().json() == {"status": "reloaded", "version": after}


def test_bad_policy_or_config_is_refused_and_the_old_policy_kept(
    reloadable: Reloadable,
) -> None:
    version = reloadable.apply("block", "log")
    policy, config = reloadable.policy, reloadable.config
    good_policy, good_config = policy.read_text(), config.read_text()
    try:
        policy.write_text(
            'version: "1.0"\n'
            "name: broken\n"
            "policies:\n"
            "  - name: walrus_rule\n"
            "    trigger: {classifier: kw_walrus, threshold: 0.5}\n"
            "    action: log\n"
            "    acton: log\n"
        )
        refused = reloadable.reload()
        assert refused.status == 400
        assert refused.json() == {
            "status": "refused",
            "error": f"{policy}:7: policies[0].acton: unknown key (did you mean 'action'?)",
            "version": version,
        }
        assert reloadable.walrus().status == 400  # still blocked: the old policy serves
        policy.write_text(good_policy)
        config.write_text(good_config + "pricing: {gpt-4o-mini: [\n")
        refused = reloadable.reload()
        assert refused.status == 400
        body = refused.json()
        assert (body["status"], body["version"]) == ("refused", version)
        assert body["error"].startswith(f"{config}:"), body
        assert "invalid YAML" in body["error"]
        assert reloadable.walrus().status == 400
        assert reloadable.tenant_info()["config_version"] == version
    finally:
        policy.write_text(good_policy)
        config.write_text(good_config)


def test_backend_change_is_refused_until_restart(
    reloadable: Reloadable, demo: DemoUpstreamThread
) -> None:
    version = reloadable.apply("log", "log")
    config = reloadable.config
    good = config.read_text()
    try:
        moved = yaml.safe_load(good)
        moved["tenants"]["configs"]["reloaded"]["backend_url"] = f"http://127.0.0.1:{free_port()}"
        config.write_text(yaml.safe_dump(moved, sort_keys=False))
        refused = reloadable.reload()
        assert refused.status == 400
        body = refused.json()
        assert (body["status"], body["version"]) == ("refused", version)
        assert body["error"].startswith(f"{config}: ")
        assert "restart to apply" in body["error"]
        # Still the old backend (the demo upstream).
        assert reloadable.walrus().status == 200
    finally:
        config.write_text(good)
    assert reloadable.reload().json() == {"status": "reloaded", "version": version}
    assert reloadable.tenant_info()["backend"] == f"http://127.0.0.1:{demo.port}/v1"


def _hangup(reloadable: Reloadable, needle: str) -> str:
    """SIGHUP the ``checkstream run`` process; the log it wrote until ``needle`` showed up."""
    seen = len(reloadable.gw.log())
    os.kill(reloadable.gw.process.pid, signal.SIGHUP)
    assert wait_until(lambda: needle in reloadable.gw.log()[seen:]), repr(needle)
    return reloadable.gw.log()[seen:]


def test_sighup_reloads_and_refuses_like_the_endpoint(reloadable: Reloadable) -> None:
    old = reloadable.apply("block", "log")
    assert reloadable.walrus().status == 400
    reloadable.write_policy("log", "log")
    new = reloadable.expected_version()
    assert new != old
    _hangup(reloadable, f'"event": "reloaded", "version": "{new}"')
    assert reloadable.walrus().status == 200
    assert reloadable.tenant_info()["config_version"] == new
    # A bad file: refused, logged with its location, the old version keeps serving.
    good = reloadable.policy.read_text()
    try:
        reloadable.policy.write_text(good + "bogus_key: 1\n")
        line = len(good.splitlines()) + 1
        logged = _hangup(reloadable, '"event": "reload_refused"')
        assert f"{reloadable.policy}:{line}: bogus_key: unknown key" in logged
        assert reloadable.tenant_info()["config_version"] == new
    finally:
        reloadable.policy.write_text(good)


@dataclass
class Stream:
    prompt: str
    status: int = 0
    body: bytes = b""
    ended: float = 0.0
    error: str | None = None


def _all_streaming(started: threading.Barrier, streams: list[Stream]) -> None:
    """Wait until every stream's response has begun; fail with their errors if one failed."""
    try:
        started.wait()
    except threading.BrokenBarrierError:
        raise AssertionError([s.error for s in streams]) from None


def _open_stream(
    gw: Gateway, tenant: str, prompt: str, headers: dict[str, str]
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streamed chat request whose response has begun (status and headers received)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(_chat(prompt, stream=True)).encode(),
        headers={"Content-Type": "application/json", "X-Tenant-ID": tenant, **headers},
    )
    return conn, conn.getresponse()


STREAM_CHUNKS = 30
STREAM_HEADERS = {"x-demo-chunks": str(STREAM_CHUNKS), "x-demo-delay-ms": "50"}


def test_reload_under_load_drops_no_stream(reloadable: Reloadable) -> None:
    reloadable.apply("log", "log")
    streams = [Stream(f"narwhal number {i}") for i in range(20)]
    started = threading.Barrier(len(streams) + 1, timeout=30)

    def run(stream: Stream) -> None:
        try:
            conn, response = _open_stream(reloadable.gw, "reloaded", stream.prompt, STREAM_HEADERS)
            stream.status = response.status
            started.wait()
            stream.body = response.read()
            stream.ended = time.monotonic()
            conn.close()
        except Exception as exc:  # reported below, per stream
            stream.error = repr(exc)
            started.abort()

    with ThreadPoolExecutor(len(streams)) as pool:
        futures = [pool.submit(run, s) for s in streams]
        _all_streaming(started, streams)
        reloadable.write_policy("log", "stop")
        reply = reloadable.reload()
        swapped = time.monotonic()
        for future in futures:
            future.result(60)
    assert reply.status == 200, reply.body
    assert [s.error for s in streams] == [None] * len(streams)
    for stream in streams:
        assert stream.status == 200
        # In flight across the swap, and finished under the policy it started with.
        assert stream.ended > swapped
        assert _sse_text(stream.body) == "".join(answer_pieces(stream.prompt, STREAM_CHUNKS))
        assert _finish_reason(stream.body) == "stop"
        assert stream.body.rstrip().endswith(b"data: [DONE]")
    # Started after the swap: the new policy stops it.
    later = _post(reloadable.gw, "reloaded", _chat("narwhal after", stream=True))
    assert later.status == 200
    assert _finish_reason(later.body) == "content_filter"
    assert "narwhal" not in _sse_text(later.body)
    assert later.body.rstrip().endswith(b"data: [DONE]")


# -- SIGKILL ---------------------------------------------------------------------------------
def test_sigkilled_worker_leaves_a_verifiable_trail(
    tmp_path: Path, demo: DemoUpstreamThread
) -> None:
    def config() -> Path:
        return write_config(
            tmp_path,
            {
                "server": {"host": "127.0.0.1", **gateway_ports()},
                "tenants": {
                    "configs": {
                        "crash": {
                            "backend_url": f"http://127.0.0.1:{demo.port}/v1",
                            "audit": {"enabled": True},
                        }
                    }
                },
            },
        )

    trail = tmp_path / "audit" / "crash"
    gw = start_gateway(config())
    try:
        for i in range(3):
            assert _post(gw, "crash", _chat(f"before the crash {i}")).status == 200
        # ~8 s each: all are still streaming when the worker dies.
        long_stream = {"x-demo-chunks": "400", "x-demo-delay-ms": "20"}
        streams = [Stream(f"long stream {i}") for i in range(4)]
        started = threading.Barrier(len(streams) + 1, timeout=30)

        def run(stream: Stream) -> None:
            try:
                _conn, response = _open_stream(gw, "crash", stream.prompt, long_stream)
                stream.status = response.status
                stream.body = response.read1(65536)  # text is flowing
                started.wait()
                stream.body += response.read()
            except threading.BrokenBarrierError:
                stream.error = "another stream failed to start"
            except Exception as exc:  # the gateway dies under it: expected
                stream.error = repr(exc)
                started.abort()

        with ThreadPoolExecutor(len(streams)) as pool:
            futures = [pool.submit(run, s) for s in streams]
            _all_streaming(started, streams)
            workers = [
                p
                for p, cmd in child_processes(gw.process.pid).items()
                if "checkstream.cli.main serve" in cmd
            ]
            assert len(workers) == 1
            os.kill(workers[0], signal.SIGKILL)
            for future in futures:
                future.result(60)
        # The launcher restarts the worker; the gateway serves on, then stops cleanly.
        assert wait_until(lambda: "extproc-0 restarted" in gw.log(), 30), gw.log()[-2000:]
        assert gw.stop() == 0, gw.log()[-3000:]
    finally:
        gw.stop(signal.SIGKILL)
    assert "exited unexpectedly" in gw.log()
    assert [s.status for s in streams] == [200] * len(streams)
    assert not any(s.body.rstrip().endswith(b"data: [DONE]") for s in streams)
    # The three finished requests are on disk and chained; the restarted worker added the
    # cut streams' summaries (499, tokens estimated) from its predecessor's journal.
    records = _trail(trail)
    assert [r["type"] for r in records] == ["request"] * 7
    assert [r["status"] for r in records] == [200] * 3 + [499] * 4
    assert all(r["tokens_estimated"] for r in records[3:])
    done = _cli("audit", "verify", str(trail))
    assert (done.returncode, done.stdout) == (0, _verified(records))

    # A new gateway chains on from the last record written before the crash.
    gw = start_gateway(config())
    try:
        assert _post(gw, "crash", _chat("after the crash")).status == 200
    finally:
        assert gw.stop() == 0
    records = _trail(trail)
    assert len(records) == 8
    assert records[7]["prev"] == records[6]["hash"]
    done = _cli("audit", "verify", str(trail))
    assert (done.returncode, done.stdout) == (0, _verified(records))


def test_the_running_service_removes_trail_files_past_retention(
    tmp_path: Path, demo: DemoUpstreamThread
) -> None:
    trail = tmp_path / "trail"
    trail.mkdir()
    old, recent = trail / "2020-01-01.jsonl", trail / f"{datetime.now(UTC).date()}.jsonl"
    old.write_text("")
    recent.write_text("")
    config = {
        "server": {"host": "127.0.0.1", **gateway_ports()},
        "tenants": {
            "configs": {
                "kept": {
                    "backend_url": f"http://127.0.0.1:{demo.port}/v1",
                    "audit": {"enabled": True, "path": str(trail), "retention_days": 7},
                }
            }
        },
    }
    gw = start_gateway(write_config(tmp_path, config))
    try:
        assert wait_until(lambda: not old.exists()), "the expired day file to be pruned"
        assert recent.exists()
    finally:
        assert gw.stop() == 0, gw.log()[-3000:]
