"""The launcher's side of reloads and suspensions: the admin server's backend.

The launcher validates a new config in full before any worker sees it (so a bad config is
refused with its error while every worker keeps serving), then orders the workers through
the control file and SIGHUP and waits for each one's acknowledgement (``reloading.py``).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.metrics_core import Metric

from checkstream.accounting.suspensions import SuspensionOutcome, kept_in_redis, record_suspension
from checkstream.config.model import LoadedConfig, load_config
from checkstream.config.yamlsource import ConfigError
from checkstream.gateway.runtime import check_config, config_version
from checkstream.limits.base import Limiter
from checkstream.ops import logs
from checkstream.ops.admin import ReloadOutcome
from checkstream.ops.metrics import metric_families, render_metrics
from checkstream.ops.reloading import (
    CONTROL_FILE,
    Control,
    ControlOrder,
    ack_path,
    read_ack,
    restart_needed,
    write_control,
)
from checkstream.ops.replica import replica_name
from checkstream.policy.registry import PluginError

log = logs.get("checkstream.admin")

# Compiling a config may load models; a worker busy with that still answers within this.
_ACK_TIMEOUT_S = 60.0
# Hop-by-hop and framing headers are not forwarded to Envoy for tenant-info.
_NOT_FORWARDED = frozenset({"host", "content-length", "connection", "transfer-encoding"})


@dataclass(frozen=True)
class WorkerHandle:
    port: int
    process: asyncio.subprocess.Process


class GatewayControl:
    """Implements ``admin.AdminBackend`` for a running gateway."""

    def __init__(
        self,
        loaded: LoadedConfig,
        control_dir: Path,
        metrics_dir: Path,
        listener_url: str,
    ) -> None:
        self.loaded = loaded
        self.version = config_version(loaded)
        self.started_version = self.version
        self.control_dir = control_dir
        self.metrics_dir = metrics_dir
        self.listener_url = listener_url
        self.workers: Sequence[WorkerHandle] = ()
        self.serving = False
        #: Admin suspensions when the config has no Redis (else Redis is their only home).
        self.suspensions: set[str] = set()
        #: Why the last reload (admin, SIGHUP or file change) was refused; None once one
        #: succeeds.
        self.reload_error: str | None = None
        #: Set at once on SIGTERM/SIGINT: /healthz and /readyz answer 503 from then on.
        self.draining = False
        self.generation = 0
        self.lock = asyncio.Lock()

    # -- AdminBackend ----------------------------------------------------------------------
    def live(self) -> bool:
        return not self.draining

    def ready(self) -> bool:
        alive = all(w.process.returncode is None for w in self.workers)
        return self.serving and not self.draining and alive

    def metrics(self) -> tuple[bytes, str]:
        return render_metrics(self.metrics_dir)

    async def reload(self) -> ReloadOutcome:
        async with self.lock:
            path = self.loaded.path
            try:
                loaded = await asyncio.to_thread(load_config, path)
                await asyncio.to_thread(check_config, loaded)
            except (ConfigError, PluginError) as exc:
                return self._refused(str(exc))
            except Exception as exc:  # a loader bug: still a refusal naming it, never a bare 500
                log.exception("unexpected error while loading %s", path)
                return self._refused(f"{path}: could not be loaded: {type(exc).__name__}: {exc}")
            why = restart_needed(self.loaded, loaded)
            if why is not None:
                return self._refused(f"{path}: {why}")
            errors = await self._order("reload")
            if errors:
                return self._refused("; ".join(errors))
            self.loaded = loaded
            self.version = config_version(loaded)
            self.reload_error = None
            log.info("reloaded", version=self.version)
            return ReloadOutcome(True, self.version, None)

    async def set_suspended(self, tenant: str, suspended: bool) -> SuspensionOutcome:
        async with self.lock:
            outcome = await record_suspension(self.loaded, tenant, suspended, self.suspensions)
            if outcome.status != 200:
                return outcome
            errors = await self._order("suspensions")
            event = "tenant_suspended" if suspended else "tenant_resumed"
            log.info(event, tenant=tenant)
            if errors and not kept_in_redis(self.loaded):
                return SuspensionOutcome(500, "; ".join(errors))
            # With Redis the suspension is recorded; a worker that missed the order follows
            # the shared state within FOLLOW_EVERY_S anyway.
            return outcome

    async def status(self) -> dict[str, Any]:
        workers = []
        for worker in self.workers:
            ack = read_ack(ack_path(self.control_dir, worker.port))
            workers.append(
                {
                    "port": worker.port,
                    "alive": worker.process.returncode is None,
                    # Until its first order a worker runs the config it started with.
                    "config_version": ack.version if ack is not None else self.started_version,
                }
            )
        return {
            "status": "ready" if self.ready() else "not ready",
            "config_version": self.version,
            "replica": replica_name(),
            "config": str(self.loaded.path),
            "reload_error": self.reload_error,
            "workers": workers,
        }

    async def tenant_info(
        self, headers: Mapping[str, str], path_qs: str
    ) -> tuple[int, dict[str, str], bytes]:
        return await proxy_tenant_info(self.listener_url, headers, path_qs)

    # -- console.ConsoleSource ---------------------------------------------------------------
    def console_config(self) -> LoadedConfig:
        return self.loaded

    def local_suspensions(self) -> frozenset[str]:
        return frozenset(self.suspensions)

    def metric_families(self) -> list[Metric]:
        return metric_families(self.metrics_dir)

    def own_limiter(self) -> Limiter | None:
        return None  # the workers hold it

    # -- workers ---------------------------------------------------------------------------
    def _refused(self, error: str) -> ReloadOutcome:
        self.reload_error = error
        log.error("reload_refused", version=self.version, error=error)
        return ReloadOutcome(False, self.version, error)

    async def _order(self, action: ControlOrder) -> list[str]:
        """Tell every worker to act; the errors they report (empty when all succeeded)."""
        self.generation += 1
        generation = self.generation
        write_control(
            self.control_dir / CONTROL_FILE,
            Control(generation, action, sorted(self.suspensions)),
        )
        for worker in self.workers:
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGHUP)
        errors: list[str] = []
        deadline = time.monotonic() + _ACK_TIMEOUT_S
        for worker in self.workers:
            while True:
                ack = read_ack(ack_path(self.control_dir, worker.port))
                if ack is not None and ack.generation >= generation:
                    if ack.error:
                        errors.append(f"worker on port {worker.port}: {ack.error}")
                    break
                if worker.process.returncode is not None:
                    errors.append(f"worker on port {worker.port} has exited")
                    break
                if time.monotonic() > deadline:
                    errors.append(f"worker on port {worker.port} did not answer")
                    break
                await asyncio.sleep(0.02)
        return errors


async def proxy_tenant_info(
    listener_url: str, headers: Mapping[str, str], path_qs: str
) -> tuple[int, dict[str, str], bytes]:
    """Ask Envoy's listener, so the tenant is resolved exactly as for traffic."""
    forwarded = {k: v for k, v in headers.items() if k.lower() not in _NOT_FORWARDED}
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(listener_url + path_qs, headers=forwarded) as response,
    ):
        body = await response.read()
        return response.status, dict(response.headers), body


def listener_url(loaded: LoadedConfig) -> str:
    """Envoy's listener as this host reaches it."""
    server = loaded.model.server
    return server.local_url(server.port)
