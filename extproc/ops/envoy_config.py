"""The Envoy bootstrap that ``checkstream run`` uses, built from checkstream.yaml.

Built as data rather than text templating so tenant ids, header values and hostnames are
quoted correctly by construction. ``envoy/envoy.yaml`` is a hand-readable example of the
same shape for users who keep their own Envoy config.

Routing: extproc resolves the tenant and sets ``x-checkstream-route: <tenant>`` with
``clear_route_cache``; there is one route per tenant matching that header, pointing at the
cluster of the tenant's backend (one cluster per distinct scheme/host/port). A client cannot
pick a route itself: the header is stripped before ext_proc runs and before the backend.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import yaml

from checkstream.accounting.deferred import HANDOFF_KEY, LIMIT_HEADERS
from checkstream.config.model import CheckStreamConfig
from checkstream.gateway.backends import Backend, backend_from_url
from checkstream.gateway.mutations import ADMIN_ROUTE, METADATA_NAMESPACE, ROUTE_HEADER

EXTPROC_CLUSTER = "checkstream_extproc"
ADMIN_CLUSTER = "checkstream_admin"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
# Many long-lived LLM streams per backend are normal; Envoy's default circuit breakers
# (1024 requests) would turn a busy gateway into 503s.
_CIRCUIT_BREAKERS = {
    "thresholds": [
        {
            "priority": "DEFAULT",
            "max_connections": 100000,
            "max_pending_requests": 100000,
            "max_requests": 100000,
            "max_retries": 3,
        }
    ]
}
_MAX_CONNECTIONS = 50000
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Envoy's own failures, mapped to what an LLM client expects in its error format.
_TIMEOUT_FLAGS = ["UT", "SI"]
_UNREACHABLE_FLAGS = ["UF", "UH", "UC", "URX", "UO", "LR"]


def render_bootstrap(config: CheckStreamConfig) -> dict[str, Any]:
    server = config.server
    backends: dict[str, Backend] = {}
    routes = []
    for tenant_id, tenant in config.tenants.configs.items():
        backend = backend_from_url(tenant.backend_url)
        backends.setdefault(backend.cluster_name, backend)
        routes.append(
            {
                "name": f"tenant:{tenant_id}",
                "match": {
                    "prefix": "/",
                    "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": tenant_id}}],
                },
                "route": {
                    "cluster": backend.cluster_name,
                    "host_rewrite_literal": backend.authority,
                    # backend_timeout_ms bounds the backend's silence (before the answer and
                    # between chunks), not a long streamed answer's total length.
                    "timeout": "0s",
                    "idle_timeout": f"{tenant.backend_timeout_ms / 1000:g}s",
                },
                **_accounting_route(tenant.accounting == "deferred"),
            }
        )
    # /metrics, /readyz and the operator's /admin/* endpoints, served by the launcher; extproc
    # picks this route for those paths (GET /admin/tenant-info excepted: extproc answers it,
    # resolving the tenant like any request).
    routes.append(
        {
            "name": "admin",
            "match": {
                "prefix": "/",
                "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": ADMIN_ROUTE}}],
            },
            "route": {"cluster": ADMIN_CLUSTER, "timeout": "120s"},
        }
    )
    routes.append(
        {
            "name": "unrouted",
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 503,
                "body": {
                    "inline_string": '{"error":{"message":"request was not processed by '
                    'CheckStream","type":"server_error","param":null,"code":"unrouted"}}'
                },
            },
        }
    )
    return {
        "admin": {"address": _address("127.0.0.1", server.envoy_admin_port)},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": _MAX_CONNECTIONS,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [_listener(config, routes)],
            "clusters": [_extproc_cluster(config), _admin_cluster(config)]
            + [_backend_cluster(b) for b in backends.values()],
        },
    }


class _PlainDumper(yaml.SafeDumper):
    """No ``&id001`` anchors: the output is meant to be read."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_yaml(config: CheckStreamConfig) -> str:
    return yaml.dump(render_bootstrap(config), Dumper=_PlainDumper, sort_keys=False, width=100)


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


# A client's x-request-id reaches logs, audit trails and the ledger, and Envoy echoes the
# request's id on every response, its own and extproc's immediate ones included: an invalid
# one (over 128 characters, or other than [A-Za-z0-9._:-]) is dropped here, before anything
# answers, and extproc gives the request a new one (request_ids.py).
_DROP_INVALID_REQUEST_ID = """\
function envoy_on_request(handle)
  local headers = handle:headers()
  local id = headers:get("x-request-id")
  if id ~= nil and (#id == 0 or #id > 128 or string.find(id, "[^%w%._:%-]")) then
    headers:remove("x-request-id")
  end
end
"""


def _listener(config: CheckStreamConfig, routes: list[dict[str, Any]]) -> dict[str, Any]:
    server = config.server
    defers = logs_deferred(config)
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "checkstream",
        "codec_type": "AUTO",
        # source.address is then the connection's peer: without this Envoy takes it from the
        # client's own X-Forwarded-For, and an address allow-list would trust the client.
        "use_remote_address": True,
        # Appending would add Envoy's own address for loopback peers, and backends saw the
        # header as the client sent it before: keep that.
        "skip_xff_append": True,
        # With use_remote_address every client is external to Envoy (no internal_address_config),
        # and Envoy would replace a client's x-request-id: keep it, as before.
        "preserve_external_request_id": True,
        # x-request-id on every response, Envoy's own replies included (request_ids.py).
        "generate_request_id": True,
        "always_set_request_id_in_response": True,
        "route_config": {
            "name": "checkstream",
            # use_remote_address makes Envoy tell backends the client's address: not theirs.
            "request_headers_to_remove": [ROUTE_HEADER, "x-envoy-external-address"],
            "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {
                "name": "drop_invalid_request_id",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": _DROP_INVALID_REQUEST_ID},
                },
            },
            {
                "name": "strip_internal_headers",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http."
                    "header_mutation.v3.HeaderMutation",
                    "mutations": {"request_mutations": [{"remove": ROUTE_HEADER}]},
                },
            },
            {"name": "envoy.filters.http.ext_proc", "typed_config": _ext_proc(config)},
            *([_USAGE_FILTER] if defers else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                    # x-envoy-* headers tell clients and backends about internals.
                    "suppress_envoy_headers": True,
                },
            },
        ],
        "local_reply_config": {"mappers": _local_reply_mappers()},
    }
    if defers:
        hcm["access_log"] = [_DEFERRED_ACCESS_LOG]
    return {
        "name": "checkstream",
        "address": _address(server.host, server.port),
        "per_connection_buffer_limit_bytes": server.max_request_bytes,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


# accounting: deferred (accounting/deferred.py). Reads, as the answer's bytes pass and
# without holding them, the model and usage numbers it reports at its start (every API
# names the model there; Anthropic streams their input tokens in message_start) and end;
# only digit strings and a checked model name are stored, so the access log's protobuf
# strings are always valid UTF-8. The request is not read: a Lua coroutine per direction
# costs Envoy more than the model name is worth. Enabled only on deferred tenants' routes.
USAGE_LUA = r"""
local NS = "checkstream.deferred"

local function last(text, pattern)
  local found = nil
  for value in string.gmatch(text, pattern) do found = value end
  return found
end

local function keep(meta, key, value)
  if value ~= nil and #value <= 15 then meta:set(NS, key, value) end
end

function envoy_on_response(handle)
  local head, tail, events = "", "", 0
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then
      local bytes = chunk:getBytes(0, n)
      if #head < 2048 then head = head .. string.sub(bytes, 1, 2048 - #head) end
      tail = string.sub(tail .. string.sub(bytes, -4096), -4096)
      local _, count = string.gsub(bytes, "data:", "")
      events = events + count
    end
  end
  local meta = handle:streamInfo():dynamicMetadata()
  -- The model the backend says answered, unless extproc read the request's.
  local model = string.match(head, '"model"%s*:%s*"([^"\\]*)"')
  if model ~= nil and #model <= 200 and string.find(model, "^[%w%._:/@+%-]+$") then
    meta:set(NS, "model", model)
  end
  local n = '"%s*:%s*(%d+)'
  keep(meta, "prompt", last(tail, '"prompt_tokens' .. n))
  keep(meta, "completion", last(tail, '"completion_tokens' .. n))
  keep(meta, "input", last(tail, '"input_tokens' .. n))
  keep(meta, "output", last(tail, '"output_tokens' .. n))
  keep(meta, "cache_creation", last(tail, '"cache_creation_input_tokens' .. n))
  keep(meta, "cache_read", last(tail, '"cache_read_input_tokens' .. n))
  keep(meta, "head_input", string.match(head, '"input_tokens' .. n))
  keep(meta, "head_cache_creation", string.match(head, '"cache_creation_input_tokens' .. n))
  keep(meta, "head_cache_read", string.match(head, '"cache_read_input_tokens' .. n))
  -- Content events of an OpenAI stream: all but the role, the finish and [DONE].
  if events > 3 then keep(meta, "events", tostring(events - 3)) end
end
"""
_USAGE_FILTER = {
    "name": "checkstream_usage",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        # No default script: a route runs the reader only when it names it
        # (_accounting_route), so no other route pays for it.
        "source_codes": {"usage": {"inline_string": USAGE_LUA}},
    },
}
_LUA_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute"
# Deferred requests' ends, batched: one gRPC message for all the requests of a flush
# interval. Only requests extproc handed off (their metadata says so) are sent.
ACCESS_LOG_FLUSH_S = 0.05
_DEFERRED_ACCESS_LOG = {
    "name": "envoy.access_loggers.http_grpc",
    "filter": {
        "metadata_filter": {
            "matcher": {
                "filter": METADATA_NAMESPACE,
                "path": [{"key": HANDOFF_KEY}],
                "value": {"present_match": True},
            },
            "match_if_key_not_found": False,
        }
    },
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3."
        "HttpGrpcAccessLogConfig",
        "common_config": {
            "log_name": "checkstream_deferred",
            "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
            "buffer_flush_interval": f"{ACCESS_LOG_FLUSH_S}s",
            "buffer_size_bytes": 65536,
        },
    },
}


def logs_deferred(config: CheckStreamConfig) -> bool:
    """Envoy carries the usage reader and the access log: some tenant is deferred."""
    return any(t.accounting == "deferred" for t in config.tenants.configs.values())


def _accounting_route(deferred: bool) -> dict[str, Any]:
    """A route's part in deferred accounting: the usage reader on (off elsewhere), and the
    X-RateLimit-* headers extproc's admission left in the request's metadata."""
    if not deferred:
        return {}
    return {
        "typed_per_filter_config": {
            "checkstream_usage": {"@type": _LUA_PER_ROUTE, "name": "usage"}
        },
        "response_headers_to_add": [
            {
                "header": {
                    "key": name,
                    "value": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{name})%",
                },
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
            for name in LIMIT_HEADERS
        ]
    }


def _ext_proc(config: CheckStreamConfig) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": "10s"},
        # Guardrails must not silently vanish: if extproc is down, requests fail.
        "failure_mode_allow": False,
        # Each request's header answer sets, with mode_override, exactly what its tenant
        # needs (body modes and why: exchange.py). Envoy ignores mode_override when a static
        # body mode is FULL_DUPLEX_STREAMED, so the response side stays off here (turned on
        # per request). The request body stays BUFFERED statically: Envoy then buffers it
        # while extproc decides, and answers 413 past max_request_bytes; switched on only
        # by an override, an oversized body stalled the request instead.
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "request_trailer_mode": "SKIP",
            "response_header_mode": "SKIP",
            "response_body_mode": "NONE",
            "response_trailer_mode": "SKIP",
        },
        "allow_mode_override": True,
        # "via_upstream" when the backend answered, Envoy's reason otherwise (connection
        # failure, timeout): only answers from a model are billed (exchange.py).
        "response_attributes": ["response.code_details"],
        # The direct peer, for allowed_cidrs and trusted_networks (access.py).
        "request_attributes": ["source.address"],
        "message_timeout": "5s",
        "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
    }


def _local_reply_mappers() -> list[dict[str, Any]]:
    """Envoy's own error replies, in the tenant's error format (OpenAI's unless Anthropic)."""
    anthropic = {
        "metadata_filter": {
            "matcher": {
                "filter": METADATA_NAMESPACE,
                "path": [{"key": "format"}],
                "value": {"string_match": {"exact": "anthropic"}},
            },
            # Envoy's default is to match when the key is absent; OpenAI tenants set none.
            "match_if_key_not_found": False,
        }
    }
    body = "%LOCAL_REPLY_BODY%"
    cases = [
        ({"response_flag_filter": {"flags": _TIMEOUT_FLAGS}}, 504, "api_error", "timeout", body),
        (
            {"response_flag_filter": {"flags": _UNREACHABLE_FLAGS}},
            502,
            "api_error",
            "bad_gateway",
            body,
        ),
        (_status_is(413), 413, "request_too_large", "request_too_large", "request body too large"),
        # ext_proc unreachable or failing (extproc itself never answers 500).
        (
            _status_is(500),
            503,
            "api_error",
            "guardrail_unavailable",
            "the CheckStream guardrail service is unavailable",
        ),
    ]
    mappers = []
    for condition, status, anthropic_type, code, message in cases:
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [condition, anthropic]}},
                "status_code": status,
                "body_format_override": {
                    "json_format": {
                        "type": "error",
                        "error": {"type": anthropic_type, "message": message},
                    }
                },
            }
        )
        mappers.append(
            {
                "filter": condition,
                "status_code": status,
                "body_format_override": {
                    "json_format": {
                        "error": {
                            "message": message,
                            "type": "invalid_request_error" if status == 413 else "server_error",
                            "param": None,
                            "code": code,
                        }
                    }
                },
            }
        )
    return mappers


def _status_is(code: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": code, "runtime_key": "_"}}
        }
    }


def _extproc_cluster(config: CheckStreamConfig) -> dict[str, Any]:
    server = config.server
    endpoints = [
        {"endpoint": {"address": _address("127.0.0.1", server.extproc_port + i)}}
        for i in range(server.extproc_workers)
    ]
    return {
        "name": EXTPROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": _CIRCUIT_BREAKERS,
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": EXTPROC_CLUSTER,
            "endpoints": [{"lb_endpoints": endpoints}],
        },
    }


def _admin_cluster(config: CheckStreamConfig) -> dict[str, Any]:
    server = config.server
    host = server.local_host
    return {
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(host, server.admin_port)}}]}
            ],
        },
    }


def _backend_cluster(backend: Backend) -> dict[str, Any]:
    try:
        ipaddress.ip_address(backend.host)
        discovery = "STATIC"
    except ValueError:
        discovery = "STRICT_DNS"
    cluster: dict[str, Any] = {
        "name": backend.cluster_name,
        "type": discovery,
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "circuit_breakers": _CIRCUIT_BREAKERS,
        "load_assignment": {
            "cluster_name": backend.cluster_name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(backend.host, backend.port)}}]}
            ],
        },
    }
    if backend.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                "UpstreamTlsContext",
                "sni": backend.host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": SYSTEM_CA},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": backend.host}}
                        ],
                    }
                },
            },
        }
        # HTTP/2 where the backend offers it (ALPN), HTTP/1.1 otherwise.
        cluster["typed_extension_protocol_options"] = {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
            }
        }
    return cluster
