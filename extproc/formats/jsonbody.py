"""Client JSON bodies parsed with limits, so hostile input is a 400 and never an exception.

Runs in the worker. Python's ``json`` recurses once per nesting level (a 5,000-deep array
raises ``RecursionError``) and converts integers with ``int()`` (a 5,000-digit integer raises
``ValueError`` past the interpreter's 4,300-digit guard, and costs quadratic time below
it). ``parse_request_json`` refuses both before they happen, and everything it refuses
raises ``RequestJsonError`` with a message for the client.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import numpy as np

#: Deeper than any real request (tool schemas nest a dozen levels) and far below the
#: interpreter's recursion limit, which code walking the payload must stay under.
MAX_DEPTH: Final = 128
#: Longer than any integer a request needs (a 64-bit seed has 20 digits).
MAX_INT_DIGITS: Final = 100

# A JSON string (escapes included): brackets inside strings do not nest anything.
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET: Final = bytes(b for b in range(256) if b not in b"[]{}")


class RequestJsonError(ValueError):
    """The body is not JSON CheckStream accepts; ``code`` names why for the client."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


def nesting_depth(body: bytes | bytearray) -> int:
    """The deepest nesting of arrays and objects in the JSON text ``body``, or, when that
    cannot exceed ``MAX_DEPTH``, an upper bound of it (the number of ``[`` and ``{``)."""
    openers = body.count(b"[") + body.count(b"{")
    if openers <= MAX_DEPTH:
        return openers  # an upper bound, and all a caller comparing with MAX_DEPTH needs
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    if not brackets:
        return 0
    # One vectorised pass: a wide body of a million small arrays costs milliseconds.
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = ((codes == ord("[")) | (codes == ord("{"))).astype(np.int8) * 2 - 1
    return int(np.cumsum(steps, dtype=np.int32).max())


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestJsonError(
            f"request body has an integer of {len(digits.lstrip('-'))} digits; "
            f"at most {MAX_INT_DIGITS} are accepted"
        )
    return int(digits)


def _refuse_constant(name: str) -> Any:
    raise RequestJsonError(f"request body contains {name}, which is not JSON")


def parse_request_json(body: bytes | bytearray) -> Any:
    """The JSON value of a client's request body; ``RequestJsonError`` if it is refused."""
    depth = nesting_depth(body)
    if depth > MAX_DEPTH:
        raise RequestJsonError(
            f"request body nests {depth} levels deep; at most {MAX_DEPTH} are accepted"
        )
    try:
        return json.loads(body, parse_int=_parse_int, parse_constant=_refuse_constant)
    except RequestJsonError:
        raise
    except UnicodeDecodeError as exc:
        raise RequestJsonError(f"request body is not UTF-8: {exc}", "invalid_json") from exc
    except json.JSONDecodeError as exc:
        raise RequestJsonError(f"request body is not valid JSON: {exc}", "invalid_json") from exc
    except (ValueError, RecursionError) as exc:  # a case the checks above did not foresee
        raise RequestJsonError(f"request body is refused: {exc}") from exc
