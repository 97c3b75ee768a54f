"""The client's request path made safe to join to a tenant's backend base path.

Runs in the worker, on every request, before the tenant's ``backend_url`` path is put in
front. Envoy forwards the path as the client wrote it (``normalize_path`` and
``merge_slashes`` are off), and backends that normalise (nginx, most frameworks) would
otherwise serve ``/base/../other`` as ``/other`` with this tenant's managed credential.

The path is normalised per RFC 3986: percent-encoded dots (``%2e``) decoded, runs of
slashes merged, ``.`` and ``..`` segments removed. What cannot be normalised safely is
refused: a ``..`` that would climb above the root, encoded slashes or backslashes (a backend
may decode them into separators), a raw backslash, and control characters. The result has
no dot segments, so joined to a base path it can never leave it. The query is kept as is.
"""

from __future__ import annotations

import re
from typing import Final

_ENCODED_DOT: Final = re.compile(r"%2e", re.IGNORECASE)
_SLASHES: Final = re.compile(r"/{2,}")
# %2f and %5c decode to separators; %00 and raw controls end C strings and split log lines.
_REFUSED: Final = re.compile(r"%(?:2f|5c|00)|[\\\x00-\x1f\x7f]", re.IGNORECASE)


class UnsafePath(ValueError):
    """A client path that cannot be normalised safely; the message says why."""


def normalize_client_path(path: str) -> str:
    """``path`` (with its query string) normalised, or ``UnsafePath``."""
    path_only, sep, query = path.partition("?")
    if not path_only.startswith("/"):
        raise UnsafePath("the request path must start with '/'")
    if "." not in path_only and "//" not in path_only and "%" not in path_only:
        if _REFUSED.search(path_only):
            raise UnsafePath("the request path contains a backslash or control character")
        return path  # the common case: nothing to normalise
    if _REFUSED.search(path_only):
        raise UnsafePath(
            "the request path contains an encoded slash or backslash, or a control character"
        )
    decoded = _ENCODED_DOT.sub(".", path_only)
    segments: list[str] = []
    parts = _SLASHES.sub("/", decoded)[1:].split("/")
    for i, segment in enumerate(parts):
        last = i == len(parts) - 1
        if segment == ".":
            if last:
                segments.append("")  # "/a/." is the directory "/a/"
            continue
        if segment == "..":
            if not segments or segments == [""]:
                raise UnsafePath("the request path climbs above the root with '..'")
            segments.pop()
            if last:
                segments.append("")
            continue
        segments.append(segment)
    return "/" + "/".join(segments) + sep + query
