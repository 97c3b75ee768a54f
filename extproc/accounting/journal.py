"""The worker's journal of requests still open, so a killed worker's streams are billed.

A worker that is SIGKILLed (or crashes) never runs ``Accounts.finish`` for the requests it
had in flight: without this file they would leave no usage row although tokens streamed.
Each worker appends one line when a counted request goes to its backend and one when its
closing has written the ledger row; the worker started next on the same index (the
launcher's restart) reads what its predecessor left open, records each such request as
status 499 with ``estimated`` tokens and empties the file (``killed_requests.py``).

Cheap by design: one small ``write`` per line, no fsync. A killed process keeps what it
wrote in the OS page cache, so the journal survives exactly the failure it is for; only a
machine crash or power loss can lose its last lines (the ledger and audit trail would then
be restarted from scratch by the operator anyway). The file is append-only and rewritten
with only the open lines once it holds many closed ones.

Run by the worker. One file per worker index (named by its port, which the index fixes) in
the launcher's control directory; only one live process ever writes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from checkstream.ops import logs

log = logs.get("checkstream.journal")

#: Rewrite the file when it holds this many more lines than requests still open.
COMPACT_AFTER_LINES = 4096


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """What a journal remembers of a request, enough to bill it if its worker dies."""

    tenant: str
    request_id: str
    model: str
    #: Wall-clock start (time.time()).
    started: float
    prompt_chars: int
    reserved_tokens: int
    client_request_id: str | None = None

    def line(self, key: int) -> str:
        fields = {
            "k": key,
            "tenant": self.tenant,
            "request_id": self.request_id,
            "model": self.model,
            "started": self.started,
            "prompt_chars": self.prompt_chars,
            "reserved_tokens": self.reserved_tokens,
            "client_request_id": self.client_request_id,
        }
        return "o " + json.dumps(fields, separators=(",", ":")) + "\n"


def journal_path(control_dir: Path, port: int) -> Path:
    return control_dir / f"open-requests-{port}.jsonl"


class Journal:
    """The open requests of this worker, mirrored to a file that outlives a kill."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._open: dict[int, str] = {}
        self._next = 1
        self._lines = 0
        # Line-buffered text append: each line reaches the kernel with one write() call.
        self._file = path.open("a", encoding="utf-8", buffering=1)

    def opened(self, request: OpenRequest) -> int:
        """Remember ``request``; returns the key that ``closed`` takes."""
        key = self._next
        self._next += 1
        line = request.line(key)
        self._open[key] = line
        self._write(line)
        return key

    def closed(self, key: int) -> None:
        if self._open.pop(key, None) is None:
            return
        self._write(f"c {key}\n")
        if self._lines > COMPACT_AFTER_LINES + 2 * len(self._open):
            self._compact()

    def close(self) -> None:
        self._file.close()

    def _write(self, line: str) -> None:
        try:
            self._file.write(line)
        except (OSError, ValueError) as exc:  # a full disk must not fail the request
            log.error("journal_error", path=str(self.path), error=str(exc))
        self._lines += 1

    def _compact(self) -> None:
        fresh = self.path.with_suffix(".tmp")
        try:
            fresh.write_text("".join(self._open.values()), encoding="utf-8")
            os.replace(fresh, self.path)
        except OSError as exc:
            log.error("journal_error", path=str(self.path), error=str(exc))
            return
        self._file.close()
        self._file = self.path.open("a", encoding="utf-8", buffering=1)
        self._lines = len(self._open)


def read_open(path: Path) -> list[OpenRequest]:
    """The requests ``path`` holds open, in the order they were opened. A torn last line
    (the kill came mid-write) and unreadable lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    found: dict[int, OpenRequest] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        try:
            if kind == "c":
                found.pop(int(rest), None)
            elif kind == "o":
                fields = json.loads(rest)
                found[int(fields["k"])] = OpenRequest(
                    tenant=str(fields["tenant"]),
                    request_id=str(fields["request_id"]),
                    model=str(fields["model"]),
                    started=float(fields["started"]),
                    prompt_chars=int(fields["prompt_chars"]),
                    reserved_tokens=int(fields["reserved_tokens"]),
                    client_request_id=fields.get("client_request_id"),
                )
        except (ValueError, KeyError, TypeError):
            continue
    return list(found.values())
