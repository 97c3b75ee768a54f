"""Where ``checkstream run --demo`` keeps its state: a fresh temporary directory per run, so
one try's usage ledger never adds up with another's (CLI process)."""

from __future__ import annotations

import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Final

#: Where the bundled config expects the demo upstream (``run --demo-port`` moves it).
BUNDLED_DEMO_PORT: Final = 9001
_BUNDLED_UPSTREAM: Final = f"http://127.0.0.1:{BUNDLED_DEMO_PORT}"


def demo_config_path() -> Path:
    """The bundled demo config, inside the installed package (possibly read-only)."""
    return Path(str(files("checkstream.demo") / "checkstream.yaml"))


def new_demo_state(demo_port: int = BUNDLED_DEMO_PORT) -> Path:
    """A new directory holding a copy of the demo config, its tenants pointed at the demo
    upstream on ``demo_port``; its relative paths (the usage ledger) resolve there. Returns
    the copy's path. Left in place after the run, so its usage can still be read; the
    system's temporary-file cleaning removes it."""
    directory = Path(tempfile.mkdtemp(prefix="checkstream-demo-"))
    copy = directory / "checkstream.yaml"
    text = demo_config_path().read_text()
    copy.write_text(text.replace(_BUNDLED_UPSTREAM, f"http://127.0.0.1:{demo_port}"))
    return copy
