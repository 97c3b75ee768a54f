"""Where a tenant's traffic goes: its backend as Envoy sees it, and the path it receives."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from google.protobuf.struct_pb2 import Struct

from checkstream.intake.client_paths import normalize_client_path

_DEFAULT_PORTS = {"http": 80, "https": 443}
EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"


@dataclass(frozen=True)
class Backend:
    """One distinct upstream (scheme, host, port): one Envoy cluster, shared by tenants."""

    scheme: str
    host: str
    port: int
    base_path: str  # path prefix of backend_url without a trailing slash, "" for none

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        """The Host header the backend expects (the port only when it is not the default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if _DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"

    @property
    def cluster_name(self) -> str:
        # One character for one character, '-' kept: "my-host" and "my.host" must not share
        # a cluster. No dots, which Envoy's stats tag extraction would misread.
        host = re.sub(r"[^A-Za-z0-9-]", "_", self.host)
        return f"backend_{self.scheme}_{host}_{self.port}"

    def upstream_path(self, client_path: str) -> str:
        """The path the backend receives for ``client_path`` (query string included).

        The client's path is kept whole and the backend's prefix put in front, except that a
        backend_url ending in ``/v1`` and a client path starting with ``/v1/`` share that
        segment once: ``https://api.openai.com/v1`` + ``/v1/chat/completions`` gives
        ``/v1/chat/completions``, not ``/v1/v1/...``. ``UnsafePath`` if the client's path
        cannot be normalised (``client_paths``): the result never leaves the base path.
        """
        client_path = normalize_client_path(client_path)  # so the result stays under base
        base = self.base_path
        path_only = client_path.partition("?")[0]
        if base.endswith("/v1") and (path_only == "/v1" or path_only.startswith("/v1/")):
            base = base[: -len("/v1")]
        return base + client_path


def backend_from_url(url: str) -> Backend:
    parts = urlsplit(url)
    scheme = parts.scheme
    host = parts.hostname or ""
    port = parts.port or _DEFAULT_PORTS[scheme]
    return Backend(scheme, host, port, parts.path.rstrip("/"))


def answered_by_backend(attributes: Mapping[str, Struct] | None) -> bool:
    """Whether the backend itself answered, rather than Envoy (backend down, timeout)."""
    if attributes is None:
        return True  # not asked for (tests, an older bootstrap): assume the backend
    found = attributes.get(EXT_PROC_ATTRIBUTES)
    if found is None or "response.code_details" not in found.fields:
        return True
    return found.fields["response.code_details"].string_value == "via_upstream"
