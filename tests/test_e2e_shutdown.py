"""End to end: an honest drain and no orphans, whatever ends the launcher (#12).

Each test starts ``checkstream run`` like a user (real Envoy, real workers, the demo
upstream) and ends it a different way: SIGTERM during a stream, Ctrl-C on ``run | tee``,
SIGKILL of the launcher.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    LISTENING,
    DemoUpstreamThread,
    child_processes,
    gateway_ports,
    request,
    start_gateway,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoUpstreamThread]:
    up = DemoUpstreamThread().start(chunk_delay_ms=2)
    yield up
    up.stop()


def _config(demo: DemoUpstreamThread, directory: Path) -> tuple[Path, dict[str, int]]:
    ports = gateway_ports()
    config = {
        "server": {"host": "127.0.0.1", "drain_timeout_s": 10, **ports},
        "tenants": {"configs": {"demo": {"backend_url": f"http://127.0.0.1:{demo.port}/v1"}}},
    }
    return write_config(directory, config), ports


STREAM = json.dumps(
    {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
).encode()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def _gone(pids: list[int]) -> bool:
    """Every process exited (a zombie not yet reaped by init counts as gone)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            return False
    return True


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As a server binds: connections in TIME_WAIT do not count, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_sigterm_turns_health_503_at_once_stops_accepting_and_finishes_streams(
    tmp_path: Path, demo: DemoUpstreamThread
) -> None:
    path, ports = _config(demo, tmp_path)
    gw = start_gateway(path)
    admin = f"http://127.0.0.1:{ports['admin_port']}"
    try:
        keep_alive = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        keep_alive.request("GET", "/healthz")
        first = keep_alive.getresponse()
        first.read()
        assert first.status == 200
        streaming = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
        headers = {
            "Content-Type": "application/json",
            "X-Tenant-ID": "demo",
            "x-demo-chunks": "20",
            "x-demo-delay-ms": "100",
        }
        streaming.request("POST", "/v1/chat/completions", body=STREAM, headers=headers)
        response = streaming.getresponse()
        assert response.status == 200
        head = response.read1(65536)

        gw.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        # At once: both probes of the admin port say 503...
        assert wait_until(lambda: request(f"{admin}/healthz", timeout=2).status == 503, 1.0)
        assert request(f"{admin}/readyz", timeout=2).status == 503
        # ...the listener refuses new connections...
        assert wait_until(lambda: _refused(gw.port), 2.0)
        # ...and a keep-alive connection gets 503 on /healthz, then is closed.
        keep_alive.request("GET", "/healthz")
        drained = keep_alive.getresponse()
        drained.read()
        assert drained.status == 503
        assert drained.getheader("connection") == "close"
        assert time.monotonic() - started < 2.0  # all of that well before the stream ends

        body = head + response.read()
        assert body.count(b'"content":') >= 20  # the in-flight stream finished whole
        assert body.rstrip().endswith(b"data: [DONE]")
        assert gw.process.wait(30) == 0, gw.log()[-3000:]
    finally:
        gw.stop(signal.SIGKILL)
    events = [r["event"] for r in gw.records()]
    assert "stopped" in events


def test_ctrl_c_on_run_piped_to_tee_stops_everything(
    tmp_path: Path, demo: DemoUpstreamThread
) -> None:
    path, ports = _config(demo, tmp_path)
    teed = tmp_path / "teed.log"
    # `checkstream run | tee teed.log` in one process group, as a shell runs a pipeline.
    launcher = subprocess.Popen(
        [sys.executable, "-m", "checkstream", "run", "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        process_group=0,  # a group of its own in this session, as a shell job gets
    )
    assert launcher.stdout is not None
    tee = subprocess.Popen(
        ["tee", str(teed)],
        stdin=launcher.stdout,
        stdout=subprocess.DEVNULL,
        process_group=launcher.pid,
    )
    launcher.stdout.close()  # only tee reads the pipe now
    children: dict[int, str] = {}
    try:
        assert wait_until(lambda: teed.exists() and LISTENING in teed.read_text(), 40)
        children = child_processes(launcher.pid)
        assert len(children) == 2, children  # Envoy and one worker
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C: tee dies with the launcher's output
        tee.wait(10)
        code = launcher.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code == 0  # a closed stdout is not a crash
    assert wait_until(lambda: _gone(list(children)), 10), children
    for port in (ports["port"], ports["extproc_port"], ports["envoy_admin_port"]):
        assert wait_until(lambda p=port: _port_free(p), 5), port  # type: ignore[misc]


def test_sigkill_of_the_launcher_takes_envoy_and_the_workers_with_it(
    tmp_path: Path, demo: DemoUpstreamThread
) -> None:
    path, ports = _config(demo, tmp_path)
    gw = start_gateway(path)
    children = child_processes(gw.process.pid)
    assert len(children) == 2, children
    gw.process.send_signal(signal.SIGKILL)
    gw.process.wait(10)
    try:
        assert wait_until(lambda: _gone(list(children)), 15), children
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for port in (ports["port"], ports["extproc_port"]):
        assert wait_until(lambda p=port: _port_free(p), 5), port  # type: ignore[misc]


def test_a_stream_cut_by_the_drain_timeout_is_counted_once(
    tmp_path: Path, demo: DemoUpstreamThread
) -> None:
    ports = gateway_ports()
    config = {
        "server": {"host": "127.0.0.1", "drain_timeout_s": 1, **ports},
        "tenants": {
            "configs": {
                "demo": {
                    "backend_url": f"http://127.0.0.1:{demo.port}/v1",
                    "audit": {"enabled": True},
                }
            }
        },
    }
    gw = start_gateway(write_config(tmp_path, config))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
        headers = {
            "Content-Type": "application/json",
            "X-Tenant-ID": "demo",
            "x-request-id": "cut-by-drain",
            "x-demo-chunks": "100",
            "x-demo-delay-ms": "100",  # 10 s: longer than the drain allows
        }
        conn.request("POST", "/v1/chat/completions", body=STREAM, headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        response.read1(65536)
        gw.process.send_signal(signal.SIGTERM)
        with pytest.raises(http.client.IncompleteRead):
            response.read()
        assert gw.process.wait(30) == 0, gw.log()[-3000:]
    finally:
        gw.stop(signal.SIGKILL)
    with sqlite3.connect(tmp_path / "checkstream-usage.db") as db:
        rows = db.execute("SELECT request_id, status FROM usage").fetchall()
    assert rows == [("cut-by-drain", 499)]
    trail = [
        json.loads(line)
        for path in (tmp_path / "audit" / "demo").glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert [(r["request_id"], r["status"]) for r in trail] == [("cut-by-drain", 499)]
    logged = [(r["request_id"], r["status"]) for r in gw.events("request")]
    assert logged == [("cut-by-drain", 499)]
