"""A real, throwaway PostgreSQL server for tests: free 127.0.0.1 port, data in a temp dir.

The PostgreSQL usage ledger is tested against the real server (ON CONFLICT, transactions and
several writers are what is being tested). CI installs Debian's ``postgresql`` package; only a
missing binary skips, anything else fails loudly. The server refuses to run as root, so when
the tests run as root, ``initdb`` and ``pg_ctl`` run as the ``postgres`` user in a directory it
owns; connections use ``trust`` authentication on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import child_processes, free_port


def _server_bin() -> Path:
    """Debian's server binaries (not on PATH): the newest installed major version."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


BIN = _server_bin()
USER = "checkstream"


def _as_postgres() -> tuple[list[str], int | None]:
    """The command prefix and uid to run server tools with (root may not run them)."""
    if os.geteuid() != 0:
        return [], None
    try:
        uid = pwd.getpwnam("postgres").pw_uid
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
    return ["runuser", "-u", "postgres", "--"], uid


class PostgresServer:
    def __init__(self) -> None:
        self.port = free_port()
        self._prefix, self._uid = _as_postgres()
        self._dir = Path(tempfile.mkdtemp(prefix="checkstream-pg-"))
        self._data = self._dir / "data"
        if self._uid is not None:
            os.chown(self._dir, self._uid, -1)
        self._started = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [*self._prefix, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")

    def start(self) -> PostgresServer:
        self._run(
            str(BIN / "initdb"), "-D", str(self._data), "-U", USER, "-A", "trust",
            "--no-sync", "-E", "UTF8", "--locale", "C",
        )  # fmt: skip
        self.restart()
        return self

    def restart(self) -> None:
        """Start the server on its data directory (again, after ``stop_only``)."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories=''"
            " -c max_connections=200"
        )
        log = self._dir / "server.log"
        self._run(
            str(BIN / "pg_ctl"), "-D", str(self._data), "-l", str(log), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip
        self._started = True

    def stop_only(self) -> None:
        """Stop the server, keeping its data (``restart`` brings it back)."""
        self._run(str(BIN / "pg_ctl"), "-D", str(self._data), "-m", "fast", "-w", "stop")
        self._started = False

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, WAL writer, ...), for CPU accounting."""
        try:
            pid = int((self._data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return []
        return [pid, *child_processes(pid)]

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._started:
            self._run(str(BIN / "pg_ctl"), "-D", str(self._data), "-m", "immediate", "stop")
            self._started = False
        shutil.rmtree(self._dir, ignore_errors=True)


def postgres_available() -> None:
    if not (BIN / "pg_ctl").exists():
        pytest.skip(f"PostgreSQL not installed ({BIN}; apt-get install -y postgresql)")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    postgres_available()
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database of the session's server for one test."""
    return postgres_server.create_database()
