"""Config reloads without a restart, and how the launcher tells its workers about them.

A reload re-reads the config and every policy file, validates and compiles them fully, and
only then swaps the new ``Runtime`` in; a request keeps the runtime it started with, so
requests in flight finish under their config. A config that fails anywhere is refused with
its error and the old one keeps serving.

Some settings cannot change under a running gateway and are refused with "restart to
apply": anything in Envoy's bootstrap (listeners, ports, tenants and their backends, since
each tenant has its own route and cluster) and the stores behind counts (``limits``,
``usage``), which would otherwise restart every tenant's counts from zero.

The launcher and its workers talk through two small files in the launcher's private
directory: it writes ``control.json`` (a generation number, the action, the admin's
suspensions), then sends each worker SIGHUP; each worker acts on it and answers in
``ack-<port>.json`` with that generation, the config version in force and any error. Files
and a signal need no extra port, work for any number of workers, and survive a worker that
is busy for a moment. Without a control file (``checkstream serve`` on its own), SIGHUP
simply reloads the config.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from checkstream.config.model import LoadedConfig
from checkstream.ops.envoy_config import render_yaml

ControlOrder = Literal["reload", "suspensions"]
CONTROL_FILE = "control.json"


class RestartNeeded(Exception):
    """The new config is valid but cannot be applied to a running gateway."""


def restart_needed(old: LoadedConfig, new: LoadedConfig) -> str | None:
    """Why ``new`` cannot replace ``old`` in a running gateway, or None if it can."""
    if render_yaml(old.model) != render_yaml(new.model):
        return (
            "the change alters Envoy's configuration (server ports, tenants or their backends): "
            "restart to apply"
        )
    for key in ("limits", "usage"):
        if getattr(old.model, key) != getattr(new.model, key):
            return f"the change alters '{key}', which holds every tenant's counts: restart to apply"
    return None


@dataclass(frozen=True)
class Control:
    generation: int
    action: ControlOrder
    #: Tenants an admin suspended, when the launcher holds them (no Redis: suspensions.py).
    suspensions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Ack:
    generation: int
    version: str
    error: str | None = None


def _write_atomically(path: Path, data: object) -> None:
    # A worker may read at any moment: it must see the old file or the new one, never half.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def write_control(path: Path, control: Control) -> None:
    _write_atomically(path, asdict(control))


def read_control(path: Path) -> Control | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return Control(int(data["generation"]), data["action"], list(data.get("suspensions", [])))


def ack_path(directory: Path, port: int) -> Path:
    return directory / f"ack-{port}.json"


def write_ack(path: Path, ack: Ack) -> None:
    _write_atomically(path, asdict(ack))


def read_ack(path: Path) -> Ack | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return Ack(int(data["generation"]), str(data["version"]), data.get("error"))
