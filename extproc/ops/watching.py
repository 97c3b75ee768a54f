"""Reload when the config or a policy file changes on disk.

Run by the launcher (``checkstream run``) and by ``checkstream serve`` when it runs on its
own (the Kubernetes sidecar). A change is applied through the same path as SIGHUP and
``POST /admin/reload``: validated in full, refused with its error while the old config keeps
serving. A refused change is not retried until the files change again.

Why polling file contents: a Kubernetes ConfigMap update lands as an atomic swap of the
volume's ``..data`` symlink; the file's own path never sees a write, so a watch on the file
(inotify) misses it, which is why envoyproxy/ratelimit watches the directory. Reading the
config and its policy files (a few kilobytes) every ``WATCH_EVERY_S`` sees every kind of
update (in-place write, rename over, symlink swap) at a cost too small to measure, needs no
dependency, and keeps the 5 s goal with room to spare.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from checkstream.config.model import LoadedConfig
from checkstream.ops import logs

log = logs.get("checkstream.watch")

WATCH_EVERY_S: Final = 1.0


def watched_files(loaded: LoadedConfig) -> tuple[Path, ...]:
    """The config file and every policy file it names, as the config names them (through
    any symlink, never resolved: the swap happens behind the link)."""
    base = loaded.path.parent
    policies = {
        base / tenant.policy_path
        for tenant in loaded.model.tenants.configs.values()
        if tenant.policy_path is not None
    }
    return (loaded.path, *sorted(policies))


def digests(paths: tuple[Path, ...]) -> dict[Path, str | None]:
    """Each file's content digest; None for a file that cannot be read right now."""
    found: dict[Path, str | None] = {}
    for path in paths:
        try:
            found[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            found[path] = None
    return found


async def watch_config(
    current: Callable[[], LoadedConfig],
    reload: Callable[[], Awaitable[object]],
    every_s: float = WATCH_EVERY_S,
) -> None:
    """Call ``reload`` whenever the files of ``current()`` change; runs until cancelled."""
    seen = await asyncio.to_thread(digests, watched_files(current()))
    while True:
        await asyncio.sleep(every_s)
        files = watched_files(current())
        now = await asyncio.to_thread(digests, files)
        if now == seen:
            continue
        changed = sorted(str(path) for path in files if now.get(path) != seen.get(path))
        log.info("config_changed", files=changed)
        await reload()
        # A reload may name other policy files: watch what is in force now, as it is now
        # (a change made during the reload shows up at the next look).
        files_after = watched_files(current())
        seen = now if files_after == files else await asyncio.to_thread(digests, files_after)
