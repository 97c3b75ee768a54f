"""Precision, recall, F1 and ROC AUC of the shipped topic presets on labelled fixtures.

Run ``python -m plugins.eval_topics [PRESET...] [--latency]`` (default: every preset that has
a fixture ``tests/fixtures/topics/<preset>.tsv``).

A fixture has one example per line, ``label<TAB>text``, label ``1`` (a request the preset
should catch) or ``0`` (one it should let through; many are deliberate near misses: general
education, news, history, paperwork on the same subject). No fixture sentence may also be an
example of its preset (compared case- and whitespace-insensitively), or the scores would
measure memory rather than generalisation: ``load_fixture`` refuses such a file.

For each preset the script prints ROC AUC (threshold-free: the chance that a random
positive outscores a random negative) and the threshold maximising F1 with its precision,
recall and F1, and a held-out F1 (threshold chosen on one half, measured on the other,
averaged over both ways). Thresholds are placed half-way between neighbouring scores, so that a tiny
shift in a score does not flip the example the threshold was chosen on. The fixtures were
written by the same people as the presets, so treat the numbers as optimistic: they say the
preset separates these sentences, not that it will on real traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from plugins.embeddings import shared_minilm
from plugins.topic import TopicClassifier, load_preset, presets

#: Repeated and cut to length for latency runs: an ordinary advice request.
LATENCY_TEXT = (
    "Could you tell me whether I should move my retirement savings into a global index "
    "fund now, given that I am forty and have a mortgage and two children?"
)
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "topics"


@dataclass(frozen=True)
class Example:
    line: int
    label: int
    text: str


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def load_fixture(path: Path, preset_examples: Sequence[str] = ()) -> list[Example]:
    """Parse ``path``; ValueError naming the line for a malformed line or a preset example."""
    banned = {_normalise(e) for e in preset_examples}
    examples = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        label, tab, text = raw.partition("\t")
        if not tab or label not in ("0", "1") or not text.strip():
            raise ValueError(f"{path}:{number}: expected '1<TAB>text' or '0<TAB>text'")
        if _normalise(text) in banned:
            raise ValueError(f"{path}:{number}: the text is also an example of the preset")
        examples.append(Example(number, int(label), text))
    return examples


def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    positives, negatives = s[y], s[~y]
    if not len(positives) or not len(negatives):
        raise ValueError("ROC AUC needs at least one positive and one negative")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


@dataclass(frozen=True)
class Operating:
    threshold: float
    precision: float
    recall: float
    f1: float


def at_threshold(scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float) -> Operating:
    """Precision, recall and F1 when ``score >= threshold`` means positive."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    predicted = s >= threshold
    tp = int((predicted & y).sum())
    fp = int((predicted & ~y).sum())
    fn = int((~predicted & y).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Operating(threshold, precision, recall, f1)


def best_threshold(scores: npt.ArrayLike, labels: npt.ArrayLike) -> Operating:
    """The operating point with the highest F1 (on ties, the higher threshold: fewer
    false alarms for the same F1), thresholds half-way between distinct scores."""
    distinct = np.unique(np.asarray(scores, dtype=np.float64))
    candidates = [*((distinct[:-1] + distinct[1:]) / 2), distinct[0]]
    points = [at_threshold(scores, labels, float(t)) for t in candidates]
    return max(points, key=lambda p: (round(p.f1, 12), p.threshold))


def held_out_f1(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Mean F1 of two folds, each scored at the threshold chosen on the other fold.

    The best-F1 threshold is fitted to the very set it is measured on, so its F1 is
    optimistic; this is the honest estimate of what the chosen threshold does on new text.
    Folds alternate within each label, so both keep the label balance.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    fold = np.zeros(len(s), dtype=bool)
    for value in (False, True):
        (where,) = np.nonzero(y == value)
        fold[where[1::2]] = True
    f1s = []
    for chosen in (fold, ~fold):
        threshold = best_threshold(s[chosen], y[chosen]).threshold
        f1s.append(at_threshold(s[~chosen], y[~chosen], threshold).f1)
    return float(np.mean(f1s))


@dataclass(frozen=True)
class Evaluation:
    preset: str
    examples: int
    positives: int
    auc: float
    best: Operating
    held_out_f1: float
    scores: tuple[float, ...]  # per fixture line, for operating points at other thresholds
    truth: tuple[int, ...]


def evaluate(preset: str, fixture: Path | None = None) -> Evaluation:
    labels = load_preset(preset)
    path = fixture or FIXTURES / f"{preset}.tsv"
    examples = load_fixture(path, [e for values in labels.values() for e in values])
    classifier = TopicClassifier(preset, labels)
    scores = [c.score for c in classifier.classify_now([e.text for e in examples])]
    truth = [e.label for e in examples]
    return Evaluation(
        preset,
        len(examples),
        sum(truth),
        roc_auc(scores, truth),
        best_threshold(scores, truth),
        held_out_f1(scores, truth),
        tuple(scores),
        tuple(truth),
    )


def print_table(results: Sequence[Evaluation]) -> None:
    print(
        f"{'preset':<18} {'n':>4} {'pos':>4} {'AUC':>6} {'thresh':>7} {'P':>6} {'R':>6} "
        f"{'F1':>6} {'F1 held-out':>12}"
    )
    for r in results:
        b = r.best
        print(
            f"{r.preset:<18} {r.examples:>4} {r.positives:>4} {r.auc:>6.3f} {b.threshold:>7.3f} "
            f"{b.precision:>6.3f} {b.recall:>6.3f} {b.f1:>6.3f} {r.held_out_f1:>12.3f}"
        )


def text_of_tokens(tokens: int) -> str:
    """An English text that MiniLM's tokenizer splits into exactly ``tokens`` tokens
    ([CLS] and [SEP] included), for latency measurements."""
    tokenizer = shared_minilm().tokenizer
    words = LATENCY_TEXT.split() * 20
    for n in range(len(words), 0, -1):
        text = " ".join(words[:n])
        if len(tokenizer.encode(text).ids) <= tokens:
            return text
    raise ValueError(f"cannot build a text of {tokens} tokens")


def latency(classifier: TopicClassifier, batch: int, tokens: int = 128) -> tuple[float, float]:
    """Median and 90th-percentile milliseconds of one ``classify_now`` call."""
    texts = [text_of_tokens(tokens)] * batch
    for _ in range(3):
        classifier.classify_now(texts)
    times = []
    for _ in range(max(10, 80 // batch)):
        start = time.perf_counter()
        classifier.classify_now(texts)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), statistics.quantiles(times, n=10)[-1]


def concurrent_latency(classifier: TopicClassifier, callers: int = 16, tokens: int = 128) -> float:
    """Median milliseconds until all of ``callers`` concurrent one-text ``classify`` calls
    are answered: what the micro-batcher achieves for simultaneous requests."""
    text = text_of_tokens(tokens)

    async def burst() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(classifier.classify([text]) for _ in range(callers)))
        return (time.perf_counter() - start) * 1000

    async def run() -> list[float]:
        await burst()
        return [await burst() for _ in range(8)]

    return statistics.median(asyncio.run(run()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("presets", nargs="*", help="presets to evaluate (default: all)")
    parser.add_argument("--latency", action="store_true", help="also time batch 1 and 16")
    args = parser.parse_args(argv)
    names = args.presets or [p for p in presets() if (FIXTURES / f"{p}.tsv").exists()]
    results = [evaluate(name) for name in names]
    print_table(results)
    if args.latency:
        classifier = TopicClassifier("latency", load_preset(names[0]))
        for batch in (1, 16):
            median, p90 = latency(classifier, batch)
            print(
                f"latency, {batch:>2} x 128 tokens: median {median:.1f} ms "
                f"({median / batch:.1f} ms/text), p90 {p90:.1f} ms"
            )
        burst = concurrent_latency(classifier)
        print(f"latency, 16 concurrent classify([text]) calls, all answered: median {burst:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
