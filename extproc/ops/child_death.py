"""Children that cannot outlive the launcher, even when it is SIGKILLed (launcher).

Linux's ``PR_SET_PDEATHSIG`` has the kernel signal a child when the thread that started it
dies, whatever killed it. The signal is SIGTERM: a worker then drains and closes its ledger
and audit files as on any stop. Elsewhere this is a no-op; the launcher's own exit paths
still stop every child.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when ``parent`` dies; None where
    the kernel cannot."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    # Looked up here, in the parent: the child, between fork and exec, does as little as it
    # can (other threads' locks were copied in whatever state they were).
    prctl = libc.prctl
    term = int(signal.SIGTERM)

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, term, 0, 0, 0)
        if os.getppid() != parent:
            # The launcher died before the request was armed: nobody will ever stop us.
            os._exit(1)

    return arm
