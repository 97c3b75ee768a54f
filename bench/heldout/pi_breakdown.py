"""Held-out breakdown of a ``prompt_injection`` model file the CLI does not give: non-English
attacks caught per language, and recall / false-positive rates of the issue-#15 targets
(benign 200+ characters) at a few thresholds (CLI tool).

Run ``.venv/bin/python -m bench.heldout.pi_breakdown [MODEL.onnx] [--threshold T]``
(default: the shipped model at its recommended threshold). Overall, per-length and
per-source numbers come from ``checkstream classifiers eval ... [--by length]``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.heldout import pi_texts
from checkstream.plugins.prompt_injection import MODEL, PromptInjectionClassifier

HELDOUT = Path(__file__).with_name("prompt_injection.jsonl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=MODEL)
    parser.add_argument("--threshold", type=float, help="default: the model's recommended one")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines()]
    classifier = PromptInjectionClassifier("breakdown", args.model)
    threshold = args.threshold or classifier.recommended_threshold
    scores = np.array([c.score for c in classifier.classify([r["text"] for r in rows])])
    labels = np.array([r["label"] for r in rows])
    long_benign = np.array([r["label"] == 0 and len(r["text"]) >= 200 for r in rows])

    language = {text: lang for lang, text in pi_texts.ATTACKS_OTHER}
    caught: dict[str, list[bool]] = defaultdict(list)
    for row, score in zip(rows, scores, strict=True):
        if row["source"] == "attack_non_en":
            caught[language[row["text"]]].append(bool(score >= threshold))
    print(f"{args.model} at {threshold:g}")
    print(
        "non-English attacks caught: "
        + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in sorted(caught.items()))
    )
    print("| threshold | recall | FPR | FPR, benign 200+ chars |\n|---|---|---|---|")
    for t in sorted({0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, threshold}):
        flagged = scores >= t
        print(
            f"| {t:g} | {flagged[labels == 1].mean():.3f} | {flagged[labels == 0].mean():.3f} "
            f"| {flagged[long_benign].mean():.3f} |"
        )


if __name__ == "__main__":
    main()
