"""This replica's name, as the fleet knows it (launcher and workers).

On Kubernetes the Downward API puts the pod's name in ``POD_NAME``; elsewhere the host name
does. ``CHECKSTREAM_REPLICA`` overrides both (two gateways on one host).
"""

from __future__ import annotations

import os
import socket


def replica_name() -> str:
    return (
        os.environ.get("CHECKSTREAM_REPLICA") or os.environ.get("POD_NAME") or socket.gethostname()
    )
