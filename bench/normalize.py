"""What normalisation before classification costs (extproc/normalize.py).

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/normalize.py [--size 1000000] [--rounds 5]

For texts of ``--size`` characters (English-like words, with a phone number and an e-mail
address every ~2 KB): plain ASCII, full-width, Cyrillic look-alikes for ``o``, a zero-width
space after every word, and a ligature plus an accented letter per word. For each, the best
of ``--rounds`` wall times of ``pii_detector`` and ``keyword`` (which fold first), as a ratio
to the same run's baseline: ``pii_detector``'s patterns on the same text unfolded
(``PiiDetector._find_folded``: the cost before normalisation existed). Also the folds alone
and the one-off table build. Ratios, not milliseconds, are what to compare across machines.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from checkstream.normalize import fold_for_keywords, fold_for_patterns, warm_up
from checkstream.plugins.keyword import build_keyword
from checkstream.plugins.pii import PiiDetector


def _best(rounds: int, call: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def _texts(size: int) -> dict[str, str]:
    rng = random.Random(7)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "near",
        "our",
        "project",
        "meeting",
    ]
    pieces: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(words) if rng.random() > 0.002 else "call +44 20 7946 0958 or a@b.co"
        pieces.append(word)
        length += len(word) + 1
    plain = " ".join(pieces)[:size]
    return {
        "ascii": plain,
        "full-width": "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in plain),
        "cyrillic o": plain.replace("o", "\u043e"),
        "zero-width": plain.replace(" ", " \u200b"),
        "ligature+accent": plain.replace("fi", "\ufb01").replace("u", "\u00fc"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    warm_up()
    print(f"tables built in {time.perf_counter() - started:.3f} s (once per process)")
    pii = PiiDetector("pii")
    keyword = build_keyword("k", {"terms": ["project falcon", "internal only"]})
    print(f"{'text':16} {'baseline ms':>11} {'pii x':>6} {'keyword x':>9} {'fold_pat x':>10} "
          f"{'fold_key x':>10}")  # fmt: skip
    for name, text in _texts(args.size).items():
        base = _best(args.rounds, lambda t=text: pii._find_folded(t))
        ratios = [
            _best(args.rounds, call) / base
            for call in (
                lambda t=text: pii.find(t),
                lambda t=text: keyword.classify([t]),
                lambda t=text: fold_for_patterns(t),
                lambda t=text: fold_for_keywords(t),
            )
        ]
        print(f"{name:16} {base * 1000:11.1f} " + " ".join(f"{r:>9.1f}x" for r in ratios))


if __name__ == "__main__":
    main()
