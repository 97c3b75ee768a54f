"""Where a request comes from, and whether that place may use its tenant (worker).

The client's address is the direct peer Envoy saw (ext_proc attribute ``source.address``;
Envoy runs with ``use_remote_address`` so that is the connection's peer, never a header, and
with ``skip_xff_append`` so X-Forwarded-For is exactly what the peer sent).
Only when that peer is one of ``server.trusted_proxies`` is ``X-Forwarded-For`` read, right
to left, past every trusted proxy: the first address no trusted proxy vouches for is the
client. Anyone else's X-Forwarded-For is ignored, so a client cannot name its own address.

Two checks use it: a tenant's ``allowed_cidrs`` (403 ``address_not_allowed``) and, for
managed-auth tenants reached without a CheckStream key, ``server.trusted_networks``
(401 ``key_required``).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.struct_pb2 import Struct

from checkstream.config.model import CheckStreamConfig

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"
SOURCE_ADDRESS = "source.address"


@dataclass(frozen=True)
class AccessRefusal:
    status: int
    message: str
    code: str


ADDRESS_NOT_ALLOWED = AccessRefusal(
    403, "this tenant is not available from your address", "address_not_allowed"
)
KEY_REQUIRED = AccessRefusal(
    401, "an API key is required for this tenant from your address", "key_required"
)


def peer_address(attributes: Mapping[str, Struct] | None) -> IpAddress | None:
    """The direct peer from ``source.address`` ("1.2.3.4:5678" or "[::1]:5678")."""
    if attributes is None:
        return None
    found = attributes.get(EXT_PROC_ATTRIBUTES)
    if found is None or SOURCE_ADDRESS not in found.fields:
        return None
    raw = found.fields[SOURCE_ADDRESS].string_value
    host = raw.rpartition("]")[0].lstrip("[") if raw.startswith("[") else raw.rpartition(":")[0]
    return _parse(host or raw)


# Clients come back from the same few addresses; parsing and matching cost ~15 us uncached.
@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _within(address: IpAddress, networks: tuple[Network, ...]) -> bool:
    return any(address in network for network in networks)


def client_address(
    peer: IpAddress | None, forwarded_for: str | None, trusted_proxies: tuple[Network, ...]
) -> IpAddress | None:
    """The client, or None when it cannot be told (no peer, or a trusted proxy forwarded
    something that is not an address)."""
    if peer is None:
        return None
    hops = forwarded_for.split(",") if forwarded_for else []
    client = peer
    while _within(client, trusted_proxies) and hops:
        forwarded = _parse(hops.pop())
        if forwarded is None:
            return None
        client = forwarded
    return client


@dataclass(frozen=True)
class AccessGate:
    """Compiled once per config load."""

    trusted_proxies: tuple[Network, ...]
    trusted_networks: tuple[Network, ...]
    #: Tenant -> the networks it may be used from (tenants with allowed_cidrs only).
    allowed: Mapping[str, tuple[Network, ...]]
    #: Managed-auth tenants that do not allow unauthenticated use.
    keyed: frozenset[str]

    @classmethod
    def from_config(cls, config: CheckStreamConfig) -> AccessGate:
        configs = config.tenants.configs
        return cls(
            tuple(config.server.trusted_proxies),
            tuple(config.server.trusted_networks),
            {t: tuple(c.allowed_cidrs) for t, c in configs.items() if c.allowed_cidrs is not None},
            frozenset(t for t, c in configs.items() if c.auth and not c.allow_unauthenticated),
        )

    def check(
        self,
        tenant_id: str,
        key_is_ours: bool,
        attributes: Mapping[str, Struct] | None,
        forwarded_for: str | None,
    ) -> AccessRefusal | None:
        allowed = self.allowed.get(tenant_id)
        keyless = not key_is_ours and bool(self.trusted_networks) and tenant_id in self.keyed
        if allowed is None and not keyless:
            return None  # the common case: no address needed
        client = client_address(peer_address(attributes), forwarded_for, self.trusted_proxies)
        if allowed is not None and (client is None or not _within(client, allowed)):
            return ADDRESS_NOT_ALLOWED
        if keyless and (client is None or not _within(client, self.trusted_networks)):
            return KEY_REQUIRED
        return None
