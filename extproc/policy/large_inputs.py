"""Where classifiers' large inputs run, away from everyone else's checks (extproc worker).

A regex classifier (``pii_detector``, ``keyword``) takes microseconds on a prompt and about
a second per megabyte of digit-heavy text; ``toxicity`` scores every sentence, about eight
seconds per megabyte. One tenant's 8 MB prompt, checked on the event loop, would stall every
other tenant's streams on that worker past Envoy's message timeout; checked in the shared
classifier threads, it would hold them long after its own timeout, and other tenants'
checks would queue behind it.

So texts over ``INLINE_MAX_CHARS`` go elsewhere:

- inline (regex) classifiers to a small pool of spawned processes: the event loop only waits
  on a pipe, and when the check times out or the request goes away that process is
  terminated (and replaced), so the work stops with it;
- other sync classifiers (models, which cannot be sent to another process cheaply) and
  inline ones that cannot be pickled to threads of their own, never the shared ones.

Each tenant has one such job at a time, counted until the work really ends (a thread cannot
be stopped, so its turn is held until it finishes): its other large checks wait within
their own timeout, and one tenant can never take every process or thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pebble import ProcessPool

from checkstream.types import Classifier

#: Texts up to this many characters in one check are classified where they always were (the
#: event loop for inline classifiers, about 10 ms for the slowest built-in on the worst text).
INLINE_MAX_CHARS = 8192
#: Processes and threads per extproc worker for large inputs; the machine has two cores.
PROCESSES = 2
THREADS = 2


def _classify(classifier_blob: bytes, texts: list[str]) -> Any:
    """In the child: the classifier arrives pickled (it may have been reloaded since the
    last job), texts by value."""
    classifier = pickle.loads(classifier_blob)
    return classifier.classify(texts)


def _ready() -> None:
    """A job that only makes the pool start."""


class LargeInputs:
    """Processes (started on first use or ``warm``) and threads, shared across reloads."""

    def __init__(self, processes: int = PROCESSES, threads: int = THREADS) -> None:
        self.processes = processes
        self._pool: ProcessPool | None = None
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="classifier-large")
        self._turns: dict[str, asyncio.Semaphore] = {}

    async def classify(self, tenant: str, classifier: Classifier, texts: Sequence[str]) -> Any:
        """``classifier.classify(texts)`` away from the event loop and the shared threads;
        raises what it raised. ``tenant`` ("" for callers serving no tenant) takes turns."""
        texts = list(texts)
        blob = None
        if getattr(classifier, "inline", False):
            with contextlib.suppress(Exception):  # pickling runs arbitrary __reduce__ code
                blob = pickle.dumps(classifier)
        if blob is not None:
            payload = blob
            return await self._run(
                tenant, lambda: self._started().schedule(_classify, (payload, texts))
            )
        return await self._run(tenant, lambda: self._threads.submit(classifier.classify, texts))

    async def _run(self, tenant: str, start: Callable[[], Future[Any]]) -> Any:
        turn = self._turns.setdefault(tenant, asyncio.Semaphore(1)) if tenant else None
        if turn is not None:
            await turn.acquire()
        try:
            future = start()
        except BaseException:
            if turn is not None:
                turn.release()
            raise
        if turn is not None:
            loop = asyncio.get_running_loop()

            def release(_: Future[Any]) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: no one waits
                    loop.call_soon_threadsafe(turn.release)

            future.add_done_callback(release)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # Timed out or abandoned: a process is terminated, a running thread cannot be.
            future.cancel()
            raise

    def warm(self) -> None:
        """Start the processes now: a spawned Python takes about a second to come up, which
        the first large input should not wait for."""
        self._started().schedule(_ready)  # pebble starts its processes with the first job

    def _started(self) -> ProcessPool:
        if self._pool is None:
            # Spawned, never forked: a fork of a process running gRPC threads can deadlock.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPool(max_workers=self.processes, context=context)
        return self._pool

    def close(self) -> None:
        """Stop the processes (jobs still running are terminated) and the threads."""
        if self._pool is not None:
            self._pool.stop()  # type: ignore[no-untyped-call]
            self._pool.join(timeout=5)
            self._pool = None
        self._threads.shutdown(wait=False, cancel_futures=True)
