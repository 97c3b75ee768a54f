"""The built-in ``pii_detector`` classifier: personal data and secrets, found by regex.

Each entity has a precompiled pattern that proposes candidates and a validator that rejects
look-alikes (Luhn and issuer prefix for cards, mod-97 for IBANs, allocation rules for SSNs,
``ipaddress`` for IPs), because most digit runs in LLM traffic are order numbers, dates and
versions, not personal data. In checkstream.yaml::

    classifiers:
      pii:
        type: pii_detector
        entities: [EMAIL, CREDIT_CARD]   # optional; every entity when omitted

Score is 1.0 when anything is found, else 0.0; spans are non-overlapping, in text order,
labelled with the entity name (``[REDACTED:CREDIT_CARD]``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from extproc.hookspecs import Classification, ClassifierFactory, Span, hookimpl

TYPE_NAME: Final = "pii_detector"

#: Every entity, most specific first: when two equally long candidates overlap, the earlier
#: label wins.
ENTITIES: Final = ("SECRET", "IBAN", "CREDIT_CARD", "EMAIL", "US_SSN", "IP_ADDRESS", "PHONE")

_NO_SCORE: Final = Classification(0.0)

# Candidates yield (start, end) offsets into the text they were given.
Finder = Callable[[str], Iterator[tuple[int, int]]]

# ASCII everywhere: \d and \w would otherwise accept e.g. Arabic-Indic digits, which the
# validators do not understand. Patterns start with a character class or literal rather than a
# lookbehind, so the regex engine can skip ahead; the boundary lookbehind comes after the
# first character instead.
_A: Final = re.ASCII


# --- validators -------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """True if the ASCII digit string passes the Luhn checksum (and is not empty)."""
    if not (digits.isascii() and digits.isdigit()):
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_issuer_valid(digits: str) -> bool:
    """True if the digits start with a known issuer prefix and have that issuer's length."""
    n = len(digits)
    if n < 13 or not digits.isdigit():
        return False
    if digits[0] == "4":  # Visa
        return n in (13, 16, 19)
    p2, p3, p4 = int(digits[:2]), int(digits[:3]), int(digits[:4])
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:  # Mastercard
        return n == 16
    if p2 in (34, 37):  # American Express
        return n == 15
    if p4 == 6011 or p2 == 65 or 644 <= p3 <= 649:  # Discover
        return 16 <= n <= 19
    return False


def card_valid(digits: str) -> bool:
    """True if the digit string (no separators) looks like a real payment card number."""
    return card_issuer_valid(digits) and luhn_valid(digits)


#: IBAN length by country (SWIFT IBAN registry); other countries are not detected.
IBAN_LENGTHS: Final[Mapping[str, int]] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_valid(iban: str) -> bool:
    """True if the compact IBAN (no spaces) has its country's length and mod-97 == 1."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    if not (iban.isascii() and iban.isalnum() and iban == iban.upper()):
        return False
    remainder = 0
    for ch in iban[4:] + iban[:4]:
        value = int(ch, 36)  # '0'-'9' -> 0-9, 'A'-'Z' -> 10-35, as ISO 13616 prescribes
        remainder = (remainder * (100 if value > 9 else 10) + value) % 97
    return remainder == 1


def ssn_valid(area: str, group: str, serial: str) -> bool:
    """True if the parts are in ranges the SSA issues (never 000/666/9xx, 00, 0000)."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


# --- candidate finders ------------------------------------------------------------------

# Emails are found from their '@', which is rare in text, rather than by scanning every
# word for a local part.
_EMAIL_DOMAIN: Final = re.compile(
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63})(?![\w-]|\.\w)", _A
)
_EMAIL_LOCAL_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-"
)


def _find_email(text: str) -> Iterator[tuple[int, int]]:
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        start = at
        while start > 0 and text[start - 1] in _EMAIL_LOCAL_CHARS:
            start -= 1
        while start < at and text[start] == ".":  # sentence punctuation, not the address
            start += 1
        local = text[start:at]
        if local and not local.endswith(".") and ".." not in local:
            yield start, m.end()


# International: '+', then digits in groups separated by one space, dot or dash, optionally
# one group in parentheses ("+44 (0)20 ..."). Possessive, so a long digit run is rejected
# in one step instead of being re-split every way.
_PHONE_INTL: Final = re.compile(
    r"\+(?<![\w+]\+)[1-9](?:[ .-]?(?:\(\d{1,4}\)|\d))*+(?![\w]|[.-]\d)", _A
)
# North American without the '+1': (415) 555-2671, 415-555-2671, 415.555.2671, 415 555 2671,
# optionally led by "1-". The same separator must be used twice when there are no parentheses.
_PHONE_NANP: Final = re.compile(
    r"(?:1[-. ])?"
    r"(?:\((?P<npa1>[2-9]\d\d)\)[ ]?|(?P<npa2>[2-9]\d\d)(?P<sep>[-. ]))"
    r"(?P<nxx>[2-9]\d\d)(?(sep)(?P=sep)|[-. ])\d{4}(?![\w]|[.-]\d)",
    _A,
)


def _find_phone(text: str) -> Iterator[tuple[int, int]]:
    if "+" in text:
        for m in _PHONE_INTL.finditer(text):
            number = m.group()
            at = [i for i, ch in enumerate(number) if ch.isdigit()]
            if number[1] != "1":
                if 8 <= len(at) <= 15:  # E.164 allows at most 15 digits
                    yield m.span()
                continue
            # Country code 1 is NANP: exactly ten more digits, so a group after them
            # ("+1 415 555 2671 24 hours") is cut off, unless it runs straight on.
            if len(at) < 11 or (len(at) > 11 and number[at[10] + 1] != " "):
                continue
            if number[at[1]] in "23456789" and number[at[4]] in "23456789":
                yield m.start(), m.start() + at[10] + 1
    for m in _PHONE_NANP.finditer(text):
        start = m.start()
        if start and (text[start - 1].isalnum() or text[start - 1] in "_.+-("):
            continue
        yield start, m.end()


_CARD: Final = re.compile(r"\d(?<![\w.+-]\d)(?:[ -]?\d){12,18}(?![\w]|[.-]\d)", _A)
# Amex is written 4-6-5, other cards in fours with a shorter last group (13 and 19 digits).
_CARD_GROUPINGS: Final = frozenset({(4, 6, 5), (4, 6, 4)})


def _card_candidate(number: str) -> str | None:
    """The longest valid card at the start of ``number``, cutting trailing groups if needed."""
    separators = set(number) - set("0123456789")
    if not separators:
        return number if card_valid(number) else None
    if len(separators) > 1:
        return None
    groups = number.split(separators.pop())
    for n in range(len(groups), 1, -1):
        lengths = tuple(len(g) for g in groups[:n])
        shaped = lengths in _CARD_GROUPINGS or (
            all(x == 4 for x in lengths[:-1]) and 1 <= lengths[-1] <= 4
        )
        if shaped and card_valid("".join(groups[:n])):
            return " ".join(groups[:n])
    return None


def _find_card(text: str) -> Iterator[tuple[int, int]]:
    for m in _CARD.finditer(text):
        found = _card_candidate(m.group())
        if found is not None:
            yield m.start(), m.start() + len(found)


# Country code and check digits, then characters with an optional space before each; the
# candidate may run on into following capitals, so it is cut to the country's length.
_IBAN: Final = re.compile(r"[A-Z]{2}\d\d(?<![A-Za-z0-9]..\d\d)(?:[ ]?[A-Z0-9]){11,30}+", _A)


def _find_iban(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN.finditer(text):
        candidate = m.group()
        length = IBAN_LENGTHS.get(candidate[:2])
        if length is None:
            continue
        compact: list[str] = []
        end = 0
        for i, ch in enumerate(candidate):
            if ch == " ":
                if len(compact) % 4:  # printed IBANs are grouped in fours
                    break
                continue
            compact.append(ch)
            if len(compact) == length:
                end = i + 1
                break
        after = candidate[end : end + 1]
        if end and after in ("", " ") and iban_valid("".join(compact)):
            yield m.start(), m.start() + end


_SSN: Final = re.compile(r"\d(?<![\w.+-]\d)\d\d-\d\d-\d{4}(?![\w]|[.-]\d)", _A)


def _find_ssn(text: str) -> Iterator[tuple[int, int]]:
    for m in _SSN.finditer(text):
        area, group, serial = m.group().split("-")
        if ssn_valid(area, group, serial):
            yield m.span()


_IPV4: Final = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w]|\.\d)", _A)
# A dotted quad right after "version", "v", "build" etc. is a version, not an address.
_VERSION_CONTEXT: Final = re.compile(
    r"(?:\b(?:version|ver|release|build|rev|revision|firmware|v)\.?\s*[:=#]?\s*)\Z",
    re.ASCII | re.IGNORECASE,
)
# At least two colons, then whatever hex, colons and dots follow (an embedded IPv4 tail);
# ``ipaddress`` decides.
_IPV6: Final = re.compile(r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])(?:[0-9A-Fa-f:.])*+", _A)


def _find_ip(text: str) -> Iterator[tuple[int, int]]:
    for m in _IPV4.finditer(text):
        if _VERSION_CONTEXT.search(text, max(0, m.start() - 12), m.start()):
            continue
        try:
            ipaddress.IPv4Address(m.group())  # also refuses octets > 255 and leading zeros
        except ValueError:
            continue
        yield m.span()
    # Most text has no "::" and too few colons for a full address, so skip the scan.
    if "::" not in text and text.count(":") < 7:
        return
    for m in _IPV6.finditer(text):
        candidate = m.group().rstrip(".")
        if candidate.endswith(":") and not candidate.endswith("::"):
            candidate = candidate[:-1]
        end = m.start() + len(candidate)
        if end < len(text) and (text[end].isalnum() or text[end] == "_"):
            continue
        # Full form has seven colons, compressed form a "::" and some hex (a bare "::" is
        # punctuation); times like 12:30:45 have neither.
        if not ("::" in candidate or candidate.count(":") == 7):
            continue
        if candidate.strip(":.") == "":
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield m.start(), end


_SK_KEY: Final = re.compile(
    r"(?<![\w-])(?:sk-(?:proj-|svcacct-|admin-|ant-(?:api|admin)\d\d-)?|[sr]k_(?:live|test)_)"
    r"([A-Za-z0-9_-]{20,})",
    _A,
)
_ALNUM_RUN: Final = re.compile(r"[A-Za-z0-9]+", _A)
_AWS_KEY_ID: Final = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", _A)
_GITHUB_TOKEN: Final = re.compile(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b", _A
)
_SLACK_TOKEN: Final = re.compile(r"\bxox[baprs]-\d{6,}-[A-Za-z0-9-]{8,}", _A)
# A key cut off before its END line (a truncated paste) still leaks, so the block then runs
# to the end of its base64 lines.
_PEM_PRIVATE_KEY: Final = re.compile(
    r"-----BEGIN (?P<kind>[A-Z0-9 ]*?)PRIVATE KEY-----"
    r"(?:[\s\S]*?-----END (?P=kind)PRIVATE KEY-----|[A-Za-z0-9+/=:,\- \t\r\n]*[A-Za-z0-9+/=])",
    _A,
)


def _random_looking(body: str) -> bool:
    """Real keys are long random runs; "sk-this-is-not-a-key-2024" is words."""
    return (
        any(ch.isdigit() for ch in body)
        and any(ch.isalpha() for ch in body)
        and len(set(body)) >= 12
        and max(len(run) for run in _ALNUM_RUN.findall(body)) >= 12
    )


def _find_secret(text: str) -> Iterator[tuple[int, int]]:
    if "k-" in text or "k_" in text:
        for m in _SK_KEY.finditer(text):
            if _random_looking(m.group(1)):
                yield m.span()
    if "AKIA" in text or "ASIA" in text:
        for m in _AWS_KEY_ID.finditer(text):
            # "ASIA" starts ordinary capitalised words; a real key id almost always has a digit.
            if m.group().startswith("AKIA") or any(ch.isdigit() for ch in m.group()):
                yield m.span()
    if "gh" in text:
        for m in _GITHUB_TOKEN.finditer(text):
            yield m.span()
    if "xox" in text:
        for m in _SLACK_TOKEN.finditer(text):
            yield m.span()
    if "-----BEGIN" in text:
        for m in _PEM_PRIVATE_KEY.finditer(text):
            yield m.span()


_FINDERS: Final[Mapping[str, Finder]] = {
    "SECRET": _find_secret,
    "IBAN": _find_iban,
    "CREDIT_CARD": _find_card,
    "EMAIL": _find_email,
    "US_SSN": _find_ssn,
    "IP_ADDRESS": _find_ip,
    "PHONE": _find_phone,
}
# Every finder except email and secret needs a digit; prose without one skips them all.
_NEEDS_DIGIT: Final = frozenset({"IBAN", "CREDIT_CARD", "US_SSN", "IP_ADDRESS", "PHONE"})
_HAS_DIGIT: Final = re.compile(r"\d", _A).search


# --- the classifier ---------------------------------------------------------------------


class PiiDetector:
    """Finds PII and secrets; one pass of each enabled entity's pattern per text."""

    produces_spans = True
    inline = True

    def __init__(self, name: str, entities: Sequence[str] = ENTITIES) -> None:
        unknown = sorted(set(entities) - set(ENTITIES))
        if unknown:
            raise ValueError(f"unknown entities {', '.join(unknown)}; known: {', '.join(ENTITIES)}")
        if not entities:
            raise ValueError(f"entities is empty; list some of {', '.join(ENTITIES)}")
        self.name = name
        # Kept in ENTITIES order: the index is the tie-break rank when candidates overlap.
        self.entities = tuple(e for e in ENTITIES if e in entities)
        self._finders = tuple(
            (ENTITIES.index(e), e in _NEEDS_DIGIT, _FINDERS[e]) for e in self.entities
        )

    def find(self, text: str) -> tuple[Span, ...]:
        """Non-overlapping spans in text order; the longest candidate wins an overlap."""
        has_digit = _HAS_DIGIT(text) is not None
        candidates = [
            (start, end, rank)
            for rank, needs_digit, finder in self._finders
            if has_digit or not needs_digit
            for start, end in finder(text)
        ]
        if not candidates:
            return ()
        candidates.sort(key=lambda c: (c[0] - c[1], c[2], c[0]))
        chosen: list[tuple[int, int, int]] = []
        for start, end, rank in candidates:
            if all(end <= s or start >= e for s, e, _ in chosen):
                chosen.append((start, end, rank))
        chosen.sort()
        return tuple(Span(start, end, ENTITIES[rank]) for start, end, rank in chosen)

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        results = []
        for text in texts:
            spans = self.find(text)
            results.append(Classification(1.0, spans) if spans else _NO_SCORE)
        return results


def create(name: str, settings: Mapping[str, Any]) -> PiiDetector:
    """The ``pii_detector`` factory: ``entities`` (optional list of entity names) only."""
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
