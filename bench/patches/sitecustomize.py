"""Measurement-only patches of extproc, to size a proposed change before anyone makes it.

Never imported unless this directory is put on ``PYTHONPATH``; each patch is off unless its
environment variable is set. The gateway's processes inherit the environment, so::

    PYTHONPATH=bench/patches CS_BENCH_UVLOOP=1 \\
        .venv/bin/python bench/guardrails.py        # or bench/exchange_cost.py

- ``CS_BENCH_UVLOOP``: ``uvloop.install()`` in the ``serve`` worker only.
- ``CS_BENCH_GRPCOPTS``: extra ``grpc.aio.server`` options, ``name=value,name=value``.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _grpc_options(spec: str) -> None:
    import grpc

    extra: list[tuple[str, Any]] = []
    for item in spec.split(","):
        key, _, value = item.partition("=")
        extra.append((key, int(value) if value.lstrip("-").isdigit() else value))
    original = grpc.aio.server

    def server(*args: Any, **kwargs: Any) -> Any:
        kwargs["options"] = [*(kwargs.get("options") or []), *extra]
        return original(*args, **kwargs)

    grpc.aio.server = server


def _apply() -> None:
    if os.environ.get("CS_BENCH_GRPCOPTS"):
        _grpc_options(os.environ["CS_BENCH_GRPCOPTS"])
    if os.environ.get("CS_BENCH_UVLOOP"):
        with open("/proc/self/cmdline", "rb") as f:
            if b"serve" in f.read().split(b"\0"):
                import uvloop

                uvloop.install()


try:
    _apply()
except Exception as exc:  # never break start-up of an unrelated Python process
    print(f"bench/patches/sitecustomize.py: patch failed: {exc}", file=sys.stderr)
