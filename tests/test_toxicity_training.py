"""The toxicity head's training data and threshold choice (``plugins/training/``)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from checkstream.plugins.profanity_masks import unmask
from checkstream.plugins.training import toxicity_corpus

train_toxicity = pytest.importorskip(
    "checkstream.plugins.training.train_toxicity", reason="needs the train extra (scikit-learn)"
)


def test_examples_are_deterministic_labelled_and_unique() -> None:
    examples = toxicity_corpus.examples(3)
    assert examples == toxicity_corpus.examples(3)
    assert examples != toxicity_corpus.examples(4)
    texts = [t for t, _, _ in examples]
    assert len(set(texts)) == len(texts)
    labels = {label for _, label, _ in examples}
    assert labels == {0, 1}
    benign = {c for _, label, c in examples if label == 0}
    assert {"lookalike", "about_words", "sex_ed_medical", "mirror_praise"} <= benign
    toxic = {c for _, label, c in examples if label == 1}
    assert {"insult", "threat", "sexual", "hate", "masked"} <= toxic


def test_no_training_text_is_a_held_out_text() -> None:
    held_out = {
        train_toxicity._key(t) for path in train_toxicity.HELD_OUT
        for t, _, _ in train_toxicity.held_out(path)
    }  # fmt: skip
    assert len(held_out) > 300
    overlap = [t for t, _, _ in toxicity_corpus.examples() if train_toxicity._key(t) in held_out]
    assert overlap == []


@pytest.mark.parametrize("word", ["fuck", "shit", "bitch", "asshole", "cunt", "motherfucker"])
def test_masks_keep_the_first_letter_and_the_length(word: str) -> None:
    rng = random.Random(0)
    for _ in range(20):
        masked = toxicity_corpus.mask(word, rng)
        assert masked[0] == word[0] and len(masked) == len(word) and masked != word
    spaced = toxicity_corpus.space(word, rng)
    assert spaced.replace(spaced[1], "") == word and unmask(spaced) == word


def test_threshold_flags_at_most_the_given_share() -> None:
    benign = np.linspace(0.0, 0.99, 100)
    for fpr in (0.0, 0.02, 0.05, 0.5):
        threshold = train_toxicity.threshold_at(benign, fpr)
        flagged = np.mean(benign >= threshold)
        assert flagged <= fpr
        # ... and the next lower benign score would exceed the share.
        assert np.mean(benign >= np.max(benign[benign < threshold])) > fpr


def test_recall_at_fpr() -> None:
    scores = np.array([0.9, 0.8, 0.15, 0.1, 0.85, 0.2])
    labels = np.array([1, 1, 1, 0, 0, 0])
    # FPR 0: only what scores above the highest benign (0.85) counts.
    assert train_toxicity.recall_at_fpr(scores, labels, 0.0) == pytest.approx(1 / 3)
    # One benign text of three may be flagged: the threshold sits just above 0.2.
    assert train_toxicity.recall_at_fpr(scores, labels, 0.34) == pytest.approx(2 / 3)
