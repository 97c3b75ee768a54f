"""Masked and spaced profanity is written out for the toxicity model, and nothing else is."""

from __future__ import annotations

import pytest

from checkstream.plugins.profanity_masks import unmask
from checkstream.plugins.toxicity import ToxicityClassifier


@pytest.mark.parametrize(
    ("masked", "plain"),
    [
        ("what the f**k", "what the fuck"),
        ("what the f*ck", "what the fuck"),
        ("shut the f*** up", "shut the fuck up"),
        ("piece of sh!t", "piece of shit"),
        ("s**t happens", "shit happens"),
        ("b***h please", "bitch please"),
        ("a$$hole", "asshole"),
        ("F U C K this", "fuck this"),
        ("s.h.i.t service", "shit service"),
        ("you [expletive] moron", "you fuck moron"),
    ],
)
def test_masked_forms_are_written_out(masked: str, plain: str) -> None:
    assert unmask(masked).lower() == plain


@pytest.mark.parametrize(
    "text",
    [
        "ice-cream cone", "fork the repo", "he shot a hole in one", "Dick Smith called",
        "2**8 in Python", "a 5*** hotel", "S.H.I.E.L.D. agents", "s/t means short term",
        "f(x) = x**2", "the f-stop is f/2.8", "I ate 3 apples", "",
    ],
)  # fmt: skip
def test_ordinary_text_is_unchanged(text: str) -> None:
    assert unmask(text) == text


def test_masked_insults_now_score_like_plain_ones() -> None:
    classifier = ToxicityClassifier("toxicity")
    masked, plain, benign = (
        c.score for c in classifier.classify(["You f**king idiot", "You fucking idiot", "ok"])
    )
    assert masked == pytest.approx(plain)
    assert benign < 0.5 < masked
