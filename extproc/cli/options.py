"""Options every ``checkstream`` command spells the same way (CLI process)."""

from __future__ import annotations

import argparse
from typing import Final

DEFAULT_CONFIG: Final = "./checkstream.yaml"


def add_config_option(
    parser: argparse.ArgumentParser, *, default: str | None = DEFAULT_CONFIG
) -> None:
    """``-c/--config FILE``, the same on every command that reads a config."""
    parser.add_argument(
        "-c",
        "--config",
        default=default,
        metavar="FILE",
        help=f"config file (default {DEFAULT_CONFIG})",
    )
