"""Requests for the operator, not a tenant: answered or routed before any tenant is looked up
(worker process).

``/healthz`` is answered here (503 while draining, so a load balancer stops sending traffic);
``/metrics``, ``/readyz``, the operator ``/admin/*`` endpoints and, when the operator put it on
the listener, the console (``/ui/``) go on to the launcher's admin server, which checks the
admin token itself. ``GET /admin/tenant-info`` is a tenant's request: it resolves like traffic.
"""

from __future__ import annotations

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse

from checkstream.gateway.mutations import TO_ADMIN, immediate
from checkstream.gateway.runtime import Runtime

# Served by the launcher's admin server, through the listener unless the operator says not.
_OPERATOR_PATHS = frozenset({"/metrics", "/readyz"})


def route_operator(runtime: Runtime, path: str, method: str) -> ProcessingResponse | None:
    """The answer for an operator's request, or None for a tenant's."""
    bare = path.partition("?")[0]
    if bare == "/healthz":
        if runtime.draining:
            return immediate(503, b'{"status":"draining"}', details="checkstream_health")
        return immediate(200, b'{"status":"ok"}', details="checkstream_health")
    server = runtime.config.model.server
    if bare in _OPERATOR_PATHS:
        if server.metrics_on_listener:
            return TO_ADMIN
        return immediate(404, b'{"error": "not served on this listener"}', details="no_route")
    if bare.startswith("/admin/") and not (bare == "/admin/tenant-info" and method == "GET"):
        return TO_ADMIN
    if server.console_on_listener and (bare == "/ui" or bare.startswith("/ui/")):
        return TO_ADMIN  # the operator console, when the operator put it here
    return None
