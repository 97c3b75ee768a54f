"""Inline classifiers' large inputs, checked in worker processes (run by each extproc worker).

A regex classifier (``pii_detector``, ``keyword``) takes microseconds on a prompt and about
a second per megabyte of digit-heavy text. Run on the event loop, one tenant's 8 MB prompt
would stall every other tenant's streams on that worker past Envoy's message timeout; run in
a thread, it would still hold the GIL most of the time and could not be stopped. Here it
runs in a separate process: the event loop only waits on a pipe, and when the check times
out or the request goes away, that process is terminated (and replaced), so the work stops
with it.

Each tenant has one such job at a time; its other large checks wait their turn within
their own timeout, so one tenant cannot take every process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle
from collections.abc import Sequence
from typing import Any

from pebble import ProcessPool

from extproc.hookspecs import Classifier

log = logging.getLogger("checkstream.extproc")

#: Texts up to this many characters in one check are classified on the event loop (about
#: 10 ms for the slowest built-in on the worst text); longer ones go to a process.
INLINE_MAX_CHARS = 8192
#: Processes per extproc worker: each holds one job, the machine has two cores.
PROCESSES = 2


class NotSendable(Exception):
    """The classifier cannot be pickled, so it cannot run in another process."""


def _classify(classifier_blob: bytes, texts: list[str]) -> Any:
    """In the child: the classifier arrives pickled (it may have been reloaded since the
    last job), texts by value."""
    classifier = pickle.loads(classifier_blob)
    return classifier.classify(texts)


class ClassifierProcesses:
    """A small pool of spawned processes, started on first use (or ``warm``) and shared
    across reloads."""

    def __init__(self, processes: int = PROCESSES) -> None:
        self.processes = processes
        self._pool: ProcessPool | None = None
        self._turns: dict[str, asyncio.Semaphore] = {}

    async def classify(self, tenant: str, classifier: Classifier, texts: Sequence[str]) -> Any:
        """``classifier.classify(texts)`` in a child process; raises what it raised there,
        or NotSendable."""
        try:
            blob = pickle.dumps(classifier)
        except Exception as exc:  # pickling runs arbitrary __reduce__ code
            raise NotSendable(f"{type(exc).__name__}: {exc}") from exc
        if not tenant:  # callers that serve no tenant (the classifier server) share the pool
            return await self._run(blob, texts)
        async with self._turns.setdefault(tenant, asyncio.Semaphore(1)):
            return await self._run(blob, texts)

    async def _run(self, blob: bytes, texts: Sequence[str]) -> Any:
        future = self._started().schedule(_classify, args=(blob, list(texts)))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # Timed out or abandoned: terminating the child is the only way to stop it.
            future.cancel()  # type: ignore[no-untyped-call]
            raise

    def warm(self) -> None:
        """Start the processes now: a spawned Python takes about a second to come up, which
        the first large input should not wait for."""
        self._started()

    def _started(self) -> ProcessPool:
        if self._pool is None:
            # Spawned, never forked: a fork of a process running gRPC threads can deadlock.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPool(max_workers=self.processes, context=context)
        return self._pool

    def close(self) -> None:
        """Stop the processes (jobs still running are terminated)."""
        if self._pool is not None:
            self._pool.stop()  # type: ignore[no-untyped-call]
            self._pool.join(timeout=5)
            self._pool = None
