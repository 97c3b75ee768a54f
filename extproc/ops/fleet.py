"""``checkstream fleet status URL...``: is every replica up and on the same config? (CLI)

Asks each replica's admin endpoint (``GET /admin/status``, with ``$CHECKSTREAM_ADMIN_TOKEN``)
at the same time and prints one line per replica: its config version, its health, and
whether it drifts from the fleet (a version other than the most common one, or workers
inside it that disagree). Exit 0 when every replica answered, is ready and none drifts;
1 otherwise, so a deploy pipeline can wait on it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from checkstream.ops.admin import TOKEN_HEADER

TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ReplicaStatus:
    url: str
    version: str | None  # None when the replica did not answer
    health: str  # "ready", "not ready", or why it could not be asked
    replica: str | None = None
    #: Versions its workers run, when they differ from its own.
    worker_versions: tuple[str, ...] = ()


def ask(url: str, token: str | None) -> ReplicaStatus:
    base = url.rstrip("/")
    request = urllib.request.Request(f"{base}/admin/status")
    if token is not None:
        request.add_header(TOKEN_HEADER, token)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            data: Any = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        reason = "admin token missing or wrong" if exc.code in (401, 403) else exc.reason
        return ReplicaStatus(base, None, f"unreachable: HTTP {exc.code} ({reason})")
    except (OSError, ValueError) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return ReplicaStatus(base, None, f"unreachable: {why}")
    version = str(data.get("config_version"))
    workers = tuple(
        str(w.get("config_version")) for w in data.get("workers", []) if isinstance(w, dict)
    )
    return ReplicaStatus(
        base,
        version,
        str(data.get("status", "unknown")),
        data.get("replica"),
        tuple(sorted({v for v in workers if v != version})),
    )


def fleet_status(urls: Sequence[str], token: str | None) -> list[ReplicaStatus]:
    with ThreadPoolExecutor(min(16, len(urls))) as pool:
        return list(pool.map(lambda url: ask(url, token), urls))


def drift(statuses: Sequence[ReplicaStatus]) -> dict[str, str]:
    """url -> why it drifts, for the replicas that do."""
    versions = Counter(s.version for s in statuses if s.version is not None)
    # The most common version is the fleet's; on a tie, the first replica's among them.
    top = max(versions.values(), default=0)
    fleet = next((s.version for s in statuses if s.version and versions[s.version] == top), None)
    found = {}
    for status in statuses:
        if status.version is not None and status.version != fleet:
            found[status.url] = f"drift (fleet runs {fleet})"
        elif status.worker_versions:
            found[status.url] = f"drift (workers on {', '.join(status.worker_versions)})"
    return found


def render(statuses: Sequence[ReplicaStatus]) -> tuple[str, bool]:
    """The table and whether the fleet is healthy and agrees."""
    drifting = drift(statuses)
    rows = [("REPLICA", "URL", "CONFIG VERSION", "HEALTH", "DRIFT")]
    for s in statuses:
        rows.append((s.replica or "-", s.url, s.version or "-", s.health, drifting.get(s.url, "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    ok = not drifting and all(s.health == "ready" for s in statuses)
    versions = {s.version for s in statuses if s.version is not None}
    if ok:
        lines.append(f"{len(statuses)} replicas ready on config version {versions.pop()}")
    else:
        lines.append("the fleet is not ready on one config version")
    return "\n".join(lines) + "\n", ok
