"""Who is this request for? Tenant resolution exactly as design.md describes it.

The configured methods are tried in order and the first that names a tenant wins; every
later method that also names one must agree. So a key that maps to tenant A binds A: a
header or path naming B is refused (403), it cannot borrow B's backend, budget or policy.

Header and path-prefix resolution trust the caller's claim; put them only in front of
callers you trust, and use ``api_key_mapping`` for everyone else.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from checkstream.config.model import CheckStreamConfig, TenantConfig
from checkstream.formats import FORMATS, WireFormat
from checkstream.formats import openai as openai_format
from checkstream.gateway.backends import Backend, backend_from_url
from checkstream.intake.client_paths import UnsafePath, normalize_client_path
from checkstream.tenants.keyindex import KeyIndex


@dataclass(frozen=True)
class Tenant:
    """A tenant's configuration compiled once per config load."""

    id: str
    config: TenantConfig
    backend: Backend
    format: WireFormat
    #: Managed backend key (never logged), or None.
    secret: str | None


@dataclass(frozen=True)
class Resolved:
    tenant: Tenant
    #: The request path, normalised (``client_paths``), with any tenant path prefix removed
    #: (query string kept).
    path: str
    #: The client's key is a CheckStream key from api_key_map: it must never go upstream.
    key_is_ours: bool


@dataclass(frozen=True)
class Refused:
    status: int
    message: str
    code: str
    #: The error body's format: the tenant's if one was identified, else OpenAI's.
    format: WireFormat


def client_keys(headers: Mapping[str, str]) -> list[str]:
    """The API keys a client presented: ``Authorization: Bearer``, then ``x-api-key``.

    A header sent several times arrives as one comma-separated list (``header_map``); every
    value counts, so a second header cannot hide a key of another tenant or of ours. API
    keys and bearer tokens never contain commas.
    """
    keys = []
    for auth in (headers.get("authorization") or "").split(","):
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            keys.append(token.strip())
    for key in (headers.get("x-api-key") or "").split(","):
        if key.strip():
            keys.append(key.strip())
    return keys


class TenantResolver:
    def __init__(self, config: CheckStreamConfig, secrets: Mapping[str, str]) -> None:
        tenants = config.tenants
        self.enabled = tenants.enabled
        self.steps = tenants.resolution
        self.default = tenants.default_tenant
        self.keys = KeyIndex.from_config(config)
        self.uses_keys = any(step.api_key_mapping for step in self.steps)
        self.tenants = {
            tenant_id: Tenant(
                tenant_id,
                cfg,
                backend_from_url(cfg.backend_url),
                FORMATS[cfg.streaming_format],
                secrets.get(tenant_id),
            )
            for tenant_id, cfg in tenants.configs.items()
        }

    def resolve(
        self, path: str, headers: Mapping[str, str], now: float | None = None
    ) -> Resolved | Refused:
        """Resolve a request from its path and lower-cased headers."""
        # A key from api_keys or api_key_map is ours (never forwarded upstream) even when
        # api_key_mapping is not a resolution step.
        keys = client_keys(headers) if self.uses_keys or self.keys else []
        # A client may send its CheckStream key in either header and something else in the
        # other (SDKs set both): the key we know decides, two keys of two tenants conflict.
        key_tenants, expired = self.keys.tenants_of(keys, time.time() if now is None else now)
        if not key_tenants and expired is not None:
            return self._refuse(401, "this API key has expired", "key_expired", expired)
        if len(key_tenants) > 1:
            return self._refuse(
                403,
                "the API keys of this request belong to different tenants",
                "tenant_mismatch",
                None,
            )
        key_tenant = next(iter(key_tenants), None)
        try:
            path = normalize_client_path(path)
        except UnsafePath as exc:
            return self._refuse(400, str(exc), "invalid_path", key_tenant)
        if not self.enabled:
            return self._finish(self.default, path, key_tenant is not None)
        named: str | None = None
        for step in self.steps:
            found: str | None = None
            if step.header is not None:
                found = headers.get(step.header.lower()) or None
            elif step.path_prefix is not None:
                if path.startswith(step.path_prefix):
                    segment, sep, query = path[len(step.path_prefix) :].partition("?")
                    name, _, rest = segment.partition("/")
                    if name:
                        found = name
                        path = "/" + rest + sep + query
            elif step.api_key_mapping:
                found = key_tenant
            if found is None:
                continue
            if named is None:
                named = found
            elif found != named:
                return self._refuse(
                    403,
                    "the tenant named by this request does not match its API key or path",
                    "tenant_mismatch",
                    key_tenant,
                )
        if named is None:
            if self.uses_keys and keys and key_tenant is None and self.default is None:
                return self._refuse(401, "invalid API key", "invalid_api_key", None)
            if self.default is None:
                return self._refuse(
                    403, "no tenant could be resolved for this request", "unknown_tenant", None
                )
            named = self.default
        return self._finish(named, path, key_tenant is not None)

    def _finish(self, tenant_id: str | None, path: str, key_is_ours: bool) -> Resolved | Refused:
        tenant = self.tenants.get(tenant_id) if tenant_id is not None else None
        if tenant is None:
            return self._refuse(403, "unknown tenant", "unknown_tenant", None)
        return Resolved(tenant, path, key_is_ours)

    def _refuse(self, status: int, message: str, code: str, tenant_id: str | None) -> Refused:
        tenant = self.tenants.get(tenant_id) if tenant_id is not None else None
        return Refused(status, message, code, tenant.format if tenant else openai_format.FORMAT)
