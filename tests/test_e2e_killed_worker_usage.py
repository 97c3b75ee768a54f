"""A SIGKILLed worker's stream leaves one usage row (499, estimated), written by the worker
the launcher starts in its place; through real Envoy, extproc and the demo upstream."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.support import (
    DemoUpstreamThread,
    child_processes,
    gateway_ports,
    start_gateway,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e


def _rows(db: Path) -> list[tuple[str, int, int, int, int]]:
    with sqlite3.connect(db) as conn:
        return list(
            conn.execute(
                "SELECT request_id, status, estimated, input_tokens, output_tokens FROM usage"
                " ORDER BY time"
            )
        )


def _workers(pid: int) -> list[int]:
    return [p for p, cmd in child_processes(pid).items() if "checkstream.cli.main serve" in cmd]


def test_a_killed_workers_stream_is_billed_once_as_estimated(
    tmp_path: Path, demo: DemoUpstreamThread
) -> None:
    config = write_config(
        tmp_path,
        {
            "server": {"host": "127.0.0.1", **gateway_ports()},
            "usage": {"path": "./usage.db"},
            "tenants": {
                "configs": {
                    "acme": {
                        "backend_url": f"http://127.0.0.1:{demo.port}/v1",
                        "audit": {"enabled": True},
                    }
                }
            },
        },
    )
    db = tmp_path / "usage.db"
    prompt = "please tell me a long story " * 10  # 280 characters: 70 estimated tokens
    gw = start_gateway(config)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        body = {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": prompt}],
        }
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "X-Tenant-ID": "acme",
                "x-request-id": "doomed-stream",
                "x-demo-chunks": "400",
                "x-demo-delay-ms": "20",
            },
        )
        response = conn.getresponse()
        assert response.status == 200
        assert response.read1(65536)  # text is flowing: the request is in flight
        (worker,) = _workers(gw.process.pid)
        os.kill(worker, signal.SIGKILL)
        with contextlib.suppress(http.client.HTTPException, OSError):
            response.read()  # cut under the client: expected
        conn.close()
        assert wait_until(lambda: "extproc-0 restarted" in gw.log(), 30), gw.log()[-2000:]
        assert wait_until(lambda: db.exists() and bool(_rows(db)), 10), gw.log()[-2000:]
        # A later request is served and billed normally by the new worker.
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        body["stream"] = False
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "X-Tenant-ID": "acme",
                "x-request-id": "after-restart",
                "x-demo-chunks": "3",
            },
        )
        assert conn.getresponse().status == 200
        conn.close()
        assert wait_until(lambda: len(_rows(db)) == 2, 10), _rows(db)
        assert gw.stop() == 0, gw.log()[-3000:]
    finally:
        gw.stop(signal.SIGKILL)
    rows = _rows(db)
    doomed = [r for r in rows if r[0] == "doomed-stream"]
    assert doomed == [("doomed-stream", 499, 1, 70, 0)], rows
    assert [r[0] for r in rows] == ["doomed-stream", "after-restart"]
    trail = "".join(p.read_text() for p in (tmp_path / "audit").rglob("*.jsonl"))
    summaries = [
        json.loads(line)
        for line in trail.splitlines()
        if '"doomed-stream"' in line and '"type":"request"' in line.replace(" ", "")
    ]
    assert [(s["status"], s["tokens_estimated"]) for s in summaries] == [(499, True)]
