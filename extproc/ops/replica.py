"""Which replica this process belongs to: the name audit records and chain files carry.

Run by extproc workers (and the CLI). Every worker of one gateway shares the name, so they
share one chain per tenant (``flock`` works on one host); replicas get different names, so each
writes its own chain and no lock has to work across hosts.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_INVALID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class ReplicaNameError(ValueError):
    """CHECKSTREAM_REPLICA holds a name that cannot be part of a file name."""


def replica_name(
    configured: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """``CHECKSTREAM_REPLICA``, else ``server.replica``, else ``POD_NAME`` (Kubernetes' downward
    API), else the host name; pod and host names are made file-name safe."""
    if environ is None:
        environ = os.environ
    explicit = environ.get("CHECKSTREAM_REPLICA")
    if explicit:
        if not _VALID.match(explicit):
            raise ReplicaNameError(
                f"CHECKSTREAM_REPLICA={explicit!r}: expected letters, digits, '.', '_' or '-' "
                "(at most 63, starting with a letter or digit)"
            )
        return explicit
    if configured:
        return configured  # validated with the config
    return _safe(environ.get("POD_NAME") or socket.gethostname())


def _safe(name: str) -> str:
    cleaned = _INVALID_CHARS.sub("-", name).strip("-._")[:63]
    return cleaned or "replica"
