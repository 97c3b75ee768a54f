"""End to end: one tenant's huge prompt never stalls another tenant's stream.

Real Envoy + one extproc worker (both tenants share it) + the demo upstream. Tenant
``heavy`` checks prompts with ``pii_detector``; tenant ``streamer``'s streamed answers pass
through extproc event by event (for usage). ``heavy`` sends an 8 MB digit-heavy prompt
(about ten seconds of regex work) while ``streamer``'s answer flows; the stream's gaps
between reads must stay short. The bound is the requirement itself ("under a second", about
five times what this run sees under load): a correctness property, not a benchmark
(``bench/isolation.py`` measures it).
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from checkstream.audit.verify import verify
from tests.support import (
    DemoUpstreamThread,
    Gateway,
    gateway_ports,
    request,
    running_gateway,
    write_config,
    write_policy,
)

pytestmark = pytest.mark.e2e

# 160 events 50 ms apart: the stream lasts about 8 s, longer than the huge prompt's check.
STREAM_HEADERS = {"x-demo-chunks": "160", "x-demo-delay-ms": "50"}
MAX_GAP_S = 1.0


def digit_heavy_prompt(chars: int) -> str:
    """Numbers of 1 to 12 digits: the slowest text for the PII patterns."""
    rng = random.Random(7)
    parts: list[str] = []
    size = 0
    while size < chars:
        part = str(rng.randint(0, 10 ** rng.randint(1, 12)))
        parts.append(part)
        size += len(part) + 1
    return " ".join(parts)[:chars]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    demo = DemoUpstreamThread().start()
    directory = tmp_path_factory.mktemp("isolation")
    policy = write_policy(directory, "pii.yaml", [("pii_seen", "pii_detector", "log")])
    backend = f"http://127.0.0.1:{demo.port}/v1"
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", **gateway_ports(), "extproc_workers": 1},
        "tenants": {
            "resolution": [{"header": "X-Tenant-ID"}],
            "configs": {
                "heavy": {
                    "backend_url": backend,
                    "pipeline": {
                        "ingress": {"classifiers": ["pii_detector"]},
                        "midstream": {"classifiers": []},
                    },
                    "policy_path": str(policy),
                    "audit": {"enabled": True},
                },
                # Metered (usage), so every event of its stream passes through extproc as it
                # comes; midstream rules would hold text back and release it in bursts,
                # which would hide a stall.
                "streamer": {"backend_url": backend, "audit": {"enabled": True}},
            },
        },
    }
    try:
        with running_gateway(write_config(directory, config)) as gw:
            yield gw
    finally:
        demo.stop()


def _stream(gateway: Gateway, reads: list[float], started: threading.Event) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Tenant-ID": "streamer", **STREAM_HEADERS},
    )
    response = conn.getresponse()
    while chunk := response.read1(65536):
        reads.append(time.monotonic())
        started.set()
        assert chunk
    conn.close()
    return response.status


def _huge(gateway: Gateway, prompt: str, outcome: dict[str, Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    outcome["sent"] = time.monotonic()
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Tenant-ID": "heavy"},
    )
    response = conn.getresponse()
    outcome["status"] = response.status
    outcome["body"] = response.read()
    outcome["answered"] = time.monotonic()
    conn.close()


def test_an_8mb_prompt_does_not_stall_another_tenants_stream(gateway: Gateway) -> None:
    prompt = digit_heavy_prompt(8_000_000)
    reads: list[float] = []
    started = threading.Event()
    status: dict[str, int] = {}

    def stream() -> None:
        status["stream"] = _stream(gateway, reads, started)

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert started.wait(20), "the stream never started"
    outcome: dict[str, Any] = {}
    heavy = threading.Thread(target=_huge, args=(gateway, prompt, outcome))
    heavy.start()
    heavy.join(60)
    streaming.join(60)
    assert not heavy.is_alive() and not streaming.is_alive()

    # The huge prompt was really being worked on while the stream flowed.
    assert outcome["answered"] - outcome["sent"] > 1.0
    assert reads[-1] > outcome["answered"], "the stream ended before the huge prompt's answer"
    # Its sender meets its own fail mode (the check outlasts its timeout), not Envoy's 504.
    if outcome["status"] != 200:
        assert outcome["status"] == 503, outcome
        assert json.loads(outcome["body"])["error"]["code"] == "guardrail_error"
    assert status["stream"] == 200
    during = [t for t in reads if outcome["sent"] <= t <= outcome["answered"] + 1.0]
    assert len(during) >= 10, "too few reads while the huge prompt was checked"
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    assert max(gaps) < MAX_GAP_S, f"the stream stalled {max(gaps):.2f}s"


def test_the_huge_prompt_left_the_worker_healthy(gateway: Gateway) -> None:
    """After the timed-out check, the next small prompt of the same tenant is checked."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    body = {"model": "m", "messages": [{"role": "user", "content": "card 4111 1111 1111 1111"}]}
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Tenant-ID": "heavy"},
    )
    response = conn.getresponse()
    assert response.status == 200
    assert "pii_seen" in gateway.log()
    response.read()
    conn.close()


def _ledger(gateway: Gateway, tenant: str) -> list[tuple[str, str]]:
    conn = sqlite3.connect(gateway.config_path.parent / "checkstream-usage.db")
    try:
        return conn.execute(
            "SELECT model, request_id FROM usage WHERE tenant = ?", (tenant,)
        ).fetchall()
    finally:
        conn.close()


def test_a_lone_surrogate_model_costs_no_other_tenant_its_usage_rows(gateway: Gateway) -> None:
    before = {t: len(_ledger(gateway, t)) for t in ("heavy", "streamer")}

    def ask(tenant: str, model: str) -> int:
        # json.dumps writes the lone surrogate as the escape "\ud800": valid JSON.
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        return request(f"{gateway.url}/v1/chat/completions", body, {"X-Tenant-ID": tenant}).status

    jobs = [("heavy", "m\ud800") if n % 4 == 0 else ("streamer", "gpt-4o") for n in range(40)]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda job: ask(*job), jobs))
    assert statuses == [200] * 40
    streamer = _ledger(gateway, "streamer")[before["streamer"] :]
    heavy = _ledger(gateway, "heavy")[before["heavy"] :]
    assert len(streamer) == 30 and {m for m, _ in streamer} == {"gpt-4o"}
    assert len(heavy) == 10 and {m for m, _ in heavy} == {"m\ufffd"}
    trail = gateway.config_path.parent / "audit" / "heavy"
    records = [
        json.loads(line)
        for file in sorted(trail.glob("*.jsonl"))
        for line in file.read_text(encoding="utf-8").splitlines()
    ]
    assert sum(r["model"] == "m\ufffd" for r in records if r["type"] == "request") == 10
    assert verify(trail).ok
