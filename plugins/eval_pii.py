"""Precision, recall and F1 of ``pii_detector`` on a labelled fixture, per entity and overall.

Run ``python -m plugins.eval_pii [FIXTURE]`` (default: ``tests/fixtures/pii_labelled.tsv``).

The fixture has one example per line, ``labels<TAB>text``: ``labels`` is the set of entity
labels the text contains, comma separated, or ``NONE``; ``\\n`` in the text stands for a line
break (PEM blocks span lines). Scoring is at the line+label level: each line's predicted label
set (the labels of its spans) is compared with its expected set, so a true positive is a
label expected and predicted on the same line. Span boundaries are not scored here; the unit
tests pin them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from checkstream.plugins.pii import ENTITIES, PiiDetector

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "pii_labelled.tsv"


@dataclass(frozen=True)
class Example:
    line: int
    labels: frozenset[str]
    text: str


def load_fixture(path: Path = FIXTURE) -> list[Example]:
    """Parse the fixture; a malformed line or unknown label raises ValueError naming the line."""
    examples = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        column, tab, text = raw.partition("\t")
        if not tab or not text:
            raise ValueError(f"{path}:{number}: expected 'labels<TAB>text'")
        labels = frozenset() if column == "NONE" else frozenset(column.split(","))
        unknown = labels - set(ENTITIES)
        if unknown:
            raise ValueError(f"{path}:{number}: unknown labels {', '.join(sorted(unknown))}")
        examples.append(Example(number, labels, text.replace("\\n", "\n")))
    return examples


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    # With nothing predicted (or nothing expected) there is nothing wrong to count, so the
    # vacuous ratio is 1.0 rather than a division by zero.
    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def add(self, expected: frozenset[str], predicted: frozenset[str]) -> None:
        self.tp += len(expected & predicted)
        self.fp += len(predicted - expected)
        self.fn += len(expected - predicted)


@dataclass
class Report:
    per_entity: dict[str, Counts] = field(default_factory=lambda: {e: Counts() for e in ENTITIES})
    overall: Counts = field(default_factory=Counts)
    negatives: int = 0
    negatives_flagged: int = 0
    #: Lines where prediction and expectation differ, with the predicted labels.
    mistakes: list[tuple[Example, frozenset[str]]] = field(default_factory=list)


def evaluate(detector: PiiDetector, examples: Sequence[Example]) -> Report:
    report = Report()
    for example in examples:
        predicted = frozenset(span.label for span in detector.find(example.text))
        report.overall.add(example.labels, predicted)
        for entity, counts in report.per_entity.items():
            counts.add(example.labels & {entity}, predicted & {entity})
        if not example.labels:
            report.negatives += 1
            report.negatives_flagged += bool(predicted)
        if predicted != example.labels:
            report.mistakes.append((example, predicted))
    return report


def format_report(report: Report) -> str:
    rows = [
        f"{'entity':<12} {'TP':>4} {'FP':>4} {'FN':>4} {'precision':>9} {'recall':>7} {'F1':>6}"
    ]
    for name, c in [*report.per_entity.items(), ("overall", report.overall)]:
        rows.append(
            f"{name:<12} {c.tp:>4} {c.fp:>4} {c.fn:>4} "
            f"{c.precision:>9.3f} {c.recall:>7.3f} {c.f1:>6.3f}"
        )
    rows.append(f"lines without PII flagged: {report.negatives_flagged} of {report.negatives}")
    for example, predicted in report.mistakes:
        expected = ",".join(sorted(example.labels)) or "NONE"
        got = ",".join(sorted(predicted)) or "NONE"
        rows.append(f"line {example.line}: expected {expected}, got {got}: {example.text!r}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else FIXTURE
    print(format_report(evaluate(PiiDetector("pii"), load_fixture(path))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
