"""Where ``checkstream run --demo`` keeps its state: a fresh temporary directory per run, so
one try's usage ledger never adds up with another's (CLI process)."""

from __future__ import annotations

import shutil
import tempfile
from importlib.resources import files
from pathlib import Path


def demo_config_path() -> Path:
    """The bundled demo config, inside the installed package (possibly read-only)."""
    return Path(str(files("extproc.demo") / "checkstream.yaml"))


def new_demo_state() -> Path:
    """A new directory holding a copy of the demo config; its relative paths (the usage
    ledger) resolve there. Returns the copy's path. Left in place after the run, so its
    usage can still be read; the system's temporary-file cleaning removes it."""
    directory = Path(tempfile.mkdtemp(prefix="checkstream-demo-"))
    copy = directory / "checkstream.yaml"
    shutil.copyfile(demo_config_path(), copy)
    return copy
