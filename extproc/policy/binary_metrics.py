"""Binary-classification measures for ``checkstream classifiers eval`` (CLI process).

Plain numpy so the gateway's runtime needs no scikit-learn. ROC AUC is the Mann-Whitney
statistic with tied scores counted half, which is what ``sklearn.metrics.roc_auc_score``
computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Scores = npt.NDArray[np.float64]
Labels = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Measures:
    """One threshold's confusion counts and the rates derived from them; a rate whose
    denominator is zero is None (printed as "-"), never a made-up 0 or 1."""

    threshold: float
    rows: int
    positives: int
    negatives: int
    true_positives: int
    false_positives: int

    @property
    def flagged(self) -> int:
        return self.true_positives + self.false_positives

    @property
    def precision(self) -> float | None:
        return self.true_positives / self.flagged if self.flagged else None

    @property
    def recall(self) -> float | None:
        return self.true_positives / self.positives if self.positives else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None:
            return None
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def false_positive_rate(self) -> float | None:
        return self.false_positives / self.negatives if self.negatives else None


def measure(scores: Scores, labels: Labels, threshold: float) -> Measures:
    """Counts with ``score >= threshold`` as flagged (the policy engine's comparison)."""
    flagged = scores >= threshold
    return Measures(
        threshold=threshold,
        rows=len(scores),
        positives=int(labels.sum()),
        negatives=int((~labels).sum()),
        true_positives=int((flagged & labels).sum()),
        false_positives=int((flagged & ~labels).sum()),
    )


def roc_auc(scores: Scores, labels: Labels) -> float | None:
    """Area under the ROC curve; None without both classes."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Tied scores share the mean of their 1-based ranks.
    _, first, counts = np.unique(ordered, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, counts)
    rank_sum = float(ranks[labels].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


#: The sweep's thresholds; the classifier's documented threshold is added to them.
SWEEP: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))


def sweep(scores: Scores, labels: Labels, extra: float | None = None) -> list[Measures]:
    thresholds = sorted({*SWEEP, *([round(extra, 4)] if extra is not None else [])})
    return [measure(scores, labels, t) for t in thresholds]
