"""Client-controlled strings (model names, request ids, labels) made safe to store (worker).

JSON lets a client send a lone UTF-16 surrogate (``"m\\ud800"``): Python decodes it into a
``str`` that no UTF-8 store can hold, so SQLite, the audit trail and log shippers fail on it,
and a failure in a shared batch would cost other tenants their rows. Every string a client
chose passes through ``store_safe`` before it reaches a store, or is refused with a 400
when ``is_store_safe`` says no (the request's own fields, where a clear error helps more than
a silent repair).
"""

from __future__ import annotations

import re

#: Longest client-chosen label kept in a store; longer ones are cut.
MAX_LABEL_CHARS = 256

# Lone surrogates cannot be encoded as UTF-8; C0 controls and DEL break log lines and
# terminals that display the ledger.
_UNSTORABLE = re.compile(r"[\ud800-\udfff\x00-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def store_safe(text: str, limit: int = MAX_LABEL_CHARS) -> str:
    """``text`` cut to ``limit`` characters, each unstorable one replaced by U+FFFD."""
    return _UNSTORABLE.sub(REPLACEMENT, text[:limit])


def is_store_safe(text: str, limit: int = MAX_LABEL_CHARS) -> bool:
    """Whether ``text`` would be stored exactly as given (no replacement, no cut)."""
    return len(text) <= limit and _UNSTORABLE.search(text) is None


def without_surrogates(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD and nothing else changed: for free
    text (excerpts) whose line breaks are content."""
    return _SURROGATE.sub(REPLACEMENT, text)
