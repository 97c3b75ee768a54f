"""Undo masked and spaced profanity before the toxicity model reads a text (classifier
process, called by ``plugins/toxicity.py``).

The toxicity model is a bag of words: "f**k", "sh1t", "f u c k" and "[expletive]" are not
in its vocabulary, so a masked insult scored like plain text. Each masked form of a listed
word is rewritten to the word itself. Only the model's input changes; the text the policy
sees, and any spans, do not (the classifier reports no spans).

A mask must keep the word's first letter and its length, and replace letters only with
symbols or look-alike digits ("f*ck", "f**k", "b!tch", "a$$hole"), or spell the whole word
with single spaces, dots or dashes between the letters ("f u c k", "s.h.i.t"). Fully
masked middles are resolved to the one listed word of that first letter, last letter and
length ("s**t" -> shit), which is how writers expect them to be read.
"""

from __future__ import annotations

import re
from typing import Final

#: Words whose masked forms are undone: the profanity and sexual terms that carry most of the
#: model's weight; ordered longest first so "motherfucker" wins over "fucker".
WORDS: Final = (
    "motherfucker", "asshole", "bastard", "fucking", "fucker", "bitch", "pussy", "whore",
    "cunt", "dick", "cock", "fuck", "shit", "slut", "porn", "piss", "twat", "wank",
)  # fmt: skip

# Characters writers put in place of a letter: symbols, and digits or symbols that look like
# the letter they replace.
_MASK: Final = r"[*#@$%!?&_.^~-]"
_LOOKALIKE: Final = {"a": "@4", "i": "1!|", "o": "0", "s": "$5", "e": "3", "t": "7", "l": "1"}
_EXPLETIVE: Final = re.compile(
    r"[\[(](?:expletive|expletive deleted|censored|bleep|bleeped)[\])]", re.IGNORECASE
)


def _masked_pattern(word: str) -> str:
    """The word with each letter after the first either itself, a look-alike or a mask."""
    parts = [re.escape(word[0])]
    for letter in word[1:]:
        alternatives = re.escape(letter) + re.escape(_LOOKALIKE.get(letter, ""))
        parts.append(f"(?:[{alternatives}]|{_MASK})")
    return "".join(parts)


def _spaced_pattern(word: str) -> str:
    """Every letter separated by one space, dot or dash (the same one throughout)."""
    letters = [re.escape(ch) for ch in word]
    return letters[0] + f"(?P<sep_{word}>[ .-])" + f"(?P=sep_{word})".join(letters[1:])


_ALTERNATIVES: Final = [(w, _masked_pattern(w)) for w in WORDS] + [
    (w, _spaced_pattern(w)) for w in WORDS if len(w) >= 4
]
# The boundaries and the first letter are checked once, outside the alternation: with them
# inside every alternative, re tried all 34 at every position (~2 ms per 600 characters);
# like this it skips to the few positions a listed word can start at (~0.12 ms).
_FIRST_LETTERS: Final = "".join(sorted({word[0] for word, _ in _ALTERNATIVES}))
_MASKED: Final = re.compile(
    rf"(?<![\w*#@$])(?=[{_FIRST_LETTERS}])(?:"
    + "|".join(f"(?P<w{i}>{p})" for i, (_, p) in enumerate(_ALTERNATIVES))
    + r")(?![\w*#@$])",
    re.IGNORECASE,
)


def unmask(text: str) -> str:
    """``text`` with masked or spaced profanity written out; unchanged if there is none."""
    if not any(ch in text for ch in "*#@$%!?&_.^~-[( 0134579|"):
        return text
    text = _EXPLETIVE.sub("fuck", text)

    def replace(match: re.Match[str]) -> str:
        found = match.group()
        if found.isalpha():
            return found  # the plain word: nothing to undo
        index = int(next(k for k, v in match.groupdict().items() if v and k[0] == "w")[1:])
        return _ALTERNATIVES[index][0]

    return _MASKED.sub(replace, text)
