"""Which request id a request carries: the client's ``x-request-id`` only when it is safe.

Runs in the worker. The id goes into the usage ledger, the audit trail, the log line and
the response header, so a client's value is used only if it is short and made of
``[A-Za-z0-9._:-]``: nothing that could forge a log or audit field, nothing unbounded.
Otherwise a fresh id is generated and the client's value is kept beside it, capped, so a
caller can still be traced.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Final

MAX_LENGTH: Final = 128
_SAFE: Final = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_LENGTH}}}")


@dataclass(frozen=True)
class RequestId:
    #: The request's id everywhere (ledger, audit, logs, response header).
    value: str
    #: The client's x-request-id when it was not usable as ``value``, cut to MAX_LENGTH
    #: characters; None when the client sent none or it was used.
    client: str | None = None


def request_id(client_value: str | None) -> RequestId:
    """The id for a request whose client sent ``client_value`` as x-request-id (or none)."""
    if client_value is not None and _SAFE.fullmatch(client_value):
        return RequestId(client_value)
    generated = uuid.uuid4().hex
    if not client_value:
        return RequestId(generated)
    return RequestId(generated, client_value[:MAX_LENGTH])
