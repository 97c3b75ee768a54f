"""What is counted about each request, and what happens when it ends.

A ``Tally`` follows one request from its headers to its end. ``Accounts.finish`` closes it
exactly once: the pre-paid tokens are reconciled with the real usage and the concurrency slot
freed, the cost is charged to the tenant's budget, the usage record and audit records are
made durable, metrics are counted and one JSON log line is written. The exchange awaits it
before the last byte of the response goes out, so nothing is lost when a client hangs up
right after (design: "durable before the response ends").

Closing runs in a task of its own that the caller only waits for: when the client or Envoy
ends the gRPC stream, the caller is cancelled but the closing is not, so a request is never
half counted (in the ledger but not the audit trail, the metrics or the log). ``settle``
waits for closings still running before the stores close at shutdown. Run by the worker.

``Accounts`` holds the long-lived parts (limiter with budgets, ledger, audit log and the admin's
suspensions). They outlive a config reload: counts must not reset because a policy changed.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from checkstream.accounting.budget_alerts import (
    BudgetAlerts,
    BudgetTracker,
    MemoryClaims,
    RedisClaims,
)
from checkstream.accounting.client_text import store_safe
from checkstream.accounting.journal import Journal, OpenRequest
from checkstream.accounting.metering import estimate_tokens
from checkstream.accounting.suspensions import SharedSuspensions, shared_suspensions
from checkstream.audit.trail import AuditLog, resolve_audit_dirs
from checkstream.config.model import LoadedConfig, TenantConfig
from checkstream.formats.texts import Usage
from checkstream.intake.request_id import request_id as choose_request_id
from checkstream.ledger.backends import Ledger, open_ledger
from checkstream.ledger.usage import Pricing, UsageRecord, period_of
from checkstream.limits import build_limiter
from checkstream.limits.base import Limiter
from checkstream.limits.daily import DailyQuotas, MemoryDailyQuotas, RedisDailyQuotas
from checkstream.limits.decisions import Charge, Decision, LimiterUnavailable, to_nano
from checkstream.ops import logs
from checkstream.ops.metrics import EXTPROC_ERRORS, LATENCY, REQUESTS, SPEND, TOKENS, model_label
from checkstream.ops.replica import replica_name

log = logs.get("checkstream.requests")

#: The status recorded for a request whose client (or Envoy) went away before it ended.
CLIENT_CLOSED = 499
#: More tokens than any request can use: a backend that reports more is not believed (such a
#: number would overflow the ledger's integers and the cost's floats); the count is estimated.
MAX_TOKENS = 2**40


@dataclass(slots=True)
class Tally:
    """One request's accounting, from its headers to its end."""

    tenant: str
    request_id: str
    started: float = field(default_factory=time.monotonic)
    model: str = ""
    prompt_chars: int = 0
    #: Tokens pre-paid against tokens_per_minute; settled against the real count at the end.
    reserved_tokens: int = 0
    #: The limiter granted this request: its slot must be freed and its tokens settled.
    admitted: bool = False
    decision: Decision | None = None
    status: int = 0
    #: A model read the prompt and answered: the backend itself (not Envoy) replied, and
    #: not with an error (providers do not bill those). Only then are tokens counted.
    billable: bool = False
    usage: Usage | None = None
    answer_chars: int = 0
    #: Audit records of the policy triggers, written with the summary at the end.
    triggers: list[dict[str, Any]] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    done: bool = False

    #: The client's x-request-id when it was not safe to use as ``request_id`` (capped).
    client_request_id: str | None = None
    #: Its line in the worker's journal of open requests (0: not journaled).
    journal_key: int = 0

    @staticmethod
    def start(tenant: str, client_request_id: str | None) -> Tally:
        chosen = choose_request_id(client_request_id)
        return Tally(tenant, chosen.value, client_request_id=chosen.client)

    def tokens(self) -> tuple[int, int, bool]:
        """Input and output tokens, and whether either was estimated."""
        if not self.billable:
            return 0, 0, False  # answered by CheckStream, Envoy, or a backend error
        usage = self.usage
        given_in = _believable(usage.input_tokens) if usage else None
        given_out = _believable(usage.output_tokens) if usage else None
        estimated = given_in is None or given_out is None
        tokens_in = given_in if given_in is not None else estimate_tokens(self.prompt_chars)
        tokens_out = given_out if given_out is not None else estimate_tokens(self.answer_chars)
        return max(0, tokens_in), max(0, tokens_out), estimated


def _believable(tokens: int | None) -> int | None:
    return tokens if tokens is None or tokens <= MAX_TOKENS else None


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Accounts:
    """The long-lived state behind limits, budgets, usage and audit (one per process)."""

    limiter: Limiter  # rate limits and budgets
    ledger: Ledger | None
    audit: AuditLog
    #: Tenants suspended by an admin (suspensions.py): followed from Redis when ``shared``,
    #: else handed over by this gateway's launcher.
    suspensions: set[str] = field(default_factory=set)
    shared: SharedSuspensions | None = None
    #: Per-day quotas, and the budgets' gauge and alerts (None: built from the parts above).
    daily: DailyQuotas = field(default_factory=MemoryDailyQuotas)
    budgets: BudgetTracker | None = None

    def __post_init__(self) -> None:
        if self.budgets is None:
            self.budgets = BudgetTracker(
                self.daily, self.limiter, BudgetAlerts(MemoryClaims(), self.audit)
            )
    #: Requests being closed; kept here so a cancelled caller cannot lose them.
    closing: set[asyncio.Task[None]] = field(default_factory=set)
    #: Open requests, kept where the worker that replaces this one after a kill bills them.
    journal: Journal | None = None

    @classmethod
    def open(cls, loaded: LoadedConfig) -> Accounts:
        """Must run inside the event loop that will use it (Redis clients bind to it)."""
        model = loaded.model
        ledger = open_ledger(loaded)

        # With a shared (PostgreSQL) ledger this is every replica's spend: a counter lost
        # with Redis restarts from the fleet's total, not one replica's share.
        async def ledger_spend(tenant: str, period: str) -> int:
            if ledger is None:
                return 0
            try:
                return to_nano(await ledger.month_spend(tenant, period))
            except (OSError, sqlite3.Error) as exc:  # no seed: the tenant's fail mode decides
                raise LimiterUnavailable(f"cannot seed the month's budget: {exc}") from exc

        async def ledger_day_spend(tenant: str, start: float) -> int:
            if ledger is None:
                return 0
            try:
                return to_nano(await ledger.day_spend(tenant, start))
            except (OSError, sqlite3.Error) as exc:
                raise LimiterUnavailable(f"cannot seed the day's budget: {exc}") from exc

        limits = model.limits
        shared = shared_suspensions(loaded)
        limiter = build_limiter(limits, ledger_spend)
        audit = AuditLog(audit_dirs(loaded), replica_name(model.server.replica, os.environ))
        daily: DailyQuotas = MemoryDailyQuotas(ledger_day_spend)
        claims: MemoryClaims | RedisClaims = MemoryClaims()
        if limits.backend == "redis" and limits.url:
            daily = RedisDailyQuotas(limits.url, ledger_day_spend)
            claims = RedisClaims(limits.url)
        return cls(
            limiter=limiter,
            ledger=ledger,
            audit=audit,
            shared=shared,
            daily=daily,
            budgets=BudgetTracker(daily, limiter, BudgetAlerts(claims, audit)),
        )

    async def settle(self, timeout_s: float = 30.0) -> None:
        """Wait (bounded) for the requests still being closed."""
        if self.closing:
            await asyncio.wait(set(self.closing), timeout=timeout_s)

    async def aclose(self) -> None:
        await self.settle()  # requests still closing write to every store below
        assert self.budgets is not None
        await self.budgets.aclose()  # before the audit log: alerts in flight write there
        await self.limiter.aclose()
        if self.shared is not None:
            await self.shared.aclose()
        if self.ledger is not None:
            await self.ledger.aclose()
        await self.audit.aclose()
        if self.journal is not None:
            self.journal.close()

    def journaled(self, tally: Tally) -> None:
        """Note ``tally`` as open until ``finish`` has written its usage row: the request
        goes to its backend now, so a kill from here on must still bill it."""
        if self.journal is None or tally.journal_key or tally.done:
            return
        started = time.time() - (time.monotonic() - tally.started)
        tally.journal_key = self.journal.opened(
            OpenRequest(
                tenant=tally.tenant,
                request_id=tally.request_id,
                model=store_safe(tally.model),
                started=started,
                prompt_chars=tally.prompt_chars,
                reserved_tokens=tally.reserved_tokens,
                client_request_id=tally.client_request_id,
            )
        )

    def retarget(self, loaded: LoadedConfig) -> None:
        """Follow a reloaded config's audit settings (which tenants, where)."""
        self.audit.retarget(audit_dirs(loaded))

    def suspended(self, tenant: str, config: TenantConfig) -> bool:
        # The config's flag always holds; an admin can add suspensions, never lift it.
        return config.suspended or tenant in self.suspensions

    async def finish(
        self, tally: Tally, config: TenantConfig, pricing: Pricing, models: frozenset[str]
    ) -> None:
        """Close ``tally`` once; every store's failure is logged and counted, never raised
        (the client's response is already decided).

        Idempotent: only the first call for a request closes it, whichever of the exchange's
        end and the stream's abandonment comes first. Cancelling the caller does not cancel
        the closing.
        """
        if tally.done:
            return
        tally.done = True
        task = asyncio.get_running_loop().create_task(
            self._close(tally, config, pricing, models), name=f"close-{tally.request_id}"
        )
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)
        await asyncio.shield(task)

    async def _close(
        self, tally: Tally, config: TenantConfig, pricing: Pricing, models: frozenset[str]
    ) -> None:
        tenant = tally.tenant
        # The client chose it: made storable here, before the ledger, audit, metrics or log.
        model = tally.model = store_safe(tally.model)
        latency_ms = (time.monotonic() - tally.started) * 1000
        tokens_in, tokens_out, estimated = tally.tokens()
        now = time.time()
        limits = config.rate_limit
        cost = pricing.cost(model, tokens_in, tokens_out)
        charged = False
        if tally.admitted:
            # Any failure here (the store, or absurd counts a backend reported) must not
            # cost the request its usage row and audit records below.
            try:
                charge = None
                if cost and config.budget is not None:
                    charge = Charge(period_of(now), to_nano(cost))
                lease = tally.decision.lease if tally.decision is not None else None
                await self.limiter.finish(
                    tenant,
                    limits,
                    tally.reserved_tokens,
                    tokens_in + tokens_out,
                    charge=charge,
                    lease=lease,
                )
            except Exception as exc:
                store_failed("limiter", tenant, exc)
            else:
                charged = config.budget is not None and cost > 0
            if charged and self.budgets is not None:
                try:  # before the ledger row: a day's first charge seeds from the ledger
                    await self.budgets.charged(tenant, config, cost, now)
                except LimiterUnavailable as exc:
                    store_failed("limiter", tenant, exc)
        if self.ledger is not None:
            record = UsageRecord(
                time=now,
                request_id=tally.request_id,
                tenant=tenant,
                model=model,
                input_tokens=tokens_in,
                output_tokens=tokens_out,
                estimated=estimated,
                status=tally.status,
                latency_ms=round(latency_ms, 3),
                cost_usd=cost,
            )
            try:
                await self.ledger.record(record)
            except Exception as exc:  # the disk, not the request, is at fault
                store_failed("usage_ledger", tenant, exc)
        if tally.journal_key and self.journal is not None:
            self.journal.closed(tally.journal_key)
        if self.audit.audits(tenant):
            summary = {
                "time": iso_now(),
                "type": "request",
                "request_id": tally.request_id,
                "tenant": tenant,
                "model": model,
                "status": tally.status,
                "input_tokens": tokens_in,
                "output_tokens": tokens_out,
                "tokens_estimated": estimated,
                "latency_ms": round(latency_ms, 3),
                "rules": tally.rules,
            }
            if tally.client_request_id is not None:
                summary["client_request_id"] = tally.client_request_id
            try:
                triggers = [{**t, "model": model} if "model" in t else t for t in tally.triggers]
                await self.audit.append(tenant, [*triggers, summary])
            except Exception as exc:
                store_failed("audit", tenant, exc)
        status = str(tally.status)
        REQUESTS.labels(tenant, status).inc()
        LATENCY.labels(tenant, "total").observe(latency_ms)
        label = model_label(model, models)
        TOKENS.labels(tenant, label, "input").inc(tokens_in)
        TOKENS.labels(tenant, label, "output").inc(tokens_out)
        SPEND.labels(tenant, label).inc(cost)
        # One line per request; no prompt, answer or key ever goes here.
        log.info(
            "request",
            request_id=tally.request_id,
            tenant=tenant,
            model=model,
            status=tally.status,
            latency_ms=round(latency_ms, 3),
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            tokens_estimated=estimated,
            cost_usd=cost,
            rules=tally.rules,
        )


def audit_dirs(loaded: LoadedConfig) -> dict[str, Path]:
    return {tenant: path for tenant, (path, _cfg) in resolve_audit_dirs(loaded).items()}


def store_failed(kind: str, tenant: str, exc: Exception, **context: str) -> None:
    """Count and log a store that failed (limiter, usage_ledger, audit); never the request's
    text or keys, which a store error does not carry."""
    EXTPROC_ERRORS.labels(kind).inc()
    log.error(f"{kind}_error", tenant=tenant, error=str(exc), **context)
