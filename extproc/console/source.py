"""What the operator console needs from the gateway it runs in.

Run by the admin server. The launcher's ``GatewayControl`` and a lone worker's
``WorkerAdmin`` both implement it, beside ``admin.AdminBackend``; the admin app adds the
console when its backend does.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from prometheus_client.metrics_core import Metric

from checkstream.accounting.suspensions import SuspensionOutcome
from checkstream.config.model import LoadedConfig
from checkstream.limits.base import Limiter


@runtime_checkable
class ConsoleSource(Protocol):
    def console_config(self) -> LoadedConfig:
        """The configuration serving now (it changes with reloads)."""
        ...

    def local_suspensions(self) -> frozenset[str]:
        """Admin suspensions this process holds: the only copy when the config has no Redis
        (with Redis the console reads them there, like every worker)."""
        ...

    def metric_families(self) -> list[Metric]:
        """This gateway's metrics (all its workers), as ``/metrics`` would show them.
        Blocking: the launcher reads the workers' files."""
        ...

    def own_limiter(self) -> Limiter | None:
        """The limiter deciding this process's traffic, when it runs in this process."""
        ...

    async def set_suspended(self, tenant: str, suspended: bool) -> SuspensionOutcome:
        """Exactly the admin API's suspend and resume."""
        ...

    async def status(self) -> dict[str, Any]:
        """``GET /admin/status``: config version, replica, workers."""
        ...
