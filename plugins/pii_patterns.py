"""The ``pii_detector``'s patterns and validators: one finder per entity proposes candidates,
a validator rejects look-alikes (``pii.py`` chooses among what is left).

Runs wherever ``pii_detector`` classifies: the extproc workers and the classifier server.
Finders see text already folded by ``checkstream.normalize.fold_for_patterns`` and yield
``(start, end)`` offsets into it.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Final

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


#: Issuer prefix ranges (inclusive, compared on as many leading digits as the bounds have)
#: and the lengths each issues; the first range a number falls in decides.
_ISSUERS: Final[tuple[tuple[str, tuple[tuple[str, str], ...], frozenset[int]], ...]] = (
    ("Visa", (("4", "4"),), frozenset({13, 16, 19})),
    ("Mastercard", (("51", "55"), ("2221", "2720")), frozenset({16})),
    ("American Express", (("34", "34"), ("37", "37")), frozenset({15})),
    ("Mir", (("2200", "2204"),), frozenset(range(16, 20))),
    ("JCB", (("3528", "3589"),), frozenset(range(16, 20))),
    ("Diners Club", (("300", "305"), ("3095", "3095"), ("36", "36"), ("38", "39")),
     frozenset(range(14, 20))),
    ("Discover", (("6011", "6011"), ("644", "649"), ("65", "65")), frozenset(range(16, 20))),
    ("UnionPay", (("62", "62"), ("8100", "8171")), frozenset(range(16, 20))),
    # Maestro's ranges are wide (50, 56-69); RuPay's 60 and 508 fall inside them.
    ("Maestro", (("50", "50"), ("56", "69")), frozenset(range(13, 20))),
)  # fmt: skip


def card_issuer_valid(digits: str) -> bool:
    """True if the digits start with a known issuer prefix and have that issuer's length."""
    if not 13 <= len(digits) <= 19 or not (digits.isascii() and digits.isdigit()):
        return False
    for _, ranges, lengths in _ISSUERS:
        if any(low <= digits[: len(low)] <= high for low, high in ranges):
            return len(digits) in lengths
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


def ssn_valid(ssn: str) -> bool:
    """True if ``123-45-6789`` (or ``123456789``) is in ranges the SSA issues.

    Never issued: area 000, 666 or 9xx, group 00, serial 0000.
    """
    digits = ssn.replace("-", "")
    if len(digits) != 9 or not (digits.isascii() and digits.isdigit()):
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


# --- candidate finders ------------------------------------------------------------------
#
# Each regex pass over a 1 KB prompt costs several microseconds whatever the pattern, so
# the digit-bearing entities (cards, SSNs, IPv4, North American phones, IBANs) are not
# searched for in the whole text: one pass finds runs of digits and separators long enough
# to hold any of them, and IBAN check digits, and their patterns run only there. The other
# entities are guarded by a substring test ('@', '+', "sk-", ...).


def _word_start(text: str, i: int) -> bool:
    """True if nothing word-like (or a joining '-', '.', '+') is glued to the left of i."""
    return i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_-.+")


# A run is at least as long as the shortest candidate, an IPv4 address like 1.1.1.1; an
# IBAN, the one entity starting with letters, is found from the two digits after its country
# code. Explicit [0-9] rather than \d: the engine skips to a plain character set faster.
NUMERIC_RUN: Final = re.compile(r"[(0-9](?:(?<=[A-Z][A-Z][0-9])(?P<iban>[0-9])|[(). 0-9-]{6,})")

# Emails are found from their '@' rather than by scanning every word for a local part.
_EMAIL_DOMAIN: Final = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-])", _A
)
_EMAIL_LOCAL_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-"
)


def _find_email(text: str) -> Iterator[tuple[int, int]]:
    if "@" not in text:
        return
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        start = at
        while start > 0 and text[start - 1] in _EMAIL_LOCAL_CHARS:
            start -= 1
        while start < at and text[start] == ".":  # "...alice@": punctuation, not address
            start += 1
        local = text[start:at]
        if local and not local.endswith(".") and ".." not in local:
            yield start, m.end()


# A phone number ends where no word character, and no '.'/'-' plus digit, follows it, unless
# an extension written straight on follows ("2671x123").
_PHONE_END: Final = r"(?:(?=x\d)|(?![\w]|[.-]\d))"
# International: '+' (or the 00 international prefix), then digits in groups separated by
# one space, dot or dash, optionally one group in parentheses ("+44 (0)20 ..."). Possessive,
# so a long digit run is rejected in one step instead of being re-split every way.
_PHONE_INTL: Final = re.compile(
    rf"\+(?<![\w+]\+)[1-9](?:[ .-]?(?:\(\d{{1,4}}\)|\d))*+{_PHONE_END}", _A
)
# North American without the '+1': (415) 555-2671, (415)-555-2671, 415-555-2671,
# 415.555.2671, 415 555 2671, optionally led by "1-". The same separator must be used twice
# when there are no parentheses.
_PHONE_NANP: Final = re.compile(
    r"(?:1[-. ])?(?:\([2-9]\d\d\)[ -]?|[2-9]\d\d(?P<sep>[-. ]))"
    rf"[2-9]\d\d(?(sep)(?P=sep)|[-. ])\d{{4}}{_PHONE_END}",
    _A,
)
# National formats of the largest locales, written with separators (a bare digit run is an
# order number far more often than a phone). Each alternative is one locale's convention;
# the digit count is checked after the match.
_PHONE_NATIONAL: Final = re.compile(
    "(?:"
    # Trunk prefix 0 (UK, DE, IT, NL, JP, KR, AU, CN landlines, IN, ID, PH, NG, PK, ...):
    # "020 7946 0958", "07700 900123", "030 12345678", "020-1234567", "03-1234-5678",
    # "0412 345 678", "(020) 7946 0958", "(02) 9876 5432": at most three groups, one
    # separator throughout, every group at least two digits. France: five pairs,
    # "01 23 45 67 89", "06.12.34.56.78".
    r"0[1-9](?P<f>[ .-])\d\d(?:(?P=f)\d\d){3}"
    r"|0[1-9]\d{0,4}(?P<s>[ .-])\d{2,8}(?:(?P=s)\d{2,8})?"
    r"|\(0[1-9]\d{0,4}\)[ ]?\d{2,8}(?:[ -]\d{2,8})?"
    # Russia's trunk 8: "8 (495) 123-45-67", "8 912 345-67-89".
    r"|8[ ]?(?:\(\d{3}\)|\d{3})[ ]?\d{3}[ -]\d\d[ -]\d\d"
    # Mobiles without a trunk prefix: India "98765 43210"; China "138 0013 8000";
    # Spain "612 34 56 78" / "91 123 45 67"; Italy "347 123 4567"; Mexico "55 1234 5678";
    # Brazil "(11) 91234-5678".
    r"|[6-9]\d{4}[ -]\d{5}"
    r"|1[3-9]\d(?P<c>[ -])\d{4}(?P=c)\d{4}"
    r"|[6-9]\d\d[ ]\d\d[ ]\d\d[ ]\d\d|9\d[ ]\d{3}[ ]\d\d[ ]\d\d"
    r"|3\d\d(?P<i>[ .-])\d{3}(?P=i)\d{4}"
    r"|[1-9]\d[ ]\d{4}[ ]\d{4}"
    r"|\([1-9]\d\)[ ]?9?\d{4}-\d{4}"
    f"){_PHONE_END}",
    _A,
)
# An extension after a number: "x123", " ext. 12", ", extension 4567", " Durchwahl 12".
_PHONE_EXTENSION: Final = re.compile(
    r",?[ ]?(?:x|ext|extn|extension|durchwahl|poste|interno)\.?[ ]?#?\d{1,6}(?!\w)",
    re.ASCII | re.IGNORECASE,
)


def _with_extension(text: str, start: int, end: int) -> tuple[int, int]:
    m = _PHONE_EXTENSION.match(text, end)
    return (start, m.end()) if m else (start, end)


def _find_phone_intl(text: str) -> Iterator[tuple[int, int]]:
    if "+" not in text:
        return
    for m in _PHONE_INTL.finditer(text):
        number = m.group()
        at = [i for i, ch in enumerate(number) if ch.isdigit()]
        if number[1] != "1":
            if 8 <= len(at) <= 15:  # E.164 allows at most 15 digits
                yield _with_extension(text, *m.span())
            continue
        # Country code 1 is NANP: exactly ten more digits, so a group after them
        # ("+1 415 555 2671 24 hours") is cut off, unless it runs straight on.
        if len(at) < 11 or (len(at) > 11 and number[at[10] + 1] != " "):
            continue
        if number[at[1]] in "23456789" and number[at[4]] in "23456789":
            yield _with_extension(text, m.start(), m.start() + at[10] + 1)


def _find_phone_run(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    for m in _PHONE_NANP.finditer(text, start, end):
        if _word_start(text, m.start()):
            yield _with_extension(text, *m.span())
    for m in _PHONE_NATIONAL.finditer(text, start, end):
        if _word_start(text, m.start()) and _national_number(text, m.group(), m.end()):
            yield _with_extension(text, *m.span())


_PHONE_CUE: Final = re.compile(
    r"\b(?:tel|t[eé]l[eé]phone|phone|mobile|cell|portable|call|ring|reach|contact|fax|sms|"
    r"whatsapp|telefon|handy|number|num[eé]ro|n[°o])\b",
    re.IGNORECASE,
)
_PAIRS: Final = re.compile(r"0\d(?:([ .-])\d\d){4}", _A)
_NANP_SHAPED: Final = re.compile(r"\(0\d\d\)[ ]?\d{3}-\d{4}", _A)


def _national_number(text: str, number: str, end: int) -> bool:
    """Rejects the national-format matches that are lists of numbers or US placeholders."""
    count = sum(ch.isdigit() for ch in number)
    start = end - len(number)
    if not 9 <= count <= 12:
        return False
    # More groups run on either side ("04 15 23 42 08 16", "27 02 2017 13 28"): a list of
    # numbers or a date, not one phone number.
    if end + 1 < len(text) and text[end] in " .-" and text[end + 1].isdigit():
        return False
    if start >= 2 and text[start - 1] in " .-" and text[start - 2].isdigit():
        return False
    # Nine digits after a trunk 0 ("085 831 376") are as often a reference as a (Seoul,
    # Italian) landline: only after a phone cue.
    cued = _PHONE_CUE.search(text, max(0, start - 40), start) is not None
    if count == 9 and number.lstrip("(").startswith("0") and not cued:
        return False
    pairs = _PAIRS.fullmatch(number)
    # Trunk-0 numbers end in a group of three or more digits ("0871 2231 09" is a code).
    if (
        pairs is None
        and number.startswith(("0", "(0"))
        and len(re.split(r"[ .)-]", number)[-1]) < 3
    ):
        return False
    if pairs is not None:
        # French numbers are five pairs; five ascending pairs are lottery draws or a list.
        # Example numbers ("06 12 34 56 78") ascend too, so those are kept after a phone cue.
        values = [int(g) for g in re.split(r"[ .-]", number)]
        ascending = all(a < b for a, b in itertools.pairwise(values))
        if ascending and not cued:
            return False
    # (0xx) xxx-xxxx is the North American layout with an area code that cannot exist,
    # the usual way to write a fictional number.
    return _NANP_SHAPED.fullmatch(number) is None


_CARD: Final = re.compile(r"\d(?<![\w.+-]\d)(?:[ -]?\d){12,18}(?![\w]|[.-]\d)", _A)
# Amex is written 4-6-5, other cards in fours with a shorter last group (13 and 19 digits).
_CARD_GROUPINGS: Final = frozenset({(4, 6, 5), (4, 6, 4)})


def _card_prefix(number: str) -> str | None:
    """The longest valid card at the start of ``number``, cutting trailing groups if needed."""
    separators = set(number) - set("0123456789")
    if not separators:
        return number if card_valid(number) else None
    if len(separators) > 1:
        return None
    separator = separators.pop()
    groups = number.split(separator)
    for n in range(len(groups), 1, -1):
        lengths = tuple(len(g) for g in groups[:n])
        shaped = lengths in _CARD_GROUPINGS or (
            all(x == 4 for x in lengths[:-1]) and 1 <= lengths[-1] <= 4
        )
        if shaped and card_valid("".join(groups[:n])):
            return separator.join(groups[:n])
    return None


def _find_card(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    for m in _CARD.finditer(text, start, end):
        found = _card_prefix(m.group())
        if found is not None:
            yield m.start(), m.start() + len(found)


# Country code and check digits, then characters with an optional space before each; the
# candidate may run on into following capitals, so it is cut to the country's length.
_IBAN: Final = re.compile(r"[A-Z]{2}\d\d(?:[ ]?[A-Z0-9]){11,30}+", _A)


def find_iban(text: str, check_digits: int) -> Iterator[tuple[int, int]]:
    """The IBAN whose check digits start at text[check_digits], if any."""
    m = _IBAN.match(text, check_digits - 2)
    if m is not None and _word_start(text, m.start()):
        candidate = m.group()
        length = IBAN_LENGTHS.get(candidate[:2], 0)
        compact: list[str] = []
        for i, ch in enumerate(candidate):
            if ch == " ":
                if len(compact) % 4:  # printed IBANs are grouped in fours
                    return
                continue
            compact.append(ch)
            if len(compact) == length:
                if candidate[i + 1 : i + 2] in ("", " ") and iban_valid("".join(compact)):
                    yield m.start(), m.start() + i + 1
                return


_SSN: Final = re.compile(r"\d(?<![\w.+-]\d)\d\d-\d\d-\d{4}(?![\w]|[.-]\d)", _A)


def _find_ssn(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    for m in _SSN.finditer(text, start, end):
        if ssn_valid(m.group()):
            yield m.span()


_IPV4: Final = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w]|\.\d)", _A)
# A dotted quad right after "version", "v", "build" etc. is a version, not an address.
_VERSION_CONTEXT: Final = re.compile(
    r"\b(?:version|ver|release|build|rev|revision|firmware|v)\.?\s*[:=#]?\s*\Z",
    re.ASCII | re.IGNORECASE,
)


def _find_ipv4(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    for m in _IPV4.finditer(text, start, end):
        if _VERSION_CONTEXT.search(text, max(0, m.start() - 12), m.start()):
            continue
        try:
            ipaddress.IPv4Address(m.group())  # also refuses octets > 255 and leading zeros
        except ValueError:
            continue
        yield m.span()


# Every IPv6 address has two colons with at most four hex digits between them ("::" too);
# from there the candidate extends over hex and colons to the left, and hex, colons and dots
# (an embedded IPv4 tail) to the right. Starting from a literal ':' keeps the scan fast.
_IPV6_COLONS: Final = re.compile(r":[0-9A-Fa-f]{0,4}:", _A)
_HEX_COLON: Final = frozenset("0123456789abcdefABCDEF:")
_HEX_COLON_DOT: Final = _HEX_COLON | {"."}


def _find_ipv6(text: str) -> Iterator[tuple[int, int]]:
    if ":" not in text:
        return
    searched = 0
    for m in _IPV6_COLONS.finditer(text):
        if m.start() < searched:
            continue
        start, end = m.start(), m.end()
        while start and text[start - 1] in _HEX_COLON:
            start -= 1
        while end < len(text) and text[end] in _HEX_COLON_DOT:
            end += 1
        searched = end
        candidate = text[start:end].rstrip(".")
        if candidate.endswith(":") and not candidate.endswith("::"):
            candidate = candidate[:-1]
        end = start + len(candidate)
        if not _word_start(text, start) or (
            end < len(text) and (text[end].isalnum() or text[end] == "_")
        ):
            continue
        # Full form has seven colons, compressed form a "::"; times like 12:30:45 have
        # neither, and a bare "::" is punctuation.
        if not ("::" in candidate or candidate.count(":") == 7) or not candidate.strip(":."):
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield start, end


_API_KEY: Final = re.compile(
    r"(?:sk-(?:proj-|svcacct-|admin-|ant-(?:api|admin)\d\d-)?|[sr]k_(?:live|test)_)"
    r"([A-Za-z0-9_-]{20,})",
    _A,
)
_ALNUM_RUN: Final = re.compile(r"[A-Za-z0-9]+", _A)
_AWS_KEY_ID: Final = re.compile(r"A(?:KIA|SIA)[0-9A-Z]{16}\b", _A)
_GITHUB_TOKEN: Final = re.compile(
    r"(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b", _A
)
_SLACK_TOKEN: Final = re.compile(r"xox[baprs]-\d{6,}-[A-Za-z0-9-]{8,}", _A)
# The BEGIN line and the base64 lines after it (PEM wraps at 64 characters): if the END line
# is missing (a truncated paste), that much of the key still leaks, and the prose after it
# is not part of it.
_PEM_BEGIN: Final = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*?)PRIVATE KEY-----(?:\s*+[A-Za-z0-9+/=]{40,}+)*+", _A
)
# Far more than the largest keys (an 8192-bit RSA key is about 6.5 KB of PEM); it bounds the
# search for the END line, which would otherwise run to the end of the text for every BEGIN.
_PEM_MAX_LENGTH: Final = 16384


def _random_looking(body: str) -> bool:
    """Real keys are long random runs; "sk-this-is-not-a-key-2024" is words."""
    return (
        any(ch.isdigit() for ch in body)
        and any(ch.isalpha() for ch in body)
        and len(set(body)) >= 12
        and max(map(len, _ALNUM_RUN.findall(body)), default=0) >= 12
    )


def _find_secret(text: str) -> Iterator[tuple[int, int]]:
    if "sk-" in text or "k_live_" in text or "k_test_" in text:
        for m in _API_KEY.finditer(text):
            if _word_start(text, m.start()) and _random_looking(m.group(1)):
                yield m.span()
    if "AKIA" in text or "ASIA" in text:
        for m in _AWS_KEY_ID.finditer(text):
            # "ASIA" starts ordinary capitalised words; a real key id almost always has a digit.
            key = m.group()
            if _word_start(text, m.start()) and (key[1] == "K" or any(c.isdigit() for c in key)):
                yield m.span()
    if "_" in text and ("gh" in text or "github_pat_" in text):
        for m in _GITHUB_TOKEN.finditer(text):
            if _word_start(text, m.start()):
                yield m.span()
    if "xox" in text:
        for m in _SLACK_TOKEN.finditer(text):
            if _word_start(text, m.start()):
                yield m.span()
    if "-----BEGIN" in text:
        for m in _PEM_BEGIN.finditer(text):
            end_line = f"-----END {m.group(1)}PRIVATE KEY-----"
            end = text.find(end_line, m.end(), m.start() + _PEM_MAX_LENGTH)
            yield m.start(), (end + len(end_line) if end >= 0 else m.end())


TextFinder = Callable[[str], Iterator[tuple[int, int]]]
RunFinder = Callable[[str, int, int], Iterator[tuple[int, int]]]

TEXT_FINDERS: Final[Mapping[str, TextFinder]] = {
    "SECRET": _find_secret,
    "EMAIL": _find_email,
    "IP_ADDRESS": _find_ipv6,
    "PHONE": _find_phone_intl,
}
# Finders of one numeric run (text, start, end), with the shortest run they can match in.
RUN_FINDERS: Final[Mapping[str, tuple[int, RunFinder]]] = {
    "CREDIT_CARD": (13, _find_card),  # 13-digit Visa
    "US_SSN": (11, _find_ssn),
    "IP_ADDRESS": (7, _find_ipv4),
    "PHONE": (11, _find_phone_run),  # 02-123-4567
}
