"""Reading a config for a command, its errors printed in the user's terms (CLI process).

A user's mistake (a bad key, an unknown classifier type, a policy that does not compile) is
one message on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import sys

from checkstream.config.model import LoadedConfig, load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.gateway.runtime import check_config
from checkstream.policy.registry import PluginError


def load_or_report(path: str, *, require_secrets: bool = True) -> LoadedConfig | None:
    """The loaded config, or None once its problems are printed."""
    try:
        return load_config(path, require_secrets=require_secrets)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return None


def compile_or_report(loaded: LoadedConfig) -> bool:
    """Plugins, classifiers and policies; their errors are the user's, so no traceback."""
    try:
        check_config(loaded)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
    except PluginError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
    else:
        return True
    return False
