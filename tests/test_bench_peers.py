"""bench/peers.py's report shaping: the JSON issue #18 asks for, from per-round results."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import passthrough as pt  # noqa: E402
import peers  # noqa: E402


def _result(name: str, rps: list[float], p50_ms: float, cpu: dict[str, float]) -> pt.Result:
    result = pt.Result(name)
    result.rps = rps
    result.latencies = [p50_ms / 1e3] * 5
    result.ttfb = [2 * p50_ms / 1e3]
    result.stream_total = [3 * p50_ms / 1e3]
    result.cpu_us = {kind: [value] for kind, value in cpu.items()}
    return result


def test_ratios_are_medians_of_per_round_ratios_and_name_the_counted_messages() -> None:
    counted = _result("checkstream counted", [500, 300, 400], 3.0, {"extproc": 1200})
    counted.ext_proc_msgs = {"plain": 5.0, "stream": 7.5}
    deferred = _result("checkstream deferred", [700, 420, 600], 1.5, {"extproc": 500})
    deferred.ext_proc_msgs = {"plain": 1.0, "stream": 1.0}
    results = {
        "envoy alone": _result("envoy alone", [2000, 1000, 1600], 0.5, {"envoy": 80}),
        "checkstream pass": _result("checkstream pass", [1000, 600, 1000], 1.0, {"extproc": 300}),
        "checkstream guarded": _result(
            "checkstream guarded", [800, 400, 900], 1.5, {"extproc": 600, "client": 50}
        ),
        "checkstream counted": counted,
        "checkstream deferred": deferred,
        "litellm guarded": _result("litellm guarded", [100, 40, 90], 15.0, {"litellm": 12000}),
    }
    doc = peers.build_summary(results, {"date": "d"})

    assert doc["date"] == "d"
    assert set(doc["setups"]) == set(results)
    ratios = doc["ratios"]
    # Per-round ratios 8, 10, 10: the median, not the ratio of medians (900/90 = 10 too, so
    # check a case where they differ: pass vs envoy rounds 0.5, 0.6, 0.625 -> 0.6).
    assert ratios["rps_vs_litellm"] == 10.0
    assert abs(ratios["pass_vs_envoy_rps"] - 0.6) < 1e-9
    assert abs(ratios["p50_vs_litellm"] - 0.1) < 1e-9
    assert abs(ratios["ttfb_vs_litellm"] - 0.1) < 1e-9
    # The client's CPU is not the server's.
    assert doc["setups"]["checkstream guarded"]["server_cpu_us_per_request"] == 600
    assert abs(ratios["server_cpu_per_request_vs_litellm"] - 0.05) < 1e-9
    # The counted tenant's headline is the deferred path; the inline one is kept beside it.
    assert ratios["counted_blocking_messages_per_request"] == 1.0
    assert ratios["counted_blocking_messages_per_stream"] == 1.0
    assert ratios["counted_inline_blocking_messages_per_request"] == 5.0
    assert ratios["counted_inline_blocking_messages_per_stream"] == 7.5
    # Rounds 0.7, 0.7, 0.6 -> 0.7; inline 0.5, 0.5, 0.4 -> 0.5.
    assert abs(ratios["counted_vs_passthrough_rps"] - 0.7) < 1e-9
    assert ratios["counted_inline_vs_passthrough_rps"] == 0.5
    assert "counted_redis_vs_passthrough_rps" not in ratios  # no Redis setup measured
    assert abs(ratios["counted_added_p50_ms"] - 2.5) < 1e-9


def test_without_litellm_the_litellm_ratios_are_absent() -> None:
    results = {
        "envoy alone": _result("envoy alone", [2000], 0.5, {"envoy": 80}),
        "checkstream pass": _result("checkstream pass", [1000], 1.0, {"extproc": 300}),
    }
    ratios = peers.build_summary(results, {})["ratios"]
    assert "rps_vs_litellm" not in ratios
    assert ratios["pass_vs_envoy_rps"] == 0.5
