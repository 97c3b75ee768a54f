"""What a limit check answers and the pure arithmetic behind it, shared by both backends (worker).

Algorithm: GCRA, in its leaky-bucket form, per minute for requests and for tokens.
    Each limit ``L`` per minute is a bucket holding a *level* in integer units: one request (or
    one token) adds ``WINDOW_MS`` (60 000) units, and the bucket drains ``L`` units per
    millisecond. A cost fits while ``level + cost * WINDOW_MS <= L * WINDOW_MS``.
Why GCRA rather than windows:
    - exact and smooth: no fixed-window boundary where a tenant gets 2x its limit, no
      approximation as in the sliding-window-counter trick; a fresh tenant gets a burst of ``L``,
      then a steady ``L`` per minute;
    - O(1) state per limit (level + timestamp), one hash per limit in Redis, self-expiring;
    - refunds and overruns (token reconciliation) are plain additions to the level.
Integers everywhere: time is integer milliseconds, levels are integers below 2**53, so Lua's
doubles and Python's ints compute the same values; the only division shared with Lua
(`drain`) is one correctly rounded IEEE division in both languages. Lua mirrors only `drain`,
`fits` and the updates; everything reported (remaining, reset, retry-after, the tightest limit)
is computed once, in Python, by `decide`, from the levels the backend returns.

Limits that refuse: all-or-nothing. A request is taken only if every configured limit allows
it. A token cost larger than ``tokens_per_minute`` can never fit: it is refused with a full
window as retry-after (the caller may prefer to answer 413).

Spend is counted in integer nano-dollars (`to_nano`), so sums are exact in Python and Redis
alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Final

from checkstream.config.model import RateLimitConfig

WINDOW_MS: Final = 60_000
# Spend is counted in integer nano-dollars: exact in Python and Redis alike (float sums
# drift; micro-dollars would round a cheap model's single-token cost to zero).
NANO: Final = 1_000_000_000
# A concurrency refusal has no computable end (it lasts until some request finishes): a short
# fixed hint keeps clients from hammering without pretending to know.
CONCURRENCY_RETRY_MS: Final = 1_000

REQUESTS: Final = "requests_per_minute"
TOKENS: Final = "tokens_per_minute"
CONCURRENCY: Final = "max_concurrent_requests"


class LimiterUnavailable(Exception):
    """The shared limit store cannot be reached; the caller applies the tenant's fail mode."""


@dataclass(frozen=True)
class Decision:
    """Outcome of a limit check, enough for 429 + Retry-After and the X-RateLimit-* headers.

    ``limit_name`` is the limit that refused (the one with the longest wait when several do)
    or, when allowed, the tightest one (least remaining share). All None when the tenant has
    no limit configured.
    """

    allowed: bool
    limit_name: str | None
    limit: int | None
    remaining: int | None
    reset: float | None  # epoch seconds when this limit is fully available again
    retry_after_s: float  # 0.0 when allowed
    #: Refused because the month's budget is spent (then retry_after_s runs to next month,
    #: and the other fields still describe the tightest rate limit, for the headers).
    over_budget: bool = False
    #: The concurrency slot taken (allowed, with max_concurrent_requests): give it back to
    #: `finish`. Random per request, so no client-chosen id can share a slot.
    lease: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Budget:
    """A monthly budget checked by `acquire`, in the same store operation as the limits."""

    period: str  # "YYYY-MM", UTC
    limit_nano: int


@dataclass(frozen=True)
class Charge:
    """A request's cost added to its month's spend by `finish`."""

    period: str
    nano: int


@dataclass(frozen=True)
class Rates:
    """Limits as the backends (and the Lua scripts) take them: 0 means not configured."""

    rpm: int
    tpm: int
    concurrency: int

    @staticmethod
    def of(limits: RateLimitConfig) -> Rates:
        return Rates(
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            limits.max_concurrent_requests or 0,
        )


@dataclass(frozen=True)
class Levels:
    """What a backend's store operation answers, for `decide`: the levels after the take when
    ``ok``, otherwise the drained levels before any take."""

    ok: bool
    now_ms: int
    rpm_level: int
    tpm_level: int
    in_flight: int
    #: Refused for the month's budget; nothing was taken.
    over_budget: bool = False


# --- `drain` and `fits` are mirrored line for line in lua/common.lua. ---


def drain(level: int, ts: int, now: int, rate: int) -> int:
    """The level at ``now`` of a bucket last written at ``ts``, draining ``rate`` units/ms."""
    if now <= ts:
        return level
    elapsed = now - ts
    # Compare before multiplying: elapsed * rate for an old timestamp would exceed 2**53 and
    # lose exactness in Lua. `level / rate` is one correctly rounded division in both languages.
    if elapsed > level / rate:
        return 0
    return level - elapsed * rate


def fits(level: int, rate: int, cost: int) -> bool:
    return level + cost * WINDOW_MS <= rate * WINDOW_MS


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _View:
    name: str
    limit: int
    remaining: int
    reset_ms: int
    retry_ms: int  # 0 when the cost fits


def _bucket_view(name: str, level: int, rate: int, cost: int, now: int) -> _View:
    remaining = max(0, (rate * WINDOW_MS - level) // WINDOW_MS)
    reset_ms = now + _ceil_div(level, rate)
    if fits(level, rate, cost):
        retry = 0
    elif cost > rate:
        retry = WINDOW_MS  # never fits; see the module docstring
    else:
        retry = _ceil_div(level + cost * WINDOW_MS - rate * WINDOW_MS, rate)
    return _View(name, rate, remaining, reset_ms, retry)


def decide(
    rates: Rates,
    tokens: int,
    now: int,
    rpm_level: int,
    tpm_level: int,
    in_flight: int,
    taken: bool,
) -> Decision:
    """Build the reported decision from a backend's levels.

    When ``taken`` the levels are after the take (so remaining is what is left); otherwise
    they are the drained levels before any take, and the costs are checked against them.
    """
    views: list[_View] = []
    take = 0 if taken else 1
    if rates.rpm:
        views.append(_bucket_view(REQUESTS, rpm_level, rates.rpm, take, now))
    if rates.tpm:
        views.append(_bucket_view(TOKENS, tpm_level, rates.tpm, take * tokens, now))
    if rates.concurrency:
        refused = in_flight + take > rates.concurrency
        views.append(
            _View(
                CONCURRENCY,
                rates.concurrency,
                max(0, rates.concurrency - in_flight),
                now,
                CONCURRENCY_RETRY_MS if refused else 0,
            )
        )
    if not views:
        return Decision(True, None, None, None, None, 0.0)
    refusing = [v for v in views if v.retry_ms > 0]
    if refusing:
        # All must pass, so the honest Retry-After is the longest wait (first on ties).
        chosen = max(refusing, key=lambda v: v.retry_ms)
    else:
        # Least remaining share, compared exactly by cross-multiplying (integers); the first
        # wins on ties (requests, tokens, concurrency).
        chosen = views[0]
        for view in views[1:]:
            if view.remaining * chosen.limit < chosen.remaining * view.limit:
                chosen = view
    return Decision(
        allowed=not refusing,
        limit_name=chosen.name,
        limit=chosen.limit,
        remaining=chosen.remaining,
        reset=chosen.reset_ms / 1000,
        retry_after_s=chosen.retry_ms / 1000,
    )


def over_budget(decision: Decision, now_ms: int) -> Decision:
    """``decision`` (the rate limits as they stand, nothing taken) refused for the budget."""
    return replace(
        decision,
        allowed=False,
        retry_after_s=seconds_to_next_month(now_ms / 1000),
        over_budget=True,
    )


def seconds_to_next_month(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp() - now


def to_nano(usd: float) -> int:
    return round(usd * NANO)


def to_ms(now: float) -> int:
    return round(now * 1000)


def check_tokens(*values: int) -> None:
    for value in values:
        if value < 0:
            raise ValueError(f"token counts are never negative (got {value})")
