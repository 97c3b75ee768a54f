"""MicroBatcher: concurrent callers share one model call and get exactly their own results."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from checkstream.batching import MicroBatcher


class Model:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.threads: set[int] = set()

    def __call__(self, texts: list[str]) -> list[str]:
        self.calls.append(list(texts))
        self.threads.add(threading.get_ident())
        return [t.upper() for t in texts]


async def test_concurrent_callers_share_a_call_and_keep_their_results() -> None:
    model = Model()
    batcher = MicroBatcher(model, ThreadPoolExecutor(1), max_batch=64, window_ms=20)
    inputs = [[f"tenant{i}-a", f"tenant{i}-b"] for i in range(10)]
    results = await asyncio.gather(*(batcher.run(texts) for texts in inputs))
    assert results == [[t.upper() for t in texts] for texts in inputs]
    assert len(model.calls) < 10
    assert threading.get_ident() not in model.threads  # never on the event loop


async def test_a_full_batch_runs_without_waiting_for_the_window() -> None:
    model = Model()
    batcher = MicroBatcher(model, ThreadPoolExecutor(1), max_batch=4, window_ms=10_000)
    result = await asyncio.wait_for(batcher.run(["a", "b", "c", "d"]), 2)
    assert result == ["A", "B", "C", "D"]


async def test_a_failing_model_fails_every_caller_of_that_batch() -> None:
    def broken(texts: list[str]) -> list[str]:
        raise RuntimeError("boom")

    batcher = MicroBatcher(broken, ThreadPoolExecutor(1), window_ms=5)
    outcomes = await asyncio.gather(batcher.run(["x"]), batcher.run(["y"]), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_wrong_result_count_is_an_error() -> None:
    batcher = MicroBatcher(lambda texts: texts[:-1], ThreadPoolExecutor(1), window_ms=1)
    with pytest.raises(RuntimeError, match="2 results for 3 texts"):
        await batcher.run(["a", "b", "c"])


async def test_empty_input_needs_no_model_call() -> None:
    model = Model()
    assert await MicroBatcher(model, ThreadPoolExecutor(1)).run([]) == []
    assert model.calls == []
