"""Per-tenant audit trails: append-only JSON Lines, hash-chained, durable before a reply ends.

Layout: each audited tenant has its own directory holding ``<YYYY-MM-DD>.jsonl`` day files
(mode 0o600, directory 0o700) and a ``.lock`` file. A tenant's records only ever go to its
own directory, so one tenant's trail can never hold another's records. Run by the extproc
workers (``AuditLog`` appends) and the CLI (``audit prune``, tenant offboarding).

Chain: every record gets ``prev`` (the ``hash`` of the record written before it in this
tenant's trail, ``"0" * 64`` for the very first) and ``hash`` (sha256 hex of the record's
canonical JSON with ``prev`` and without ``hash``). The chain runs across day files in date
order. ``verify.py`` detects an edited, removed, inserted or reordered line anywhere after the
first record. An incomplete line at the very end of the trail is reported apart, as
``torn``: a batch cut short by a crash or a full disk, never acknowledged to anyone, which
the next append removes; an incomplete line with records after it is tampering. What a chain
alone cannot detect:

- removal of whole leading day files: ``prune`` does exactly that on purpose, so the first
  remaining record's ``prev`` is accepted as the anchor without a predecessor;
- removal of trailing records or files: the cut trail is still a valid chain. Recording the
  latest hash somewhere else (logs, a ticket) from time to time is what pins the end.

Several writer processes (a replica's extproc workers) share one chain per tenant: each batch
takes an exclusive ``flock`` on the chain's lock file, reads the current last hash from the
newest file (never cached: another process may have written since), appends with one
``os.write`` per file and fsyncs before releasing. One chain per tenant and replica rather
than one per writer keeps ``verify`` and the files independent of how many workers ran.

Within a process, ``AuditLog`` has one writer thread: ``append`` calls that arrive while a
batch is being written wait and go out together, one write and one fsync per tenant file.

Replicas: each record names its ``replica`` (``extproc/ops/replica.py``) and every replica keeps
its own chain in the tenant's directory, ``<YYYY-MM-DD>.<replica>.jsonl`` with lock file
``.<replica>.lock``. Workers of one replica share a host, where ``flock`` works; replicas never
write each other's files, so a shared volume needs no lock across hosts (NFS ``nolock`` is
fine). ``verify`` checks every chain in a directory on its own; a trail from before replicas
(``<YYYY-MM-DD>.jsonl``, ``.lock``) is the chain named ``""`` and still verifies.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from checkstream.accounting.client_text import without_surrogates
from checkstream.config.model import AuditConfig, LoadedConfig
from checkstream.config.yamlsource import ConfigError, Problem

log = logging.getLogger("checkstream.audit")

GENESIS = "0" * 64
LOCK_NAME = ".lock"
# "<day>.jsonl" (the single-replica chain "") or "<day>.<replica>.jsonl".
_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:\.([A-Za-z0-9][A-Za-z0-9._-]{0,62}))?\.jsonl$")
_HASH = re.compile(r"^[0-9a-f]{64}$")
_TAIL_BLOCK = 8192


class AuditError(Exception):
    """A trail cannot be appended to (its last record is unreadable): run ``audit verify``."""


def canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    """The hash a record must carry: over everything but ``hash`` itself, ``prev`` included."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def storable(value: Any) -> Any:
    """``value`` as plain JSON that UTF-8 can hold: lone surrogates replaced, non-finite
    numbers and other objects named in a string, keys made strings."""
    if isinstance(value, str):
        return without_surrogates(value)
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else json.dumps(value)
    if isinstance(value, Mapping):
        return {storable(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return f"<{type(value).__name__}>"


def record_day(value: Any) -> date:
    """UTC day of a record's ``time``: an ISO-8601 string (no offset means UTC) or epoch seconds."""
    if isinstance(value, str):
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(value, UTC)
    else:
        raise ValueError(
            f"audit record time must be an ISO-8601 string or epoch seconds: {value!r}"
        )
    return moment.astimezone(UTC).date()


def chains(directory: Path) -> dict[str, list[tuple[date, Path]]]:
    """Every chain's day files (replica -> files, oldest first; "" is the single-replica
    trail); anything else in the directory is not the trail."""
    found: dict[str, list[tuple[date, Path]]] = {}
    for entry in os.scandir(directory):
        match = _DAY_FILE.match(entry.name)
        if match and entry.is_file(follow_symlinks=False):
            try:
                day = date.fromisoformat(match.group(1))
            except ValueError:
                continue
            found.setdefault(match.group(2) or "", []).append((day, Path(entry.path)))
    return {chain: sorted(files) for chain, files in sorted(found.items())}


def day_files(directory: Path, chain: str = "") -> list[tuple[date, Path]]:
    """One chain's day files, oldest first (``chain`` "" is the single-replica trail)."""
    return chains(directory).get(chain, [])


def every_day_file(directory: Path) -> list[tuple[date, Path]]:
    """The day files of every replica's chain, oldest first (export, purge)."""
    return sorted(
        (entry for files in chains(directory).values() for entry in files),
        key=lambda entry: (entry[0], entry[1].name),
    )


def lock_files(directory: Path) -> list[Path]:
    """Every chain's lock file in ``directory``."""
    return [directory / lock_name(chain) for chain in chains(directory)]


def lock_name(chain: str) -> str:
    return f".{chain}.lock" if chain else LOCK_NAME


def _chain_file(directory: Path, day: date, chain: str) -> Path:
    return directory / (f"{day.isoformat()}.{chain}.jsonl" if chain else f"{day.isoformat()}.jsonl")


@contextmanager
def _locked(directory: Path, mode: int = fcntl.LOCK_EX, chain: str = "") -> Iterator[None]:
    fd = os.open(directory / lock_name(chain), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_line(path: Path) -> bytes | None:
    """The last complete line of ``path``, after cutting off a torn tail.

    Only called under the exclusive lock, so an incomplete last line cannot be a write in
    progress: it is a batch whose writer died or failed before its fsync returned, which was
    never acknowledged to anyone. Cutting it lets the chain go on from the last whole record.
    """
    with path.open("r+b") as file:
        pos = file.seek(0, os.SEEK_END)
        data = b""
        while pos > 0 and data.count(b"\n") < 2:
            step = min(_TAIL_BLOCK, pos)
            pos -= step
            file.seek(pos)
            data = file.read(step) + data
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning(
                "audit: %s ended with an incomplete record (%d bytes, never acknowledged); "
                "cut it off",
                path,
                len(data) - keep,
            )
            file.truncate(pos + keep)
            os.fsync(file.fileno())
            data = data[:keep]
    if not data:
        return None
    return data[:-1].rsplit(b"\n", 1)[-1]


def _chain_head(files: list[tuple[date, Path]]) -> str:
    """Hash of the trail's last record; skips empty files (created by a writer that then died)."""
    for _, path in reversed(files):
        line = _last_line(path)
        if line is None:
            continue
        try:
            last = json.loads(line)
            head = last["hash"]
        except (ValueError, TypeError, KeyError):
            head = None
        if not isinstance(head, str) or not _HASH.match(head):
            raise AuditError(
                f"{path}: the last record has no valid hash; run checkstream audit verify"
            )
        return head
    return GENESIS


def _write_file(path: Path, data: bytes) -> None:
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


def append_records(
    directory: Path, records: Sequence[tuple[date, dict[str, Any]]], chain: str = ""
) -> int:
    """Chain and write ``records`` (day, record) to ``chain`` of the trail in ``directory``;
    returns fsyncs.

    A record goes to its own day's file, or to the newest file if that is later (a request
    stamped before midnight but written after): files then never go back in time, so date
    order is write order and the chain reads straight through them.
    """
    with _locked(directory, chain=chain):
        files = day_files(directory, chain)
        prev = _chain_head(files)
        newest = files[-1][0] if files else None
        by_file: dict[date, list[bytes]] = {}
        for day, record in records:
            if newest is None or day > newest:
                newest = day
            chained = {**record, "prev": prev}
            prev = chained["hash"] = record_hash(chained)
            line = json.dumps(chained, separators=(",", ":"), ensure_ascii=False) + "\n"
            by_file.setdefault(newest, []).append(line.encode("utf-8"))
        for day, lines in by_file.items():  # in date order: days only grow above
            _write_file(_chain_file(directory, day, chain), b"".join(lines))
        return len(by_file)


@dataclass
class _Pending:
    tenant: str
    directory: Path  # fixed when queued: a reload may retarget the log meanwhile
    records: list[tuple[date, dict[str, Any]]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None] = field(init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()

    def settle(self, error: BaseException | None) -> None:
        def done() -> None:
            if self.future.done():  # the request was cancelled; its records are written anyway
                return
            if error is None:
                self.future.set_result(None)
            else:
                self.future.set_exception(error)

        with suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(done)


class AuditLog:
    """All tenants' trails for one process; one writer thread, batched fsync. ``replica``
    names this process's chain (and goes into every record); "" is the single-replica
    layout."""

    def __init__(self, trails: Mapping[str, Path], replica: str = "") -> None:
        self.trails = dict(trails)
        self.replica = replica
        for directory in self.trails.values():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fsyncs = 0  # file fsyncs so far: tests check that batching keeps this low
        #: Trails whose last write failed (the writer thread keeps it; a success clears it).
        self._failing: set[Path] = set()
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="checkstream-audit", daemon=True)
        self._thread.start()

    def audits(self, tenant: str) -> bool:
        return tenant in self.trails

    def failing(self, tenant: str) -> bool:
        """Whether the last write to ``tenant``'s trail failed (none has succeeded since)."""
        directory = self.trails.get(tenant)
        return directory is not None and directory in self._failing

    def retarget(self, trails: Mapping[str, Path]) -> None:
        """Follow a reloaded config: trails added, moved or removed. Records already queued
        still go where they were headed (the writer looks each batch's directory up then)."""
        for directory in trails.values():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.trails = dict(trails)  # one assignment: the writer thread sees old or new

    async def append(self, tenant: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Chain ``records`` onto ``tenant``'s trail; returns once they are on disk (fsync).

        Each record needs ``time`` (ISO-8601, UTC if it has no offset, or epoch seconds),
        which picks its day file; ``prev`` and ``hash`` are added here and must not be given.
        A tenant without a trail (audit absent or disabled): nothing is written. Values JSON
        cannot hold are written replaced (see ``storable``). Raises OSError or AuditError when
        the records could not be made durable.
        """
        if self._closed:
            raise RuntimeError("audit log is closed")
        directory = self.trails.get(tenant)
        if directory is None or not records:
            return
        prepared: list[tuple[date, dict[str, Any]]] = []
        for record in records:
            if "prev" in record or "hash" in record:
                raise ValueError("audit records get prev and hash from the trail, not the caller")
            # A JSON round trip copies the record and makes it exactly what verify will parse.
            # What JSON or UTF-8 cannot hold (a client's lone surrogate, NaN, an object) is
            # replaced rather than refused: a record is never dropped for its values.
            try:
                text = json.dumps(record, ensure_ascii=False, allow_nan=False)
                text.encode("utf-8")
            except (TypeError, ValueError):
                text = json.dumps(storable(record), ensure_ascii=False, allow_nan=False)
            copy = json.loads(text)
            if self.replica:
                copy["replica"] = self.replica
            prepared.append((record_day(copy.get("time")), copy))
        pending = _Pending(tenant, directory, prepared, asyncio.get_running_loop())
        self._queue.put(pending)
        await pending.future

    def prune(self, retention_days: Mapping[str, int], today: date | None = None) -> list[Path]:
        """Remove day files past each tenant's retention. Blocking: call it from a thread."""
        today = today or datetime.now(UTC).date()
        removed: list[Path] = []
        for tenant, days in retention_days.items():
            directory = self.trails.get(tenant)
            if directory is not None:
                removed += prune_trail(directory, days, today)
        return removed

    async def aclose(self) -> None:
        """Write what is queued, then stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            # Whatever queued up during the previous batch's fsync joins this one.
            batch = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._write_batch(batch)

    def _write_batch(self, batch: list[_Pending]) -> None:
        by_trail: dict[Path, list[_Pending]] = {}
        for pending in batch:
            by_trail.setdefault(pending.directory, []).append(pending)
        for directory, waiting in by_trail.items():
            records = [r for pending in waiting for r in pending.records]
            error: BaseException | None = None
            try:
                self.fsyncs += append_records(directory, records, self.replica)
            except BaseException as exc:  # whatever it is, the waiters must hear of it
                log.error("audit: writing %s's trail failed: %s", waiting[0].tenant, exc)
                error = exc
                self._failing.add(directory)
            else:
                self._failing.discard(directory)
            for pending in waiting:
                pending.settle(error)


def prune_trail(path: Path, retention_days: int, today: date) -> list[Path]:
    """Remove the day files of the trail in ``path`` dated before ``today - retention_days``."""
    cutoff = today - timedelta(days=retention_days)
    removed: list[Path] = []
    # Every replica's chain (a dead pod's too), each under its writers' lock so a writer on
    # this host never picks its chain head from a file going away.
    for chain, files in chains(path).items():
        with _locked(path, chain=chain):
            for day, file in files:
                if day < cutoff:
                    file.unlink()
                    removed.append(file)
    if removed:
        _fsync_dir(path)
    return removed


def resolve_audit_dirs(loaded: LoadedConfig) -> dict[str, tuple[Path, AuditConfig]]:
    """Tenants with audit enabled -> (trail directory, their audit config).

    ``audit.path`` is relative to the config file; absent, ``audit/<tenant id>`` beside it.
    Two tenants sharing a directory would share a trail, so that is refused.
    """
    base = loaded.path.parent
    dirs: dict[str, tuple[Path, AuditConfig]] = {}
    owners: dict[Path, str] = {}
    problems: list[Problem] = []
    for tenant_id, tenant in loaded.model.tenants.configs.items():
        audit = tenant.audit
        if audit is None or not audit.enabled:
            continue
        directory = (
            base / Path(audit.path).expanduser() if audit.path else base / "audit" / tenant_id
        )
        owner = owners.setdefault(directory.resolve(), tenant_id)
        if owner != tenant_id:
            problems.append(
                loaded.doc.problem(
                    ("tenants", "configs", tenant_id, "audit", "path"),
                    f"tenant '{owner}' has the same audit directory; each tenant needs its own",
                )
            )
        dirs[tenant_id] = (directory, audit)
    if problems:
        raise ConfigError(problems)
    return dirs
