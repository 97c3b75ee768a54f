"""Normalisation before classification (extproc/normalize.py) and the pattern classifiers
that use it: obfuscated keywords and PII are found, spans point at the original characters."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from checkstream.formats.texts import apply_redactions
from checkstream.normalize import (
    SKIPPED_RANGES,
    confusables,
    fold_for_keywords,
    fold_for_patterns,
    keyword_key,
)
from checkstream.plugins.keyword import build_keyword
from checkstream.plugins.pii import PiiDetector

PII = PiiDetector("pii")
FALCON = build_keyword("falcon", {"terms": ["project falcon", "internal only"]})

ZWSP, SOFT_HYPHEN, RLO, WORD_JOINER = "\u200b", "\u00ad", "\u202e", "\u2060"


def _keyword_hits(text: str) -> list[str]:
    (result,) = FALCON.classify([text])
    return [text[s.start : s.end] for s in result.spans]


def _pii_hits(text: str) -> list[tuple[str, str]]:
    return [(text[s.start : s.end], s.label) for s in PII.find(text)]


def test_skipped_ranges_hold_nothing_the_folds_change() -> None:
    table = confusables()
    for lo, hi in SKIPPED_RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            assert unicodedata.decomposition(ch) == "" or 0xAC00 <= cp <= 0xD7A3, hex(cp)
            assert not unicodedata.combining(ch), hex(cp)
            if not 0xD800 <= cp <= 0xDFFF:
                assert ch.casefold() == ch, hex(cp)
            # Sources in these blocks are handled: the tables add every confusable source.
            assert ch not in table or fold_for_keywords(ch).text != ch or table[ch] == ch


def test_ascii_text_is_returned_as_is() -> None:
    text = "Mail me at a@b.co"
    folded = fold_for_patterns(text)
    assert folded.text is text
    assert folded.original_span(3, 7) == (3, 7)


def test_keyword_found_through_zero_width_soft_hyphen_and_bidi_controls() -> None:
    for text in (
        f"the pro{ZWSP}ject fal{ZWSP}con plan",
        f"the pro{SOFT_HYPHEN}ject fal{SOFT_HYPHEN}con plan",
        f"the {RLO}project{WORD_JOINER} falcon plan",
    ):
        hits = _keyword_hits(text)
        assert len(hits) == 1, text
        assert hits[0].lstrip(RLO).startswith("pro") and hits[0].endswith("con"), hits


def test_keyword_found_in_full_width_and_with_homoglyphs() -> None:
    assert _keyword_hits("ＰＲＯＪＥＣＴ ＦＡＬＣＯＮ now") == ["ＰＲＯＪＥＣＴ ＦＡＬＣＯＮ"]
    cyrillic = "the prоjеct fаlcоn plan"  # о, е, а are Cyrillic
    assert any(not c.isascii() for c in cyrillic)
    assert _keyword_hits(cyrillic) == ["prоjеct fаlcоn"]
    assert _keyword_hits("PR0JECT FA1CON") == ["PR0JECT FA1CON"]  # digits for letters
    assert _keyword_hits("inter\u0578al only") == ["inter\u0578al only"]  # Armenian vo
    assert _keyword_hits("internol only") == []  # another letter is another word
    assert _keyword_hits("ｉｎｔｅｒｎａｌ　ｏｎｌｙ") == [
        "ｉｎｔｅｒｎａｌ　ｏｎｌｙ"
    ]  # ideographic space


def test_keyword_still_needs_word_boundaries_and_ignores_clean_text() -> None:
    assert _keyword_hits("project falconry") == []
    assert _keyword_hits("a plain prompt about birds") == []
    (result,) = FALCON.classify(["plain"])
    assert result.score == 0.0


def test_keyword_terms_are_folded_like_texts() -> None:
    classifier = build_keyword("k", {"terms": ["ＣＯＤＥ\u3000ＲＥ\u200bＤ"]})
    (result,) = classifier.classify(["we are at code red"])
    assert result.score == 1.0


def test_pii_found_in_full_width_with_original_span() -> None:
    text = "mail ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ today"
    assert _pii_hits(text) == [("ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ", "EMAIL")]
    redacted = apply_redactions(text, PII.find(text))
    assert redacted == "mail [REDACTED:EMAIL] today"


def test_pii_found_through_zero_width_and_soft_hyphens_in_digits() -> None:
    card = "4111" + ZWSP + "1111" + SOFT_HYPHEN + "1111" + WORD_JOINER + "1111"
    text = f"card {card} ok"
    assert _pii_hits(text) == [(card, "CREDIT_CARD")]
    full_width_ssn = "ssn １２３-４５-６７８９."
    assert _pii_hits(full_width_ssn) == [("１２３-４５-６７８９", "US_SSN")]


def test_pii_email_with_cyrillic_homoglyphs() -> None:
    text = "write to jоhn@exаmple.com please"  # о, а Cyrillic
    assert _pii_hits(text) == [("jоhn@exаmple.com", "EMAIL")]


def test_redaction_keeps_everything_around_the_span_byte_for_byte() -> None:
    text = f"ｈｉ{ZWSP} call ＋４４ ２０ ７９４６ ０９５８ — thanks é"
    spans = PII.find(text)
    assert [s.label for s in spans] == ["PHONE"]
    redacted = apply_redactions(text, spans)
    assert redacted.startswith(f"ｈｉ{ZWSP} call [REDACTED:PHONE]")
    assert redacted.endswith(" — thanks é")


def test_combining_marks_fold_with_their_base() -> None:
    folded = fold_for_patterns("cafe\u0301 ＠")
    assert folded.text == "café @"
    assert folded.original_span(3, 4) == (3, 5)  # é came from 'e' + U+0301
    assert folded.original_span(5, 6) == (6, 7)


def test_keyword_key_matches_the_full_fold() -> None:
    for text in ("Project FALCON", "pr0ject m|lk `q` 100%", "M1x 0f THINGS", "ＦＡＬ\u200bCОN ﬁ"):
        assert keyword_key(text) == fold_for_keywords(text).text
    assert keyword_key("cafe\u0301") is None  # marks: only the full fold composes them


_TRICKY = st.sampled_from(
    [
        *"abcmrnIl10O @.-",
        ZWSP,
        SOFT_HYPHEN,
        RLO,
        "ａ",
        "＠",
        "１",
        "о",
        "е",
        "\u0301",
        "ß",
        "ﬁ",
        "İ",
        "㎒",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TRICKY, max_size=40).map("".join), st.data())
def test_spans_map_inside_the_original_and_in_order(text: str, data: st.DataObject) -> None:
    for fold in (fold_for_patterns, fold_for_keywords):
        folded = fold(text)
        assert folded.original == text
        n = len(folded.text)
        i = data.draw(st.integers(0, n))
        j = data.draw(st.integers(i, n))
        start, end = folded.original_span(i, j)
        assert 0 <= start <= end <= len(text)
        if i < j:
            assert start < end
            if "\u0301" not in text:  # a mark cut from its base folds differently alone
                # What the folded characters came from folds to text containing them.
                assert folded.text[i:j] in fold(text[start:end]).text
            later_start, _ = folded.original_span(j - 1, j)
            assert later_start >= start


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=()), max_size=60))  # lone surrogates too
def test_folds_never_raise_and_classifiers_return_valid_spans(text: str) -> None:
    for span in PII.find(text):
        assert 0 <= span.start < span.end <= len(text)
    (result,) = FALCON.classify([text])
    for span in result.spans:
        assert 0 <= span.start < span.end <= len(text)
