"""Admission: a request's share of its tenant's limits and budgets, taken before the backend
is called (worker process).

The day's quotas go first (``limits/daily.py``) and are given back if a minute limit then
refuses; the answer carries ``X-RateLimit-*`` for the tightest limit, and ``Retry-After`` on a
refusal. A limiter that cannot be reached follows the tenant's fail mode.
"""

from __future__ import annotations

import math
import time

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse

from checkstream.accounting.accounts import Accounts, Tally, store_failed
from checkstream.gateway.mutations import error_response, immediate
from checkstream.gateway.runtime import TenantPlan
from checkstream.ledger.usage import period_of
from checkstream.limits.daily import DAILY_USD, UNLIMITED, tightest
from checkstream.limits.decisions import NANO, Budget, Decision, LimiterUnavailable, to_nano
from checkstream.ops.metrics import RATE_LIMITED


async def admit(
    accounts: Accounts, plan: TenantPlan, tally: Tally | None, tokens: int
) -> ProcessingResponse | None:
    """Take the request's share of its tenant's limits (day, minute, concurrency, budget);
    the refusal to answer with if one is reached, None to go on. The caller accounts for a
    refusal like any answer it gives itself."""
    tenant = plan.tenant
    limits = tenant.config.rate_limit
    budget = None
    now = time.time()
    if plan.budget_usd is not None:
        budget = Budget(period_of(now), to_nano(plan.budget_usd))
    try:
        # The day's quotas first (limits/daily.py): one more store call only for tenants
        # that have them, given back if a minute limit refuses.
        daily = await accounts.daily.admit(tenant.id, plan.daily, now) if plan.daily else UNLIMITED
        decision = daily
        if daily.allowed:
            decision = await accounts.limiter.acquire(tenant.id, limits, tokens, budget=budget)
            if not decision.allowed and plan.daily:
                await accounts.daily.refund(tenant.id, now)
            decision = tightest(decision, daily)
    except LimiterUnavailable as exc:
        store_failed("limiter", tenant.id, exc, fail_mode=tenant.config.fail_mode)
        if tenant.config.fail_mode == "open":
            return None
        return error_response(
            tenant.format,
            503,
            "rate limits cannot be checked right now, so the request was not processed",
            "limits_unavailable",
            "checkstream_limits",
        )
    if tally is not None:
        tally.decision = decision
    if decision.allowed:
        if tally is not None:
            tally.admitted = True
            tally.reserved_tokens = tokens
        return None
    if decision.limit_name == DAILY_USD:
        RATE_LIMITED.labels(tenant.id, DAILY_USD).inc()
        daily_usd = plan.daily.budget_nano / NANO
        message = f"the tenant's daily budget (daily_usd ${daily_usd:g}) is spent"
        body = tenant.format.error_body(429, message, "budget_exceeded")
        headers = limit_headers(decision, refused=True)
        return immediate(429, body, headers, "checkstream_budget")
    if decision.over_budget:
        RATE_LIMITED.labels(tenant.id, "budget").inc()
        body = tenant.format.error_body(
            429,
            f"the tenant's monthly budget of ${plan.budget_usd:g} is spent",
            "budget_exceeded",
        )
        headers = limit_headers(decision, refused=True)
        return immediate(429, body, headers, "checkstream_budget")
    limit = decision.limit_name or "unknown"
    RATE_LIMITED.labels(tenant.id, limit).inc()
    message = f"rate limit reached ({limit}); retry after {ceil_seconds(decision.retry_after_s)}s"
    body = tenant.format.error_body(429, message, "rate_limit_exceeded")
    return immediate(429, body, limit_headers(decision, refused=True), "checkstream_limits")


def ceil_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def limit_headers(decision: Decision, *, refused: bool = False) -> list[tuple[str, str]]:
    """X-RateLimit-* for the tightest limit (and Retry-After when refused)."""
    out: list[tuple[str, str]] = []
    if decision.limit is not None:
        out.append(("x-ratelimit-limit", str(decision.limit)))
        out.append(("x-ratelimit-remaining", str(max(0, decision.remaining or 0))))
        if decision.reset is not None:
            out.append(("x-ratelimit-reset", str(math.ceil(decision.reset))))
    if refused:
        out.append(("retry-after", str(ceil_seconds(decision.retry_after_s))))
    return out
