"""Content encodings of bodies CheckStream must read (worker process).

CheckStream asks backends for ``identity`` whenever it reads an answer, but a client may
send a compressed request, and a backend may compress regardless. A body is only ever
checked decoded; encodings that cannot be decoded here are refused, never passed unread.
"""

from __future__ import annotations

import zlib

#: Encodings CheckStream decodes (HTTP's "deflate" is the zlib format, RFC 9110).
DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})


def decoder(encoding: str) -> zlib._Decompress:
    """An incremental decoder for one of ``DECODABLE``."""
    # 16 + MAX_WBITS reads a gzip header; MAX_WBITS alone the zlib format.
    return zlib.decompressobj(zlib.MAX_WBITS | 16 if "gzip" in encoding else zlib.MAX_WBITS)


def decode_body(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """``body`` decoded; ``ValueError`` with a message for the client if it is corrupt or
    would decode to more than ``max_bytes`` (a compression bomb)."""
    unpack = decoder(encoding)
    try:
        out = unpack.decompress(body, max_bytes + 1)
        if len(out) > max_bytes or unpack.unconsumed_tail:
            raise ValueError(f"the request body decodes to more than {max_bytes} bytes")
        out += unpack.flush()
    except zlib.error as exc:
        raise ValueError(f"the request body is not valid {encoding}: {exc}") from None
    if not unpack.eof:
        raise ValueError(f"the request body is truncated {encoding}")
    return out
