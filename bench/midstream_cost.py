"""Midstream guard cost, before and after the span-safe release (issue #11), in one run.

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/midstream_cost.py [--rounds 7] [--streams 200] [--ref 957912c]

Loads today's ``checkstream.policy.midstream`` and the guard as it was at ``--ref`` (read with
``git show``, its imports pointed at today's packages), and feeds both the same streams in
interleaved rounds: 50-event OpenAI chat streams of prose (``pii_detector`` and a 20-term
keyword list, ``log`` rules, as ``bench/guardrails.py``'s ``mid-pii`` tenant), cut into
network reads of 1 to 3 events. Reported, as medians over the rounds and as the ratio
new / old: CPU per event (``time.process_time``), and the time to first byte as the share
of the answer's events fed before the guard released its first text. Target (#11): both
within 10% of the old guard (ratio <= 1.10). Printed, exit code 0 either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from checkstream.formats import openai  # noqa: E402
from checkstream.plugins.keyword import KeywordClassifier, KeywordSettings  # noqa: E402
from checkstream.plugins.pii import PiiDetector  # noqa: E402
from checkstream.policy import midstream  # noqa: E402
from checkstream.policy.guardrails import PhasePlan, Rule  # noqa: E402
from checkstream.policy.pipeline import Checker  # noqa: E402

_OLD_IMPORTS = {
    "extproc.formats.sse": "checkstream.formats.sse",
    "extproc.formats.texts": "checkstream.formats.texts",
    "extproc.formats": "checkstream.formats",
    "extproc.guardrails": "checkstream.policy.guardrails",
    "extproc.hookspecs": "checkstream.types",
    "extproc.metering": "checkstream.accounting.metering",
    "extproc.pipeline": "checkstream.policy.pipeline",
}
WORDS = [
    "the", "quarterly", "report", "shows", "steady", "growth", "across", "every", "region",
    "and", "the", "team", "expects", "the", "same", "next", "year", "while", "costs", "stay",
    "flat", "and", "customers", "renew", "their", "plans", "on", "time",
]  # fmt: skip


def old_guard_module(ref: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{ref}:extproc/midstream.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for old, new in _OLD_IMPORTS.items():
        source = re.sub(rf"\bfrom {re.escape(old)} import", f"from {new} import", source)
    module = types.ModuleType("midstream_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{ref}:extproc/midstream.py", "exec"), module.__dict__)
    return module


def stream(events: int) -> list[bytes]:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n"

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": f" {WORDS[i % len(WORDS)]}"}) for i in range(events)]
    return [*out, chunk({}, "stop"), b"data: [DONE]\n\n"]


def reads(events: list[bytes]) -> list[bytes]:
    out, i, k = [], 0, 0
    while i < len(events):
        n = (1, 3, 2)[k % 3]
        out.append(b"".join(events[i : i + n]))
        i, k = i + n, k + 1
    return out


def guard(module: types.ModuleType, checker: Checker, plan: PhasePlan) -> Any:
    return module.MidstreamGuard(
        openai.FORMAT,
        checker,
        plan,
        window_tokens=128,
        holdback_tokens=16,
        drop_usage_chunk=False,
        fail_open=False,
        on_verdict=lambda *_: None,
    )


async def measure(
    module: types.ModuleType, checker: Checker, plan: PhasePlan, chunks: list[bytes], n: int
) -> tuple[float, float]:
    """CPU µs per event, and the share of events fed before the first text was released."""
    first_release = []
    started = time.process_time()
    for _ in range(n):
        g = guard(module, checker, plan)
        fed = 0
        seen = None
        for chunk in chunks:
            fed += chunk.count(b"data: ")
            body = (await g.feed(chunk)).body
            if seen is None and b'"content": " ' in body:
                seen = fed
        await g.finish()
        first_release.append((seen or fed) / fed)
    cpu = time.process_time() - started
    events = sum(chunk.count(b"data: ") for chunk in chunks)
    return cpu / (n * events) * 1e6, statistics.median(first_release)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--ref", default="957912c", help="the commit of the old guard")
    args = parser.parse_args()
    terms = [f"codename{i}" for i in range(20)]
    classifiers = {
        "pii_detector": PiiDetector("pii_detector"),
        "banned": KeywordClassifier("banned", KeywordSettings(terms=terms)),
    }
    rules = tuple(
        Rule(name, name, 0.5, "log", None, None)  # type: ignore[arg-type]
        for name in classifiers
    )
    plan = PhasePlan(tuple(classifiers), rules)
    checker = Checker(classifiers, ThreadPoolExecutor(1), 5.0)
    chunks = reads(stream(50))
    old, new = old_guard_module(args.ref), midstream
    results: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name, module in (("old", old), ("new", new)):
            results[name].append(await measure(module, checker, plan, chunks, args.streams))
    cpu = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    ttfb = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    cpu_ratio, ttfb_ratio = cpu["new"] / cpu["old"], ttfb["new"] / ttfb["old"]
    print(f"CPU per event: old {cpu['old']:.1f} µs, new {cpu['new']:.1f} µs, ratio {cpu_ratio:.2f}")
    print(
        f"first text released after: old {ttfb['old']:.0%} of the events, new "
        f"{ttfb['new']:.0%}, ratio {ttfb_ratio:.2f}"
    )
    for label, ratio in (("CPU per event", cpu_ratio), ("time to first byte", ttfb_ratio)):
        print(f"{'PASS' if ratio <= 1.10 else 'FAIL'}: {label} within 10% of the old guard")


if __name__ == "__main__":
    asyncio.run(main())
