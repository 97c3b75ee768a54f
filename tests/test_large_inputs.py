"""Large inputs run away from the event loop and the shared classifier threads.

Inline (regex) classifiers' go to spawned processes that a timeout stops; others' to
threads of their own. Real spawned processes (pebble), real built-in classifiers; the probe
classifiers below say in their results which process or thread ran them and can be held
until the test lets them go.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from checkstream.plugins.pii import PiiDetector
from checkstream.policy.guardrails import PhasePlan, Rule
from checkstream.policy.large_inputs import INLINE_MAX_CHARS, LargeInputs
from checkstream.policy.pipeline import Checker
from checkstream.types import Classification, Span
from tests.support import child_processes

# Runs the real `checkstream` program (or its process pools) as a user would: the e2e tier.
pytestmark = pytest.mark.e2e

BIG = INLINE_MAX_CHARS + 1


class Probe:
    """Reports the pid that classified; ``hold:<path>`` texts wait until ``path`` exists,
    and write ``<path>.started`` (with the pid) first; ``raise:`` texts raise."""

    produces_spans = True
    inline = True

    def __init__(self, name: str = "probe") -> None:
        self.name = name

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        first = texts[0]
        if first.startswith("raise:"):
            raise ValueError("refused by the probe")
        if first.startswith("hold:"):
            gate = Path(first[5:].split()[0])
            Path(f"{gate}.started").write_text(str(os.getpid()))
            while not gate.exists():
                time.sleep(0.01)
        return [Classification(1.0, (Span(0, 1, f"PID_{os.getpid()}"),)) for _ in texts]


class Unpicklable(Probe):
    inline = True

    def __init__(self) -> None:
        super().__init__("unpicklable")
        self.hold = lambda: None  # lambdas cannot be pickled

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        return [Classification(1.0, (Span(0, 1, f"PID_{os.getpid()}"),)) for _ in texts]


class Model:
    """A sync, not inline classifier (like the ONNX ones): reports the thread that ran it;
    ``hold:<path>`` texts wait for ``path`` (writing ``<path>.started`` first)."""

    produces_spans = True

    def __init__(self) -> None:
        self.name = "model"

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        first = texts[0]
        if first.startswith("hold:"):
            gate = Path(first[5:].split()[0])
            Path(f"{gate}.started").touch()
            while not gate.exists():
                time.sleep(0.01)
        label = threading.current_thread().name.split("_")[0].upper().replace("-", "_")
        return [Classification(1.0, (Span(0, 1, label),)) for _ in texts]


def _plan(name: str, tenant: str) -> PhasePlan:
    return PhasePlan((name,), (Rule("r", name, 0.5, "log", None, None),), tenant)


@pytest.fixture
async def processes() -> AsyncIterator[LargeInputs]:
    large = LargeInputs()
    yield large
    large.close()


def _checker(processes: LargeInputs, timeout_s: float = 20.0) -> Checker:
    classifiers = {"probe": Probe(), "unpicklable": Unpicklable(), "model": Model()}
    shared = ThreadPoolExecutor(1, thread_name_prefix="shared")
    return Checker(classifiers, shared, timeout_s, processes)  # type: ignore[arg-type]


async def _pid_of(checker: Checker, name: str, text: str, tenant: str = "t") -> int:
    [result] = await checker.classify(name, [text], tenant)
    return int(result.spans[0].label.removeprefix("PID_"))


async def test_small_inputs_stay_inline_large_ones_go_to_a_process(
    processes: LargeInputs,
) -> None:
    checker = _checker(processes)
    assert await _pid_of(checker, "probe", "x" * INLINE_MAX_CHARS) == os.getpid()
    child = await _pid_of(checker, "probe", "x" * BIG)
    assert child != os.getpid()
    # Through check() too, and the whole verdict comes back.
    verdict = await checker.check(_plan("probe", "t"), ["x" * BIG])
    assert verdict.failure is None and verdict.action == "log"


async def test_results_from_a_process_equal_the_inline_ones(
    processes: LargeInputs,
) -> None:
    pii = PiiDetector("pii_detector")
    block = "card 4111 1111 1111 1111, mail ann@example.com, ssn 123-45-6789. " * 300
    assert len(block) > INLINE_MAX_CHARS
    checker = Checker({"pii_detector": pii}, ThreadPoolExecutor(1), 20.0, processes)
    far = await checker.classify("pii_detector", [block, "nothing here"], "t")
    assert far == pii.classify([block, "nothing here"])
    assert len(far[0].spans) == 900


async def test_a_timeout_stops_the_process_doing_the_work(
    processes: LargeInputs, tmp_path: Path
) -> None:
    gate = tmp_path / "never"
    # 2 s: on a machine busy with other work a child can take over a second to pick the
    # job up, and the test needs the job started before the timeout ends it.
    checker = _checker(processes, timeout_s=2.0)
    processes.warm()
    await _pid_of(checker, "probe", "x" * BIG)  # the processes are up: the timeout is the job's
    verdict = await checker.check(_plan("probe", "t"), [f"hold:{gate} " + "x" * BIG])
    assert verdict.failure == "classifiers probe took longer than 2s"
    started = Path(f"{gate}.started")
    child = int(started.read_text())
    # Terminated, not left running: its pid goes away (zombies are reaped by the pool).
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not _alive(child)
    # The pool replaces it and goes on.
    assert await _pid_of(checker, "probe", "x" * BIG) not in (child, os.getpid())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_one_tenant_holds_one_process_and_others_still_get_theirs(
    processes: LargeInputs, tmp_path: Path
) -> None:
    checker = _checker(processes)
    first, second = tmp_path / "a1", tmp_path / "a2"
    a1 = asyncio.ensure_future(checker.classify("probe", [f"hold:{first} " + "x" * BIG], "a"))
    a2 = asyncio.ensure_future(checker.classify("probe", [f"hold:{second} " + "x" * BIG], "a"))
    deadline = time.monotonic() + 20
    while not Path(f"{first}.started").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert Path(f"{first}.started").exists()
    # Tenant b is served by the other process while a's first job is held.
    assert await asyncio.wait_for(_pid_of(checker, "probe", "x" * BIG, "b"), 20) > 0
    # a's second job waited for a's first: it has not started.
    assert not Path(f"{second}.started").exists()
    first.touch()
    await asyncio.wait_for(a1, 20)
    while not Path(f"{second}.started").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    second.touch()
    await asyncio.wait_for(a2, 20)


async def test_a_classifier_that_cannot_be_pickled_runs_in_a_thread(
    processes: LargeInputs,
) -> None:
    checker = _checker(processes)
    assert await _pid_of(checker, "unpicklable", "x" * BIG) == os.getpid()


async def _thread_of(checker: Checker, text: str, tenant: str = "t") -> str:
    [result] = await checker.classify("model", [text], tenant)
    return result.spans[0].label


async def test_a_models_large_input_never_takes_the_shared_threads(
    processes: LargeInputs,
) -> None:
    checker = _checker(processes)
    assert await _thread_of(checker, "x" * 100) == "SHARED"
    assert await _thread_of(checker, "x" * BIG) == "CLASSIFIER_LARGE"


async def test_a_timed_out_thread_holds_its_tenants_turn_until_it_ends(
    processes: LargeInputs, tmp_path: Path
) -> None:
    """A thread cannot be stopped: its tenant gets no second large job meanwhile, while
    other tenants' large inputs and every small one are still checked."""
    gate = tmp_path / "gate"
    checker = _checker(processes, timeout_s=1.0)
    verdict = await checker.check(_plan("model", "a"), [f"hold:{gate} " + "x" * BIG])
    assert verdict.failure == "classifiers model took longer than 1s"
    assert Path(f"{gate}.started").exists()
    # Still running: tenant a's next large input waits for its turn, and times out.
    verdict = await checker.check(_plan("model", "a"), ["x" * BIG])
    assert verdict.failure == "classifiers model took longer than 1s"
    # Tenant b's large input, and a's small one, are checked meanwhile.
    assert (await checker.check(_plan("model", "b"), ["x" * BIG])).failure is None
    assert (await checker.check(_plan("model", "a"), ["x" * 100])).failure is None
    gate.touch()  # the held thread ends: tenant a's turn comes back
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (await checker.check(_plan("model", "a"), ["x" * BIG])).failure is None:
            break
    else:
        raise AssertionError("tenant a never got its turn back")


async def test_an_error_in_the_process_fails_the_check_naming_the_classifier(
    processes: LargeInputs,
) -> None:
    checker = _checker(processes)
    verdict = await checker.check(_plan("probe", "t"), ["raise: " + "x" * BIG])
    assert verdict.failure == "classifier 'probe': raised ValueError: refused by the probe"


def test_warm_starts_the_processes_before_any_job() -> None:
    def spawned() -> set[int]:
        return {pid for pid, cmd in child_processes(os.getpid()).items() if "spawn_main" in cmd}

    earlier = spawned()  # pools other tests of this run left behind
    large = LargeInputs()
    try:
        large.warm()
        deadline = time.monotonic() + 20
        while len(spawned() - earlier) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(spawned() - earlier) == 2
    finally:
        large.close()
