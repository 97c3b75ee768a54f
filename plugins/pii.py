"""The built-in ``pii_detector`` classifier: personal data and secrets, found by regex.

Each entity has a precompiled pattern that proposes candidates and a validator that rejects
look-alikes (Luhn and issuer prefix for cards, mod-97 for IBANs, allocation rules for SSNs,
``ipaddress`` for IPs), because most digit runs in LLM traffic are order numbers, dates and
versions, not personal data; both live in ``pii_patterns.py``, this module chooses among the
candidates. Runs in the extproc workers and the classifier server. In checkstream.yaml::

    classifiers:
      pii:
        type: pii_detector
        entities: [EMAIL, CREDIT_CARD]   # optional; every entity when omitted

Score is 1.0 when anything is found, else 0.0; spans are non-overlapping, in text order,
labelled with the entity name (``[REDACTED:CREDIT_CARD]``).

Patterns see the text folded by ``checkstream.normalize.fold_for_patterns`` (NFKC, invisible
characters removed, look-alike letters made ASCII), so a full-width e-mail address or a
card number with zero-width spaces is found; spans point at the characters the client sent.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any, Final

from checkstream import Classification, ClassifierFactory, Span, hookimpl
from checkstream.normalize import fold_for_patterns
from checkstream.plugins.pii_patterns import NUMERIC_RUN, RUN_FINDERS, TEXT_FINDERS, find_iban

TYPE_NAME: Final = "pii_detector"

#: Every entity, most specific first: when two equally long candidates overlap, the earlier
#: label wins.
ENTITIES: Final = ("SECRET", "IBAN", "CREDIT_CARD", "EMAIL", "US_SSN", "IP_ADDRESS", "PHONE")

_NO_SCORE: Final = Classification(0.0)


class PiiDetector:
    """Finds PII and secrets in texts; see the module docstring."""

    produces_spans = True
    inline = True

    def __init__(self, name: str, entities: Sequence[str] = ENTITIES) -> None:
        if not entities:
            raise ValueError(f"entities is empty; list some of {', '.join(ENTITIES)}")
        unknown = sorted(set(entities) - set(ENTITIES))
        if unknown:
            raise ValueError(f"unknown entities {', '.join(unknown)}; known: {', '.join(ENTITIES)}")
        self.name = name
        self.entities = tuple(e for e in ENTITIES if e in entities)
        # The rank (index in ENTITIES) breaks ties between equally long overlapping spans.
        rank = {e: ENTITIES.index(e) for e in self.entities}
        self._text_finders = tuple((rank[e], TEXT_FINDERS[e]) for e in rank if e in TEXT_FINDERS)
        self._run_finders = tuple((rank[e], *RUN_FINDERS[e]) for e in rank if e in RUN_FINDERS)
        self._iban_rank = rank.get("IBAN")
        fold_for_patterns("\u200b")  # builds the tables now, not on the first request

    def find(self, text: str) -> tuple[Span, ...]:
        """Non-overlapping spans of ``text`` in order; the longest candidate wins an overlap."""
        folded = fold_for_patterns(text)
        spans = self._find_folded(folded.text)
        if folded.text is text or not spans:
            return spans
        return tuple(Span(*folded.original_span(s.start, s.end), s.label) for s in spans)

    def _find_folded(self, text: str) -> tuple[Span, ...]:
        candidates = [
            (start, end, rank) for rank, finder in self._text_finders for start, end in finder(text)
        ]
        iban_rank = self._iban_rank
        if self._run_finders or iban_rank is not None:
            for run in NUMERIC_RUN.finditer(text):
                start, end = run.span()
                if run.lastgroup == "iban":
                    if iban_rank is not None:
                        candidates.extend((s, e, iban_rank) for s, e in find_iban(text, start))
                    continue
                for rank, min_length, run_finder in self._run_finders:
                    if end - start >= min_length:
                        # Two characters past the run let the patterns' lookaheads see what
                        # follows it.
                        found = run_finder(text, start, end + 2)
                        candidates.extend((s, e, rank) for s, e in found)
        if not candidates:
            return ()
        candidates.sort(key=lambda c: (c[0] - c[1], c[2], c[0]))
        # Chosen spans are disjoint and kept in order, so a candidate overlaps one of them
        # only if it overlaps its neighbour on either side.
        starts: list[int] = []
        chosen: list[tuple[int, int, int]] = []
        for start, end, rank in candidates:
            i = bisect.bisect_right(starts, start)
            if (i and chosen[i - 1][1] > start) or (i < len(chosen) and chosen[i][0] < end):
                continue
            starts.insert(i, start)
            chosen.insert(i, (start, end, rank))
        return tuple(Span(start, end, ENTITIES[rank]) for start, end, rank in chosen)

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        results = []
        for text in texts:
            spans = self.find(text)
            results.append(Classification(1.0, spans) if spans else _NO_SCORE)
        return results


def create(name: str, settings: Mapping[str, Any]) -> PiiDetector:
    """The ``pii_detector`` factory; ``entities`` (a list of entity names) is optional."""
    extra = sorted(set(settings) - {"entities"})
    if extra:
        raise ValueError(f"unknown settings {', '.join(extra)}; {TYPE_NAME} takes only entities")
    entities = settings.get("entities", ENTITIES)
    if isinstance(entities, str) or not (
        isinstance(entities, Sequence) and all(isinstance(e, str) for e in entities)
    ):
        raise ValueError(f"entities must be a list of entity names, got {entities!r}")
    return PiiDetector(name, entities)


@hookimpl
def checkstream_classifier_types() -> Mapping[str, ClassifierFactory]:
    return {TYPE_NAME: create}
