"""Regenerate envoy/envoy.yaml: ``python envoy/annotate.py > envoy/envoy.yaml``.

Renders envoy/example-checkstream.yaml exactly as ``checkstream envoy render`` does and adds
comments, so the hand-readable example never drifts from what ``checkstream run`` uses
(tests/test_e2e_lifecycle.py checks both).
"""

from __future__ import annotations

import sys
from pathlib import Path

from checkstream.config.model import load_config
from checkstream.ops.envoy_config import render_yaml

HERE = Path(__file__).resolve().parent
HEADER = """\
# A hand-readable example of the Envoy bootstrap that `checkstream run` generates: what
# `checkstream envoy render -c envoy/example-checkstream.yaml` prints (two tenants: acme-corp
# on https://api.openai.com/v1 and local-vllm on http://127.0.0.1:8000/v1), with comments.
# Use it if you run Envoy yourself; otherwise `checkstream run` renders it for you.
# Regenerate with `python envoy/annotate.py > envoy/envoy.yaml`.
"""
NOTES = {
    "admin:": "# Envoy's own admin interface: loopback only. `checkstream run` polls /ready and\n"
    "# drains here.",
    "overload_manager:": "# A hard cap on client connections, so a flood cannot exhaust file "
    "descriptors.",
    "  listeners:": "  # The listener clients call instead of api.openai.com / api.anthropic.com.",
    "          use_remote_address: true": "          # The client's address is the connection's "
    "peer, never its own X-Forwarded-For\n"
    "          # (allowed_cidrs, trusted_networks: extproc/tenants/access.py); the header "
    "passes on "
    "unchanged.",
    "            request_headers_to_remove:": "            # The routing header extproc sets "
    "is internal: the backend never sees it.",
    "              - name: tenant:acme-corp": "              # One route per tenant. extproc "
    "resolves the tenant (header, /tenant/<id>/\n"
    "              # prefix or API key) and sets x-checkstream-route; clear_route_cache makes\n"
    "              # Envoy pick the route again. idle_timeout is the tenant's "
    "backend_timeout_ms:\n"
    "              # it bounds the backend's silence, not the length of a streamed answer.",
    "              - name: unrouted": "              # Reached only if extproc did not route "
    "the request: never forward it.",
    "          - name: drop_invalid_request_id": "          # A client's invalid x-request-id "
    "is dropped before anything answers;\n          # extproc then gives the request a new "
    "one (extproc/intake/request_ids.py).",
    "          - name: strip_internal_headers": "          # A client must not choose its own "
    "route: drop the header before ext_proc runs.",
    "          - name: envoy.filters.http.ext_proc": "          # CheckStream's decisions. Every "
    "request goes to extproc; fail closed if it is\n"
    "          # down. extproc's answer to the request headers sets, per request\n"
    "          # (mode_override), the body modes its tenant's checks need, so a\n"
    "          # pass-through request costs one gRPC message. Why: extproc/gateway/exchange.py.",
    "          local_reply_config:": "          # Envoy's own errors (backend down or silent, "
    "body too large, extproc down) in the\n"
    "          # error format clients expect: Anthropic's when extproc marked the request with\n"
    "          # dynamic metadata checkstream.format=anthropic, OpenAI's otherwise.",
    "  - name: checkstream_extproc": "  # extproc workers, one port each "
    "(server.extproc_port, +1 per extra worker).",
    "  - name: backend_https_api_openai_com_443": "  # One cluster per distinct backend "
    "(scheme, host, port). HTTPS backends get TLS with\n"
    "  # SNI and certificate checks against the system CA bundle.",
}


def annotated() -> str:
    rendered = render_yaml(load_config(HERE / "example-checkstream.yaml").model)
    lines = []
    for line in rendered.splitlines():
        note = NOTES.get(line.rstrip())
        if note:
            lines.append(note)
        lines.append(line)
    return HEADER + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(annotated())
