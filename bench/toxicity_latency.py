"""What one ``toxicity`` check costs per 128-token window, by how much of it reaches MiniLM.

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/toxicity_latency.py [--rounds 5]

The classifier's third stage (MiniLM, all six layers) runs only on sentences its static head
is unsure of, so the cost depends on the text. Three kinds of window, 16 of each, exactly 128
WordPiece tokens (no special tokens), timed at batch 1 in alternating rounds:

- ``prose``: ``bench/classifiers.py``'s ordinary English windows;
- ``held-out benign`` / ``held-out toxic``: the benign or toxic texts of
  ``bench/heldout/toxicity_fresh.jsonl`` run together (look-alikes, medicine, threats,
  insults: the sentences most likely to reach MiniLM).

Per kind: median and p90 wall time and median CPU time (``time.process_time``, which waiting
for a core does not inflate) per call, the share of sentences that reached MiniLM, and the
same for the first stage alone (the previous classifier). Target: <= 5 ms per window.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from classifiers import WINDOW_TOKENS, make_windows  # noqa: E402

from checkstream.plugins.embeddings import TOKENIZER  # noqa: E402
from checkstream.plugins.profanity_masks import unmask  # noqa: E402
from checkstream.plugins.toxicity import ToxicityClassifier, create, sentences_of  # noqa: E402

FRESH = REPO / "bench" / "heldout" / "toxicity_fresh.jsonl"
WINDOWS = 16


def held_out_windows(label: int) -> list[str]:
    """WINDOWS windows of exactly WINDOW_TOKENS tokens cut from the held-out texts."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    rows = [json.loads(line) for line in FRESH.read_text().splitlines() if line.strip()]
    texts = [r["text"] for r in rows if r["label"] == label]
    windows = []
    for i in range(WINDOWS):
        text = " ".join(texts[(i * 5 + k) % len(texts)] for k in range(len(texts)))
        end = tokenizer.encode(text, add_special_tokens=False).offsets[WINDOW_TOKENS - 1][1]
        windows.append(text[:end])
    return windows


def reach(classifier: ToxicityClassifier, windows: list[str]) -> float:
    """Share of the windows' sentences the context head scores."""
    sentences = [s for w in windows for s in sentences_of(w)]
    static = classifier.head.static(classifier.features(sentences))
    return float(np.mean(static >= classifier.head.context_from))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    classifier = create("toxicity", {})
    classifier.load()
    kinds = {
        "prose": make_windows(WINDOWS),
        "held-out benign": held_out_windows(0),
        "held-out toxic": held_out_windows(1),
    }

    def first_stage(window: str) -> object:
        return classifier.features.profanity([unmask(s) for s in sentences_of(window)])

    calls: dict[tuple[str, str], Callable[[str], object]] = {}
    for kind in kinds:
        calls[(kind, "toxicity")] = lambda w: classifier.classify([w])
        calls[(kind, "first stage only")] = first_stage
    wall: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for key, call in calls.items():  # warm-up
        for window in kinds[key[0]]:
            call(window)
    for _ in range(args.rounds):
        for key, call in calls.items():
            for window in kinds[key[0]]:
                start, start_cpu = time.perf_counter(), time.process_time()
                call(window)
                wall[key].append(time.perf_counter() - start)
                cpu[key].append(time.process_time() - start_cpu)
    print(f"{'windows':<17} {'call':<17} {'p50 ms':>7} {'p90 ms':>7} {'CPU ms':>7}  to MiniLM")
    for (kind, name), times in wall.items():
        share = f"{reach(classifier, kinds[kind]):.0%} of sentences" if name == "toxicity" else ""
        print(
            f"{kind:<17} {name:<17} {np.median(times) * 1e3:>7.2f} "
            f"{np.percentile(times, 90) * 1e3:>7.2f} {np.median(cpu[(kind, name)]) * 1e3:>7.2f}"
            f"  {share}"
        )


if __name__ == "__main__":
    main()
