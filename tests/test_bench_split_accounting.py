"""bench/split_accounting.py's report shaping: paired ratios and the issue #18 verdicts."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import passthrough as pt  # noqa: E402
import split_accounting as sa  # noqa: E402


def _variant(kind: str, limiter: str, rps: list[float], paired: list[float], blocking: float):
    service = pt.Service("envoy", 1, None, Path("unused.log"))  # type: ignore[arg-type]
    name = kind if kind == "pass" else f"{kind}/{limiter}"
    variant = sa.Variant(name, kind, limiter, service, service, Path("unused.db"))
    variant.result.rps = rps
    variant.result.latencies = [0.001, 0.002]
    variant.paired_pass = paired
    variant.msgs = {"blocking.stream_msgs_sent": blocking, "blocking.stream_msgs_received": 1.0}
    return variant


def test_ratios_pair_each_round_with_its_own_pass_measurement() -> None:
    summary = sa.summarize(
        [
            _variant("pass", "memory", [1000, 2000, 1500], [], 1.0),
            # Pairs 600/1000, 700/1000, 2000/2000: 60, 70, 100 -> median 70 (against the
            # pass rounds in order it would be 60, 35, 133).
            _variant("als1", "memory", [600, 700, 2000], [1000, 1000, 2000], 1.0),
            _variant("als2", "redis", [450, 500, 550], [1000, 1000, 1000], 2.0),
            _variant("today", "memory", [900, 900, 900], [1000, 1000, 1000], 4.0),
        ]
    )
    assert summary["pass"]["pct_of_pass"] == 100.0
    assert "verdict" not in summary["pass"]
    assert summary["als1/memory"]["pct_of_pass"] == 70.0
    assert summary["als1/memory"]["verdict"] == "PASS"
    # Redis's target is 50%: 50 passes with 2 blocking messages.
    assert summary["als2/redis"]["pct_of_pass"] == 50.0
    assert summary["als2/redis"]["verdict"] == "PASS"
    # Fast enough, but 4 blocking messages.
    assert summary["today/memory"]["verdict"] == "FAIL"


def test_below_the_memory_target_fails() -> None:
    summary = sa.summarize(
        [
            _variant("pass", "memory", [1000], [], 1.0),
            _variant("als2", "memory", [590], [1000], 2.0),
        ]
    )
    assert summary["als2/memory"]["verdict"] == "FAIL"
