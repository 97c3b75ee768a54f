"""Requests per minute, error rate and p95 latency per tenant over the last five minutes.

Run by the admin server (launcher, or a worker serving ``--admin``). Prometheus counters only
ever grow, so the console keeps a small ring of their values, one sample every refresh, and
reads a window as the difference between the newest sample and the one five minutes older
(or the oldest it has, right after a start). Histograms subtract bucket by bucket, so the
window's p95 is computed exactly as Prometheus' ``histogram_quantile`` would.

Health (documented in docs/console.md):

- error rate is the share of answers with a 5xx status (the gateway or the backend failed);
  refusals the gateway meant (403, 429, blocked prompts) are not errors;
- latency for health is the p95 of the gateway's own checking time before the request goes
  on (the ``ingress`` phase): a long streamed answer is not a slow gateway, and a backend in
  trouble shows up as 502/504 errors;
- ``critical``: error rate >= 5% or check p95 >= 1,000 ms; ``degraded``: error rate >= 1% or
  check p95 >= 250 ms; ``healthy`` otherwise; ``idle``: no request in the window.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client.metrics_core import Metric

from checkstream.ops.metrics import LATENCY_BUCKETS_MS

WINDOW_S: Final = 300.0
MINUTE_S: Final = 60.0

DEGRADED_ERROR_RATE: Final = 0.01
CRITICAL_ERROR_RATE: Final = 0.05
DEGRADED_CHECK_P95_MS: Final = 250.0
CRITICAL_CHECK_P95_MS: Final = 1000.0

# Upper bounds of the latency buckets, +Inf last, in the order counts are kept.
_BOUNDS: Final = (*LATENCY_BUCKETS_MS, math.inf)
_BOUND_INDEX: Final = {bound: i for i, bound in enumerate(_BOUNDS)}


@dataclass(frozen=True)
class TenantCounts:
    """A tenant's counters at one moment (cumulative since the gateway started)."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx answers
    tokens: float = 0.0
    total_buckets: tuple[float, ...] = (0.0,) * len(_BOUNDS)  # cumulative, phase "total"
    check_buckets: tuple[float, ...] = (0.0,) * len(_BOUNDS)  # cumulative, phase "ingress"


@dataclass(frozen=True)
class Sample:
    at: float  # epoch seconds
    tenants: Mapping[str, TenantCounts]


@dataclass(frozen=True)
class WindowStats:
    """One tenant's traffic over the window; the last minute's too, for rate-limit headroom.
    Every field adds up across replicas (fleet totals sum them)."""

    rpm: float
    requests: float
    errors: float
    requests_last_minute: float
    tokens_last_minute: float
    total_buckets: tuple[float, ...]  # the window's own counts, cumulative over buckets
    check_buckets: tuple[float, ...]

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def p95_ms(self) -> float | None:
        return quantile(0.95, self.total_buckets)

    @property
    def p95_check_ms(self) -> float | None:
        return quantile(0.95, self.check_buckets)

    def __add__(self, other: WindowStats) -> WindowStats:
        def both(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(x + y for x, y in zip(a, b, strict=True))

        return WindowStats(
            self.rpm + other.rpm,
            self.requests + other.requests,
            self.errors + other.errors,
            self.requests_last_minute + other.requests_last_minute,
            self.tokens_last_minute + other.tokens_last_minute,
            both(self.total_buckets, other.total_buckets),
            both(self.check_buckets, other.check_buckets),
        )


_ZEROS: Final = (0.0,) * len(_BOUNDS)
NO_TRAFFIC: Final = WindowStats(0.0, 0.0, 0.0, 0.0, 0.0, _ZEROS, _ZEROS)


def health(stats: WindowStats | None) -> str:
    """healthy, degraded, critical or idle; see the module docstring for the thresholds."""
    if stats is None or stats.requests <= 0:
        return "idle"
    rate = stats.error_rate or 0.0
    check = stats.p95_check_ms or 0.0
    if rate >= CRITICAL_ERROR_RATE or check >= CRITICAL_CHECK_P95_MS:
        return "critical"
    if rate >= DEGRADED_ERROR_RATE or check >= DEGRADED_CHECK_P95_MS:
        return "degraded"
    return "healthy"


def quantile(q: float, cumulative: tuple[float, ...]) -> float | None:
    """The q-quantile of a histogram's cumulative bucket counts (``histogram_quantile``:
    linear within the bucket; the highest finite bound when it falls in +Inf)."""
    total = cumulative[-1]
    if total <= 0:
        return None
    rank = q * total
    for i, count in enumerate(cumulative):
        if count >= rank:
            upper = _BOUNDS[i]
            lower = _BOUNDS[i - 1] if i else 0.0
            if math.isinf(upper):
                return lower
            below = cumulative[i - 1] if i else 0.0
            if count <= below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
    return _BOUNDS[-2]


def sample_from(families: Iterable[Metric], at: float) -> Sample:
    """The per-tenant counters in a collection of metric families."""
    requests: dict[str, float] = {}
    errors: dict[str, float] = {}
    tokens: dict[str, float] = {}
    buckets: dict[tuple[str, str], list[float]] = {}
    for family in families:
        if family.name == "checkstream_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    tenant = s.labels.get("tenant", "")
                    requests[tenant] = requests.get(tenant, 0.0) + s.value
                    if s.labels.get("status", "").startswith("5"):
                        errors[tenant] = errors.get(tenant, 0.0) + s.value
        elif family.name == "checkstream_tokens":
            for s in family.samples:
                if s.name.endswith("_total"):
                    tenant = s.labels.get("tenant", "")
                    tokens[tenant] = tokens.get(tenant, 0.0) + s.value
        elif family.name == "checkstream_latency_ms":
            for s in family.samples:
                phase = s.labels.get("phase")
                if not s.name.endswith("_bucket") or phase not in ("total", "ingress"):
                    continue
                index = _BOUND_INDEX.get(float(s.labels.get("le", "nan")))
                if index is None:
                    continue
                key = (s.labels.get("tenant", ""), phase)
                counts = buckets.setdefault(key, [0.0] * len(_BOUNDS))
                counts[index] += s.value
    names = set(requests) | set(tokens) | {t for t, _ in buckets}
    empty = (0.0,) * len(_BOUNDS)
    return Sample(
        at,
        {
            name: TenantCounts(
                requests.get(name, 0.0),
                errors.get(name, 0.0),
                tokens.get(name, 0.0),
                tuple(buckets.get((name, "total"), empty)),
                tuple(buckets.get((name, "ingress"), empty)),
            )
            for name in names
        },
    )


def _minus(new: tuple[float, ...], old: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(max(0.0, a - b) for a, b in zip(new, old, strict=True))


class TrafficWindow:
    """The last five minutes of samples (and one older, to measure the full window from)."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[Sample] = deque()

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)
        # Keep the newest sample at or before the window's start: it is the baseline.
        while len(self._samples) > 2 and self._samples[1].at <= sample.at - self.window_s:
            self._samples.popleft()

    def _baseline(self, span_s: float) -> Sample | None:
        if len(self._samples) < 2:
            return None
        newest = self._samples[-1]
        chosen = self._samples[0]
        for sample in self._samples:
            if sample.at <= newest.at - span_s:
                chosen = sample
            else:
                break
        return chosen

    def stats(self) -> dict[str, WindowStats]:
        """Every tenant with counters, over the window; empty until two samples exist."""
        base = self._baseline(self.window_s)
        minute = self._baseline(MINUTE_S)
        if base is None or minute is None:
            return {}
        newest = self._samples[-1]
        span = newest.at - base.at
        found: dict[str, WindowStats] = {}
        zero = TenantCounts()
        for tenant, now in newest.tenants.items():
            old = base.tenants.get(tenant, zero)
            last = minute.tenants.get(tenant, zero)
            requests = max(0.0, now.requests - old.requests)
            found[tenant] = WindowStats(
                rpm=requests * MINUTE_S / span if span > 0 else 0.0,
                requests=requests,
                errors=max(0.0, now.errors - old.errors),
                requests_last_minute=max(0.0, now.requests - last.requests),
                tokens_last_minute=max(0.0, now.tokens - last.tokens),
                total_buckets=_minus(now.total_buckets, old.total_buckets),
                check_buckets=_minus(now.check_buckets, old.check_buckets),
            )
        return found
