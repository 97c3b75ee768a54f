"""What every ``checkstream`` command does the same way: the ``-c`` option, and reading a
config with its errors printed in the user's terms (CLI process)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Final

DEFAULT_CONFIG: Final = "./checkstream.yaml"

if TYPE_CHECKING:
    from checkstream.config.model import LoadedConfig


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


def load_or_report(path: str, *, require_secrets: bool = True) -> LoadedConfig | None:
    """The loaded config, or None once its problems are printed (one message on stderr,
    never a traceback: a bad key is the user's mistake)."""
    from checkstream.config.model import load_config
    from checkstream.config.yamlsource import ConfigError

    try:
        return load_config(path, require_secrets=require_secrets)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return None


def compile_or_report(loaded: LoadedConfig) -> bool:
    """Plugins, classifiers and policies; their errors are the user's, so no traceback."""
    # Imported here: the gRPC and model code they pull in is not needed by every command.
    from checkstream.config.yamlsource import ConfigError
    from checkstream.gateway.runtime import check_config
    from checkstream.policy.registry import PluginError

    try:
        check_config(loaded)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
    except PluginError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
    else:
        return True
    return False
