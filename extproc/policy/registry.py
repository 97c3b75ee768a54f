"""Plugin discovery: every module in the ``checkstream`` entry-point group, built-ins included.

A plugin that fails to import, or offers a classifier type another plugin already offers,
refuses start-up with an error naming it; CheckStream never runs with a guardrail missing.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import pluggy

from checkstream import hookspecs
from checkstream.types import Classifier, ClassifierFactory

ENTRY_POINT_GROUP = "checkstream"
_HOOKS = frozenset(n for n in dir(hookspecs) if n.startswith(f"{hookspecs.PROJECT}_"))


class PluginError(Exception):
    """A plugin could not be loaded; the message names it."""


@dataclass(frozen=True)
class ClassifierType:
    name: str
    factory: ClassifierFactory
    plugin: str  # the entry point's name, for error messages


@dataclass(frozen=True)
class Registry:
    types: Mapping[str, ClassifierType]
    manager: pluggy.PluginManager | None = None

    def describe(self) -> str:
        return ", ".join(sorted(self.types)) or "none"

    async def startup(self, classifiers: Mapping[str, Classifier]) -> None:
        """Every plugin's ``checkstream_startup`` (in a thread: model loading blocks), so the
        classifiers are ready before traffic; ``PluginError`` naming the plugin that failed."""
        if self.manager is None:
            return
        for impl in self.manager.hook.checkstream_startup.get_hookimpls():
            name = self.manager.get_name(impl.plugin) or repr(impl.plugin)
            args = [classifiers for _ in impl.argnames]
            try:
                result = await asyncio.to_thread(impl.function, *args)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                raise PluginError(
                    f"plugin '{name}' failed in checkstream_startup: {type(exc).__name__}: {exc}"
                ) from None

    async def shutdown(self) -> None:
        """Every plugin's ``checkstream_shutdown``, awaited where it returns an awaitable."""
        if self.manager is None:
            return
        for result in self.manager.hook.checkstream_shutdown():
            if inspect.isawaitable(result):
                await result


def load_registry(extra: Iterable[tuple[str, ModuleType | object]] = ()) -> Registry:
    """Load all installed plugins (plus ``extra`` (name, module) pairs, used by tests)."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for name, plugin in [*(_import(ep) for ep in _entry_points()), *extra]:
        if manager.is_registered(plugin):
            continue  # the same module under two names (installed and passed in `extra`)
        try:
            manager.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"plugin '{name}' cannot be registered: {exc}") from None
        # A misspelt hook would otherwise load silently and offer nothing.
        for attribute in dir(plugin):
            if attribute.startswith(f"{hookspecs.PROJECT}_") and attribute not in _HOOKS:
                raise PluginError(
                    f"plugin '{name}' implements unknown hook '{attribute}' "
                    "(the hooks are listed in the module checkstream.hookspecs)"
                )
        if not manager.get_hookcallers(plugin):
            raise PluginError(
                f"plugin '{name}' implements no hook: mark its functions with "
                "`@hookimpl` (from checkstream import hookimpl)"
            )
    manager.check_pending()
    types: dict[str, ClassifierType] = {}
    for impl in manager.hook.checkstream_classifier_types.get_hookimpls():
        plugin_name = manager.get_name(impl.plugin) or repr(impl.plugin)
        try:
            offered: Any = impl.function()
        except Exception as exc:
            raise PluginError(
                f"plugin '{plugin_name}' failed in checkstream_classifier_types: {exc!r}"
            ) from None
        if not isinstance(offered, Mapping):
            raise PluginError(
                f"plugin '{plugin_name}': checkstream_classifier_types must return a mapping "
                f"of type name to factory, got {type(offered).__name__}"
            )
        for type_name, factory in offered.items():
            if not isinstance(type_name, str) or not callable(factory):
                raise PluginError(
                    f"plugin '{plugin_name}': classifier type {type_name!r} "
                    "needs a callable factory"
                )
            if type_name in types:
                raise PluginError(
                    f"classifier type '{type_name}' is offered by both plugin "
                    f"'{types[type_name].plugin}' and plugin '{plugin_name}'"
                )
            types[type_name] = ClassifierType(type_name, factory, plugin_name)
    return Registry(types, manager)


def _entry_points() -> list[EntryPoint]:
    # The same distribution can be seen twice (an editable install plus a build dir).
    unique = {(ep.name, ep.value): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(unique.values(), key=lambda ep: ep.name)


def _import(ep: EntryPoint) -> tuple[str, Any]:
    try:
        return ep.name, ep.load()
    except Exception as exc:
        raise PluginError(
            f"plugin '{ep.name}' ({ep.value}) failed to import: {type(exc).__name__}: {exc}"
        ) from None
