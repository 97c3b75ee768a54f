"""CheckStream API keys by SHA-256 digest (worker: tenant resolution; CLI: ``keys``).

The config holds digests only (``api_keys``), so neither the file nor a ConfigMap carries a
secret. A presented key is hashed once and looked up by its digest. Dict lookup compares
digests, not keys: a caller learns nothing about a stored key from timing, since finding a
key whose digest shares a prefix with a stored one is as hard as a preimage; the final
equality is still checked with ``hmac.compare_digest``. Plaintext ``api_key_map`` entries are
hashed into the same index at load, so both kinds are found the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from checkstream.config.model import ApiKeyEntry, CheckStreamConfig

KEY_PREFIX = "sk-cs-"
# 32 bytes from the OS's CSPRNG: 256 bits, far past guessing and past any rainbow table.
_KEY_BYTES = 32


@dataclass(frozen=True)
class StoredKey:
    tenant: str
    #: ``api_keys`` entry name, or ``api_key_map[entry N]`` for a plaintext key.
    name: str
    digest: str
    #: As configured, for people (a date: through that day, UTC).
    expires: date | datetime | None
    #: Seconds since the epoch from which the key is refused; None: never.
    expires_at: float | None
    plaintext: bool


@dataclass(frozen=True)
class KeyMatch:
    key: StoredKey
    expired: bool


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)


def expiry_instant(expires: datetime | date | None) -> float | None:
    """A date means the key works through that day, UTC; a naive datetime is UTC."""
    if expires is None:
        return None
    if isinstance(expires, datetime):
        aware = expires if expires.tzinfo is not None else expires.replace(tzinfo=UTC)
        return aware.timestamp()
    return datetime.combine(expires + timedelta(days=1), time(0), tzinfo=UTC).timestamp()


def stored_keys(config: CheckStreamConfig) -> list[StoredKey]:
    """Every key the config knows, hashed entries first, in file order."""
    found = [
        StoredKey(
            tenant, entry.name, entry.sha256, entry.expires, expiry_instant(entry.expires), False
        )
        for tenant, cfg in config.tenants.configs.items()
        for entry in cfg.api_keys
    ]
    for index, (key, tenant) in enumerate(config.tenants.api_key_map.items()):
        found.append(
            StoredKey(tenant, f"api_key_map[entry {index + 1}]", digest_of(key), None, None, True)
        )
    return found


class KeyIndex:
    """Keys by digest, compiled once per config load (a reload rebuilds it: revocation)."""

    def __init__(self, keys: Iterable[StoredKey]) -> None:
        self._by_digest: dict[str, StoredKey] = {}
        for key in keys:
            # The first entry wins; config check refuses a digest listed twice anyway.
            self._by_digest.setdefault(key.digest, key)

    @classmethod
    def from_config(cls, config: CheckStreamConfig) -> KeyIndex:
        return cls(stored_keys(config))

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def lookup(self, presented: str, now: float) -> KeyMatch | None:
        digest = digest_of(presented)
        stored = self._by_digest.get(digest)
        if stored is None or not hmac.compare_digest(stored.digest, digest):
            return None
        expired = stored.expires_at is not None and now >= stored.expires_at
        return KeyMatch(stored, expired)

    def tenants_of(self, presented: Iterable[str], now: float) -> tuple[set[str], str | None]:
        """The tenants of the live keys among ``presented``, and the tenant of an expired one."""
        live: set[str] = set()
        expired: str | None = None
        for key in presented:
            match = self.lookup(key, now)
            if match is None:
                continue
            if match.expired:
                expired = match.key.tenant
            else:
                live.add(match.key.tenant)
        return live, expired


def entry_for(name: str, key: str, expires: date | None) -> ApiKeyEntry:
    return ApiKeyEntry(name=name, sha256=digest_of(key), expires=expires)
