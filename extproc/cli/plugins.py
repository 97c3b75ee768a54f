"""``checkstream plugins``: which classifier types are installed, and where each comes from
(CLI process).

One row per classifier type: the plugin (entry point in the ``checkstream`` group) offering
it, that entry point's distribution and version, and the hooks the plugin implements. A
plugin offering no type (only ``checkstream_shutdown``, say) gets a row with no type, so
everything that loads into a worker is listed. Nothing is built: factories (and the models
they load) are not called.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Literal

from checkstream.policy.registry import ENTRY_POINT_GROUP, PluginError, Registry, load_registry


@dataclass(frozen=True)
class PluginRow:
    type: str | None  # None: the plugin offers no classifier type
    plugin: str
    distribution: str | None  # None: not from an installed distribution
    version: str | None
    hooks: tuple[str, ...]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plugins = commands.add_parser(
        "plugins",
        help="installed classifier types: plugin, distribution, version and hooks",
    )
    plugins.add_argument(
        "--format", choices=["table", "json"], default="table", help="output format (table)"
    )
    plugins.set_defaults(handler=_cmd_plugins)


def _cmd_plugins(args: argparse.Namespace) -> int:
    try:
        registry = load_registry()
    except PluginError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    rows = plugin_rows(registry, entry_points(group=ENTRY_POINT_GROUP))
    sys.stdout.write(render(rows, args.format))
    return 0


def plugin_rows(registry: Registry, installed: Iterable[EntryPoint]) -> list[PluginRow]:
    """Rows sorted by type, then the plugins offering no type, by plugin name; ``installed``
    is the group's entry points, where each plugin's distribution is found."""
    by_name = {ep.name: ep for ep in installed}
    manager = registry.manager
    hooks: dict[str, tuple[str, ...]] = {}
    if manager is not None:
        for name, plugin in manager.list_name_plugin():
            callers = manager.get_hookcallers(plugin) or []
            hooks[name] = tuple(sorted(caller.name for caller in callers))

    def row(type_name: str | None, plugin: str) -> PluginRow:
        ep = by_name.get(plugin)
        dist = ep.dist if ep is not None else None
        return PluginRow(
            type_name,
            plugin,
            dist.name if dist is not None else None,
            dist.version if dist is not None else None,
            hooks.get(plugin, ()),
        )

    rows = [row(name, kind.plugin) for name, kind in sorted(registry.types.items())]
    offering = {kind.plugin for kind in registry.types.values()}
    rows += [row(None, plugin) for plugin in sorted(set(hooks) - offering)]
    return rows


def render(rows: Sequence[PluginRow], fmt: Literal["table", "json"]) -> str:
    if fmt == "json":
        return json.dumps([{**asdict(r), "hooks": list(r.hooks)} for r in rows], indent=2) + "\n"
    header = ("TYPE", "PLUGIN", "DISTRIBUTION", "VERSION", "HOOKS")
    cells = [
        (
            r.type or "-",
            r.plugin,
            r.distribution or "-",
            r.version or "-",
            ", ".join(r.hooks) or "-",
        )
        for r in rows
    ]
    lines = (header, *cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in lines
    )
