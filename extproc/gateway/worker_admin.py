"""The admin API of ``checkstream serve --admin``: one extproc worker with no launcher.

Run by the worker itself. On Kubernetes the Pod runs Envoy and extproc as separate
containers (``deploy/kubernetes/``), so no launcher stands between them: the worker serves
``/healthz``, ``/readyz`` (probes), ``/metrics``, ``/admin/status``, reloads and
suspensions on ``server.admin_port`` itself, with the same answers as ``control.py`` gives
for ``checkstream run``. Envoy's listener routes ``/admin/*`` here exactly as it does to a
launcher (``envoy_config.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from prometheus_client.metrics_core import Metric

from checkstream.accounting.suspensions import (
    SuspensionOutcome,
    SuspensionStoreUnavailable,
    record_suspension,
)
from checkstream.config.model import LoadedConfig
from checkstream.gateway.server import Worker
from checkstream.limits.base import Limiter
from checkstream.ops import logs
from checkstream.ops.admin import ReloadOutcome
from checkstream.ops.control import listener_url, proxy_tenant_info
from checkstream.ops.metrics import metric_families, render_metrics
from checkstream.ops.replica import replica_name

log = logs.get("checkstream.admin")


class WorkerAdmin:
    """Implements ``admin.AdminBackend`` for a worker serving on its own."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.reload_error: str | None = None

    def live(self) -> bool:
        return not self.worker.processor.runtime.draining

    def ready(self) -> bool:
        return not self.worker.processor.runtime.draining

    def metrics(self) -> tuple[bytes, str]:
        return render_metrics(None)  # one process: its own registry

    async def reload(self) -> ReloadOutcome:
        async with self.worker.lock:
            version, error = await self.worker.reload()
        self.reload_error = error
        return ReloadOutcome(error is None, version, error)

    async def set_suspended(self, tenant: str, suspended: bool) -> SuspensionOutcome:
        runtime = self.worker.processor.runtime
        accounts = runtime.accounts
        # Without Redis this worker is the whole gateway: its own set is the only copy.
        outcome = await record_suspension(runtime.config, tenant, suspended, accounts.suspensions)
        if outcome.status == 200 and accounts.shared is not None:
            # Recorded either way; if this read fails the follower applies it within
            # FOLLOW_EVERY_S.
            with contextlib.suppress(SuspensionStoreUnavailable):
                await accounts.shared.refresh(accounts.suspensions)
        if outcome.status == 200:
            event = "tenant_suspended" if suspended else "tenant_resumed"
            log.info(event, tenant=tenant)
        return outcome

    async def status(self) -> dict[str, Any]:
        runtime = self.worker.processor.runtime
        return {
            "status": "ready" if self.ready() else "not ready",
            "config_version": runtime.version,
            "replica": replica_name(),
            "config": str(runtime.config.path),
            "reload_error": self.reload_error,
            "workers": [
                {"port": self.worker.port, "alive": True, "config_version": runtime.version}
            ],
        }

    # -- console.ConsoleSource ---------------------------------------------------------------
    def console_config(self) -> LoadedConfig:
        return self.worker.processor.runtime.config

    def local_suspensions(self) -> frozenset[str]:
        return frozenset(self.worker.processor.runtime.accounts.suspensions)

    def metric_families(self) -> list[Metric]:
        return metric_families(None)

    def own_limiter(self) -> Limiter | None:
        return self.worker.processor.runtime.accounts.limiter

    async def tenant_info(
        self, headers: Mapping[str, str], path_qs: str
    ) -> tuple[int, dict[str, str], bytes]:
        url = listener_url(self.worker.processor.runtime.config)
        return await proxy_tenant_info(url, headers, path_qs)
