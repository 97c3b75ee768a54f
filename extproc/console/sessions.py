"""Console sign-in state: sessions, their CSRF tokens, and the throttle on wrong tokens.

Run by the admin server. Sessions live in this process's memory: signing in on one replica's
admin port gives a session there only, and a restart signs everyone out (the admin token is
what grants access, a session only saves retyping it). Ids and CSRF tokens are 256-bit
random values; a session ends at sign-out or ``SESSION_TTL_S`` after sign-in, whichever is
first.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final

SESSION_TTL_S: Final = 8 * 3600.0
# Enough for every operator; past it the oldest session goes (memory stays bounded even if
# someone signs in in a loop with the right token).
MAX_SESSIONS: Final = 1000
# Wrong tokens: per client address, and for everyone together (a guesser with many
# addresses), within THROTTLE_WINDOW_S.
MAX_FAILURES_PER_CLIENT: Final = 5
MAX_FAILURES_TOTAL: Final = 50
THROTTLE_WINDOW_S: Final = 60.0


@dataclass(frozen=True)
class Session:
    id: str
    csrf: str
    expires: float  # epoch seconds

    def csrf_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf.encode())


class SessionStore:
    def __init__(self, ttl_s: float = SESSION_TTL_S, limit: int = MAX_SESSIONS) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, now: float) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self.ttl_s)
        self._sessions[session.id] = session
        while len(self._sessions) > self.limit:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None, now: float) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires <= now:
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


class SignInThrottle:
    """Counts wrong tokens; refuses further attempts while too many are recent."""

    def __init__(
        self,
        per_client: int = MAX_FAILURES_PER_CLIENT,
        total: int = MAX_FAILURES_TOTAL,
        window_s: float = THROTTLE_WINDOW_S,
    ) -> None:
        self.per_client = per_client
        self.total = total
        self.window_s = window_s
        self._all: deque[float] = deque()
        self._by_client: dict[str, deque[float]] = {}

    def _prune(self, now: float) -> None:
        start = now - self.window_s
        while self._all and self._all[0] <= start:
            self._all.popleft()
        for client in list(self._by_client):
            times = self._by_client[client]
            while times and times[0] <= start:
                times.popleft()
            if not times:
                del self._by_client[client]

    def retry_after(self, client: str, now: float) -> float | None:
        """Seconds until ``client`` may try again, or None when it may try now."""
        self._prune(now)
        waits = []
        mine = self._by_client.get(client)
        if mine is not None and len(mine) >= self.per_client:
            waits.append(mine[-self.per_client] + self.window_s - now)
        if len(self._all) >= self.total:
            waits.append(self._all[-self.total] + self.window_s - now)
        return max(waits) if waits else None

    def failed(self, client: str, now: float) -> None:
        self._all.append(now)
        self._by_client.setdefault(client, deque()).append(now)
