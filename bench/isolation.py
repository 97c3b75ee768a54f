"""Does one tenant's huge prompt delay another tenant's stream on the same worker?

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/isolation.py [--rounds 3] [--prompt-mb 8]

Starts the demo upstream and the gateway (``checkstream run``, one extproc worker) with the
two tenants of ``tests/test_e2e_isolation.py``: ``heavy`` checks prompts with
``pii_detector``, ``streamer``'s streamed answers pass through extproc event by event. Each
round streams a 160-event answer (50 ms apart) for ``streamer`` twice, interleaved: alone
(the baseline), and while ``heavy`` sends a ``--prompt-mb`` digit-heavy prompt. It prints
the stream's largest and 99th-percentile gap between reads in both cases, their ratio, and
what the heavy request got (status, seconds). Target: the largest gap with the huge prompt
under 1 s (PASS/FAIL printed; exit code 0 either way).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import (
    DemoUpstreamThread,
    gateway_ports,
    running_gateway,
    write_config,
    write_policy,
)
from tests.test_e2e_isolation import _huge, _stream, digit_heavy_prompt


def _gaps(reads: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(reads)]


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-mb", type=float, default=8.0)
    args = parser.parse_args()
    prompt = digit_heavy_prompt(int(args.prompt_mb * 1_000_000))
    demo = DemoUpstreamThread().start()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        policy = write_policy(directory, "pii.yaml", [("pii_seen", "pii_detector", "log")])
        backend = f"http://127.0.0.1:{demo.port}/v1"
        config: dict[str, Any] = {
            "server": {"host": "127.0.0.1", **gateway_ports(), "extproc_workers": 1},
            "tenants": {
                "resolution": [{"header": "X-Tenant-ID"}],
                "configs": {
                    "heavy": {
                        "backend_url": backend,
                        "pipeline": {
                            "ingress": {"classifiers": ["pii_detector"]},
                            "midstream": {"classifiers": []},
                        },
                        "policy_path": str(policy),
                    },
                    "streamer": {"backend_url": backend},
                },
            },
        }
        alone: list[float] = []
        loaded: list[float] = []
        heavy: list[tuple[int, float]] = []
        with running_gateway(write_config(directory, config)) as gateway:
            for _ in range(args.rounds):
                for with_heavy in (False, True):
                    reads: list[float] = []
                    started = threading.Event()
                    streaming = threading.Thread(target=_stream, args=(gateway, reads, started))
                    streaming.start()
                    started.wait(20)
                    if with_heavy:
                        outcome: dict[str, Any] = {}
                        _huge(gateway, prompt, outcome)
                        heavy.append((outcome["status"], outcome["answered"] - outcome["sent"]))
                    streaming.join(60)
                    (loaded if with_heavy else alone).extend(_gaps(reads))
    demo.stop()
    print(f"stream gaps over {args.rounds} rounds (160 events, 50 ms apart)")
    print(f"  alone:             max {max(alone):.3f}s  p99 {_p99(alone):.3f}s")
    print(f"  with a {args.prompt_mb:g} MB prompt: max {max(loaded):.3f}s  p99 {_p99(loaded):.3f}s")
    print(f"  ratio of max gaps: {max(loaded) / max(alone):.2f}")
    print("  huge prompt answered: " + ", ".join(f"{s} in {t:.1f}s" for s, t in heavy))
    verdict = "PASS" if max(loaded) < 1.0 else "FAIL"
    print(f"{verdict}: largest gap with the huge prompt {max(loaded):.3f}s (target < 1 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
