"""Quality and cost of the shipped topic presets, on labelled fixtures and ordinary text.

Run ``python -m plugins.eval_topics [PRESET...] [--latency]`` (default: every preset that has
a fixture ``tests/fixtures/topics/<preset>.tsv``).

A fixture has one example per line, ``label<TAB>text``, label ``1`` (a request the preset
should catch) or ``0`` (one it should let through; many are deliberate near misses: general
education, news, history, paperwork on the same subject). No fixture sentence may also be an
example of its preset (compared case- and whitespace-insensitively), or the scores would
measure memory rather than generalisation: ``load_fixture`` refuses such a file.

For each preset the script prints, for the classifier as served (prefilter, then MiniLM)
and for MiniLM alone: ROC AUC (threshold-free: the chance that a random positive outscores
a random negative), the threshold maximising F1 with its precision, recall and F1, a
held-out F1 (threshold chosen on one half, measured on the other, averaged over both ways),
and precision, recall and F1 at the preset's recommended threshold. Thresholds are placed
half-way between neighbouring scores, so that a tiny shift in a score does not flip the
example the threshold was chosen on.

Then the prefilter: at each of its two stages (static, first layer), the lowest score of
a fixture positive (what the preset's threshold must stay below; the shipped thresholds
are those minus the stage's margin, rounded down: ``recommended_prefilter``), the recall
thresholds chosen that way keep on positives they were not chosen on (two folds), and the
share of each pool of texts that each stage stops or lets on to MiniLM: the fixture's
positives and near misses,
the other presets' positives, ``plugins/topics/eval/ordinary.txt`` (advice-framed requests
on other subjects, everyday requests), the chit-chat of ``plugins/training/data/``, and
128-token windows of ``plugins/topics/eval/prose.txt``; last, windows of that prose with one
fixture positive inside, caught by MiniLM alone and as served.

The fixtures and ordinary texts were written by the same people as the presets, so treat
the numbers as optimistic: they say the preset separates these sentences, not that it will
on real traffic.
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
from tokenizers import Tokenizer

from checkstream.plugins.embeddings import TOKENIZER, shared_minilm
from checkstream.plugins.topic import (
    FIRST_LAYER_MARGIN,
    PRESETS_DIR,
    STATIC_MARGIN,
    Prefilter,
    TopicClassifier,
    load_preset,
    preset_prefilter,
    preset_threshold,
    presets,
)

#: Repeated and cut to length for latency runs: an ordinary advice request.
LATENCY_TEXT = (
    "Could you tell me whether I should move my retirement savings into a global index "
    "fund now, given that I am forty and have a mortgage and two children?"
)
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "topics"
ORDINARY = PRESETS_DIR / "eval" / "ordinary.txt"
PROSE = PRESETS_DIR / "eval" / "prose.txt"
CHITCHAT = [
    Path(__file__).resolve().parent / "training" / "data" / f"chitchat_{split}.txt"
    for split in ("train", "heldout")
]
WINDOW_TOKENS = 128


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


def read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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


def _folds(labels: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Two folds alternating within each label, so both keep the label balance."""
    fold = np.zeros(len(labels), dtype=bool)
    for value in (False, True):
        (where,) = np.nonzero(labels == value)
        fold[where[1::2]] = True
    return fold


def held_out_f1(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Mean F1 of two folds, each scored at the threshold chosen on the other fold.

    The best-F1 threshold is fitted to the very set it is measured on, so its F1 is
    optimistic; this is the honest estimate of what the chosen threshold does on new text.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    fold = _folds(y)
    f1s = []
    for chosen in (fold, ~fold):
        threshold = best_threshold(s[chosen], y[chosen]).threshold
        f1s.append(at_threshold(s[~chosen], y[~chosen], threshold).f1)
    return float(np.mean(f1s))


def held_out_prefilter_recall(
    stage_scores: Sequence[npt.ArrayLike], labels: npt.ArrayLike, margins: Sequence[float]
) -> float:
    """Mean over two folds of the share of one fold's positives that pass every stage when
    each stage's threshold is the other fold's lowest positive score minus its margin."""
    scores = [np.asarray(s, dtype=np.float64) for s in stage_scores]
    y = np.asarray(labels, dtype=bool)
    fold = _folds(y)
    recalls = []
    for chosen in (fold, ~fold):
        passed = np.ones(len(y), dtype=bool)
        for s, margin in zip(scores, margins, strict=True):
            passed &= s >= s[chosen & y].min() - margin
        recalls.append(float(passed[~chosen & y].mean()))
    return float(np.mean(recalls))


def held_out_served_f1(
    static: npt.ArrayLike, first: npt.ArrayLike, minilm: npt.ArrayLike, labels: npt.ArrayLike
) -> float:
    """Like ``held_out_f1`` for the classifier as served, with the prefilter thresholds
    (``recommended_prefilter``'s rule) also chosen on the other fold: nothing about the
    measured half is used to set it up."""
    y = np.asarray(labels, dtype=bool)
    fold = _folds(y)
    f1s = []
    for chosen in (fold, ~fold):
        prefilter = recommended_prefilter(static, first, y & chosen)
        served = served_scores(static, first, minilm, prefilter)
        threshold = best_threshold(served[chosen], y[chosen]).threshold
        f1s.append(at_threshold(served[~chosen], y[~chosen], threshold).f1)
    return float(np.mean(f1s))


def served_scores(
    static: npt.ArrayLike, first: npt.ArrayLike, minilm: npt.ArrayLike, prefilter: Prefilter
) -> npt.NDArray[np.float64]:
    """MiniLM's scores where both prefilter stages pass, 0 elsewhere: what the classifier
    returns (``TopicClassifier.classify``)."""
    passed = (np.asarray(static) >= prefilter.static) & (np.asarray(first) >= prefilter.first_layer)
    return np.where(passed, np.asarray(minilm, dtype=np.float64), 0.0)


def recommended_prefilter(
    static_scores: npt.ArrayLike, first_layer_scores: npt.ArrayLike, labels: npt.ArrayLike
) -> Prefilter:
    """Each stage's lowest positive score minus its margin, rounded down to 0.01 (the
    labels select the positives: pass a mask of one fold's positives to use only those)."""
    y = np.asarray(labels, dtype=bool)

    def threshold(scores: npt.ArrayLike, margin: float) -> float:
        lowest = float(np.asarray(scores, dtype=np.float64)[y].min())
        return float(np.floor((lowest - margin) * 100) / 100)

    return Prefilter(
        static=threshold(static_scores, STATIC_MARGIN),
        first_layer=threshold(first_layer_scores, FIRST_LAYER_MARGIN),
    )


@dataclass(frozen=True)
class Summary:
    """Threshold-free and thresholded quality of one set of scores on a fixture."""

    auc: float
    best: Operating
    #: For the classifier as served, prefilter thresholds are chosen on the other fold too.
    held_out_f1: float
    recommended: Operating

    @classmethod
    def of(cls, scores: Sequence[float], truth: Sequence[int], threshold: float) -> Summary:
        return cls(
            roc_auc(scores, truth),
            best_threshold(scores, truth),
            held_out_f1(scores, truth),
            at_threshold(scores, truth, threshold),
        )


@dataclass(frozen=True)
class Evaluation:
    preset: str
    examples: int
    positives: int
    auc: float  # the classifier as served (prefilter, then MiniLM)
    best: Operating
    held_out_f1: float
    scores: tuple[float, ...]  # per fixture line, for operating points at other thresholds
    truth: tuple[int, ...]
    served: Summary
    minilm: Summary  # MiniLM on every text, no prefilter
    #: As served, on the fixture plus OTHER_SUBJECTS as negatives: the recommended
    #: threshold is chosen here, as real traffic has both.
    wider: Summary
    prefilter: Prefilter | None  # the thresholds used
    needed: tuple[float, float]  # the lowest static and first-layer scores of a positive
    recommended_prefilter: Prefilter  # needed minus the margins, rounded down
    prefilter_held_out_recall: tuple[float, float, float]  # static, first layer, both
    #: pool: (texts, share stopped by the static stage, by the first layer, reaching MiniLM,
    #: share flagged at the recommended threshold as served, by MiniLM alone)
    stages: dict[str, tuple[int, float, float, float, float, float]]
    windows_caught: tuple[int, float, float]  # windows, share caught by MiniLM, as served


def text_windows(sentences: Sequence[str], count: int, inserts: Sequence[str] = ()) -> list[str]:
    """``count`` different texts of exactly WINDOW_TOKENS WordPiece tokens (no special
    tokens) made of consecutive ``sentences`` (rotated); with ``inserts``, window ``i``
    starts with ``inserts[i % len(inserts)]`` placed after the first sentence."""
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    windows = []
    for i in range(count):
        n = len(sentences)
        parts = [sentences[(3 * i + k) % n] for k in range(n)]
        if inserts:
            parts.insert(1, inserts[i % len(inserts)])
        text = " ".join(parts)
        encoding = tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) < WINDOW_TOKENS:
            raise ValueError("not enough text for a window")
        windows.append(text[: encoding.offsets[WINDOW_TOKENS - 1][1]])
    return windows


def pools(preset: str, fixture: Sequence[Example]) -> dict[str, list[str]]:
    """Texts by kind, for the share of each that reaches MiniLM."""
    others = [
        e.text
        for other in presets()
        if other != preset and (FIXTURES / f"{other}.tsv").exists()
        for e in load_fixture(FIXTURES / f"{other}.tsv")
        if e.label == 1
    ]
    return {
        "fixture: to catch": [e.text for e in fixture if e.label == 1],
        "fixture: near misses": [e.text for e in fixture if e.label == 0],
        "other presets' requests": others,
        "ordinary.txt (advice on other subjects, everyday requests)": read_lines(ORDINARY),
        "chit-chat": [t for path in CHITCHAT for t in read_lines(path)],
        f"{WINDOW_TOKENS}-token windows of prose.txt": text_windows(read_lines(PROSE), 40),
    }


#: Pools added as negatives for ``Evaluation.wider``: requests framed as advice, or
#: everyday requests, about other subjects.
OTHER_SUBJECTS = (
    "other presets' requests",
    "ordinary.txt (advice on other subjects, everyday requests)",
)


def evaluate(preset: str, fixture: Path | None = None) -> Evaluation:
    labels = load_preset(preset)
    threshold = preset_threshold(preset)
    path = fixture or FIXTURES / f"{preset}.tsv"
    examples = load_fixture(path, [e for values in labels.values() for e in values])
    classifier = TopicClassifier(preset, labels, preset_prefilter(preset))
    minilm = shared_minilm()
    texts = [e.text for e in examples]
    truth = [e.label for e in examples]
    served = [c.score for c in classifier.classify_now(texts)]
    alone = classifier.scores(minilm.embed(texts)).tolist()
    static = classifier.static_scores(minilm.embed_static(texts))
    first = classifier.first_layer_scores(minilm.embed_first_layer(texts))
    y = np.asarray(truth, dtype=bool)
    stages = {}
    wider_scores, wider_truth = list(served), list(truth)
    for name, pool in pools(preset, examples).items():
        reached = classifier.prefilter_stages(pool)
        pool_scores = [c.score for c in classifier.classify_now(pool)]
        if name in OTHER_SUBJECTS:
            wider_scores += pool_scores
            wider_truth += [0] * len(pool)
        flagged = np.mean([score >= threshold for score in pool_scores])
        flagged_alone = np.mean(classifier.scores(minilm.embed(pool)) >= threshold)
        stages[name] = (
            len(pool),
            float((reached == 0).mean()),
            float((reached == 1).mean()),
            float((reached == 2).mean()),
            float(flagged),
            float(flagged_alone),
        )
    inside = text_windows(read_lines(PROSE), 60, [e.text for e in examples if e.label == 1])
    caught_alone = classifier.scores(minilm.embed(inside)) >= threshold
    caught_served = np.array([c.score >= threshold for c in classifier.classify_now(inside)])
    if classifier.prefilter is not None:
        # The classifier's own answers are the stage scores combined: check it.
        combined = served_scores(static, first, alone, classifier.prefilter)
        assert np.allclose(combined, served, atol=1e-6), "classify_now disagrees with stages"
    served_summary = Summary.of(served, truth, threshold)
    served_summary = Summary(
        served_summary.auc,
        served_summary.best,
        held_out_served_f1(static, first, alone, y),
        served_summary.recommended,
    )
    return Evaluation(
        preset,
        len(examples),
        sum(truth),
        served_summary.auc,
        served_summary.best,
        served_summary.held_out_f1,
        tuple(served),
        tuple(truth),
        served_summary,
        Summary.of(alone, truth, threshold),
        Summary.of(wider_scores, wider_truth, threshold),
        classifier.prefilter,
        (float(static[y].min()), float(first[y].min())),
        recommended_prefilter(static, first, y),
        (
            held_out_prefilter_recall([static], y, [STATIC_MARGIN]),
            held_out_prefilter_recall([first], y, [FIRST_LAYER_MARGIN]),
            held_out_prefilter_recall([static, first], y, [STATIC_MARGIN, FIRST_LAYER_MARGIN]),
        ),
        stages,
        (len(inside), float(caught_alone.mean()), float(caught_served.mean())),
    )


def print_report(results: Sequence[Evaluation]) -> None:
    print(
        f"{'preset':<18} {'scores':<12} {'n':>4} {'pos':>4} {'AUC':>6} {'best at':>8} {'P':>6} "
        f"{'R':>6} {'F1':>6} {'F1 held-out':>12} {'at rec.':>8} {'P':>6} {'R':>6} {'F1':>6}"
    )
    for r in results:
        for kind, s in (("as served", r.served), ("MiniLM alone", r.minilm), ("+ others", r.wider)):
            b, a = s.best, s.recommended
            print(
                f"{r.preset:<18} {kind:<12} {r.examples:>4} {r.positives:>4} {s.auc:>6.3f} "
                f"{b.threshold:>8.3f} {b.precision:>6.3f} {b.recall:>6.3f} {b.f1:>6.3f} "
                f"{s.held_out_f1:>12.3f} {a.threshold:>8.2f} {a.precision:>6.3f} "
                f"{a.recall:>6.3f} {a.f1:>6.3f}"
            )
    print(
        "(+ others: as served, with the other presets' requests and ordinary.txt added as "
        "negatives; n and pos are the fixture's)"
    )
    for r in results:
        used = (
            "none"
            if r.prefilter is None
            else (f"static {r.prefilter.static:.2f}, first layer {r.prefilter.first_layer:.2f}")
        )
        recommended = r.recommended_prefilter
        print(
            f"\n{r.preset}: prefilter {used}; lowest score of a fixture positive: static "
            f"{r.needed[0]:.3f}, first layer {r.needed[1]:.3f} (recommended prefilter: "
            f"static {recommended.static:.2f}, first layer {recommended.first_layer:.2f}); "
            "held-out recall of thresholds chosen that way: static {:.3f}, first layer "
            "{:.3f}, both {:.3f}".format(*r.prefilter_held_out_recall)
        )
        print(
            f"  {'stopped by static':>18} {'by first layer':>15} {'reach MiniLM':>13} "
            f"{'flagged':>8} {'by MiniLM alone':>16}   (flagged: at the recommended threshold)"
        )
        for name, (n, static, first, minilm, flagged, alone) in r.stages.items():
            print(
                f"  {static:>18.1%} {first:>15.1%} {minilm:>13.1%} {flagged:>8.1%} {alone:>16.1%}"
                f"   of {n:>4} {name}"
            )
        n, alone, served = r.windows_caught
        print(
            f"  {n} {WINDOW_TOKENS}-token prose windows with one fixture positive inside, "
            f"caught at the recommended threshold: MiniLM alone {alone:.1%}, as served "
            f"{served:.1%}"
        )


def text_of_tokens(tokens: int, base: str = LATENCY_TEXT) -> str:
    """An English text that MiniLM's tokenizer splits into exactly ``tokens`` tokens
    ([CLS] and [SEP] included), for latency measurements."""
    tokenizer = shared_minilm().tokenizer
    words = base.split() * 20
    for n in range(len(words), 0, -1):
        text = " ".join(words[:n])
        if len(tokenizer.encode(text).ids) <= tokens:
            return text
    raise ValueError(f"cannot build a text of {tokens} tokens")


def latency(
    classifier: TopicClassifier, batch: int, text: str | None = None
) -> tuple[float, float]:
    """Median and 90th-percentile milliseconds of one ``classify_now`` call on ``batch``
    copies of ``text`` (default: a 128-token advice request, which reaches MiniLM)."""
    texts = [text or text_of_tokens(128)] * batch
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
    print_report(results)
    if args.latency:
        labels = load_preset(names[0])
        classifier = TopicClassifier("latency", labels, preset_prefilter(names[0]))
        windows = text_windows(read_lines(PROSE), 40)
        reached = classifier.prefilter_stages(windows)
        cases = []
        for stage, label in ((0, "prose stopped by static"), (1, "prose stopped by first layer")):
            if (reached == stage).any():
                cases.append((classifier, label, windows[int(np.argmax(reached == stage))]))
        # The worst case: both prefilter stages, then MiniLM (thresholds that pass anything).
        everything = TopicClassifier("worst", labels, Prefilter(static=-1.0, first_layer=-1.0))
        cases.append((everything, "prose through every stage", windows[0]))
        cases.append((TopicClassifier("exact", labels, False), "prose, MiniLM only", windows[0]))
        for timed, label, text in cases:
            for batch in (1, 16):
                median, p90 = latency(timed, batch, text)
                print(
                    f"latency, {batch:>2} x 128 tokens of {label}: median {median:.2f} ms "
                    f"({median / batch:.2f} ms/text), p90 {p90:.2f} ms"
                )
        classifier = everything
        burst = concurrent_latency(classifier)
        print(
            f"latency, 16 concurrent classify([text]) calls through every stage, all answered: "
            f"median {burst:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
