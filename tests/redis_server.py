"""A real, throwaway `redis-server` for tests: free 127.0.0.1 port, no persistence.

Tests of the Redis limiter run against the real server (Lua, atomicity and TIME are what is
being tested; a fake would test the fake). CI installs the Debian `redis-server` package; only
a missing binary skips, anything else fails loudly.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from tests.support import free_port

BINARY = "redis-server"


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"redis-server exited ({self._proc.returncode}): {err}")
            if _ping(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}")

    def forget(self, *patterns: str) -> None:
        """Delete the keys matching ``patterns`` (glob, or plain key names): the server
        lives for the whole session, so a module starts its tenants from zero."""
        client = redis.Redis.from_url(self.url)
        try:
            stale = [key for pattern in patterns for key in client.scan_iter(match=pattern)]
            if stale:
                client.delete(*stale)
        finally:
            client.close()

    def pause(self) -> None:
        """A stall: the server keeps its connections but answers nothing until `resume`."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None


def redis_binary() -> str:
    binary = shutil.which(BINARY)
    if binary is None:
        pytest.skip(f"{BINARY} not installed (apt-get install -y redis-server)")
    return binary


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(redis_binary()).start()
    yield server
    server.stop()
