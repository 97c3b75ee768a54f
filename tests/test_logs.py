"""Log records: JSON Lines with fixed fields, or text; a closed stdout is survived (logs.py)."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator

import pytest

from checkstream.ops import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers, root.level = handlers, level
    # Back to the import-time configuration (records to the standard library as JSON).
    import importlib

    importlib.reload(logs)


def test_json_records_have_the_fixed_fields_first(restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure("json", worker=3, stream=out)
    logs.get("checkstream.requests").info("request", request_id="r1", status=200)
    logging.getLogger("checkstream.admin").warning("plain %s", "message")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert list(first)[:4] == ["time", "level", "logger", "event"]
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert (first["level"], first["logger"], first["event"]) == (
        "info",
        "checkstream.requests",
        "request",
    )
    assert (first["worker"], first["request_id"], first["status"]) == (3, "r1", 200)
    assert "replica" in first
    assert (second["level"], second["event"]) == ("warning", "plain message")


def test_text_records_are_for_people(restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure("text", stream=out)
    logs.get("checkstream.launcher").info("listening", url="http://x")
    line = out.getvalue()
    assert "listening" in line and "url=http://x" in line and not line.startswith("{")


def test_a_closed_stdout_never_raises(restore_logging: None) -> None:
    read, write = os.pipe()
    os.close(read)
    stream = os.fdopen(write, "w")
    logs.configure("json", stream=stream)
    for _ in range(3):
        logs.get("x").info("into a pipe nobody reads")  # no BrokenPipeError
    logs.write_line('{"event": "relayed"}')


def test_format_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logs.LOG_FORMAT_ENV, raising=False)
    assert logs.default_format(io.StringIO()) == "json"  # not a terminal
    assert logs.resolve_format("text") == "text"
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "text")
    assert logs.resolve_format(None) == "text"


def test_child_lines_are_told_apart() -> None:
    assert logs.is_json_object('{"event": "x"}')
    assert not logs.is_json_object("[2026-12-07][warning] envoy says")
    assert not logs.is_json_object("{not json")
    assert not logs.is_json_object("[1, 2]")
