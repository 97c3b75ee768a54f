"""What is counted about each request, and what happens when it ends.

A ``Tally`` follows one request from its headers to its end. ``Accounts.finish`` closes it
exactly once: the pre-paid tokens are reconciled with the real usage and the concurrency slot
freed, the cost is charged to the tenant's budget, the usage record and audit records are
made durable, metrics are counted and one JSON log line is written. The exchange awaits it
before the last byte of the response goes out, so nothing is lost when a client hangs up
right after (design: "durable before the response ends").

``Accounts`` holds the long-lived parts (limiter with budgets, ledger, audit log and the admin's
suspensions). They outlive a config reload: counts must not reset because a policy changed.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from extproc.audit import AuditLog, resolve_audit_dirs
from extproc.config import LoadedConfig, TenantConfig
from extproc.formats.texts import Usage
from extproc.limits import (
    Charge,
    Decision,
    Limiter,
    LimiterUnavailable,
    build_limiter,
    to_nano,
)
from extproc.metering import estimate_tokens
from extproc.metrics import EXTPROC_ERRORS, LATENCY, REQUESTS, SPEND, TOKENS, model_label
from extproc.suspensions import SharedSuspensions, shared_suspensions
from extproc.usage import Pricing, UsageLedger, UsageRecord, period_of, resolve_usage_path

log = logging.getLogger("checkstream.requests")

#: The status recorded for a request whose client (or Envoy) went away before it ended.
CLIENT_CLOSED = 499


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

    @staticmethod
    def start(tenant: str, request_id: str | None) -> Tally:
        return Tally(tenant, request_id or uuid.uuid4().hex)

    def tokens(self) -> tuple[int, int, bool]:
        """Input and output tokens, and whether either was estimated."""
        if not self.billable:
            return 0, 0, False  # answered by CheckStream, Envoy, or a backend error
        usage = self.usage
        given_in = usage.input_tokens if usage else None
        given_out = usage.output_tokens if usage else None
        estimated = given_in is None or given_out is None
        tokens_in = given_in if given_in is not None else estimate_tokens(self.prompt_chars)
        tokens_out = given_out if given_out is not None else estimate_tokens(self.answer_chars)
        return max(0, tokens_in), max(0, tokens_out), estimated


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Accounts:
    """The long-lived state behind limits, budgets, usage and audit (one per process)."""

    limiter: Limiter  # rate limits and budgets
    ledger: UsageLedger | None
    audit: AuditLog
    #: Tenants suspended by an admin (suspensions.py): followed from Redis when ``shared``,
    #: else handed over by this gateway's launcher.
    suspensions: set[str] = field(default_factory=set)
    shared: SharedSuspensions | None = None

    @classmethod
    def open(cls, loaded: LoadedConfig) -> Accounts:
        """Must run inside the event loop that will use it (Redis clients bind to it)."""
        model = loaded.model
        ledger = UsageLedger.open(resolve_usage_path(loaded)) if model.usage.enabled else None

        def ledger_spend(tenant: str, period: str) -> int:
            return to_nano(ledger.month_spend(tenant, period)) if ledger is not None else 0

        limits = model.limits
        shared = shared_suspensions(loaded)
        return cls(
            limiter=build_limiter(limits, ledger_spend),
            ledger=ledger,
            audit=AuditLog(audit_dirs(loaded)),
            shared=shared,
        )

    async def aclose(self) -> None:
        await self.limiter.aclose()
        if self.shared is not None:
            await self.shared.aclose()
        if self.ledger is not None:
            await self.ledger.aclose()
        await self.audit.aclose()

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
        (the client's response is already decided)."""
        if tally.done:
            return
        tally.done = True
        tenant = tally.tenant
        latency_ms = (time.monotonic() - tally.started) * 1000
        tokens_in, tokens_out, estimated = tally.tokens()
        now = time.time()
        limits = config.rate_limit
        cost = pricing.cost(tally.model, tokens_in, tokens_out)
        if tally.admitted:
            charge = None
            if cost and config.budget is not None:
                charge = Charge(period_of(now), to_nano(cost))
            try:
                lease = tally.decision.lease if tally.decision is not None else None
                await self.limiter.finish(
                    tenant,
                    limits,
                    tally.reserved_tokens,
                    tokens_in + tokens_out,
                    charge=charge,
                    lease=lease,
                )
            except LimiterUnavailable as exc:
                store_failed("limiter", tenant, exc)
        if self.ledger is not None:
            record = UsageRecord(
                time=now,
                request_id=tally.request_id,
                tenant=tenant,
                model=tally.model,
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
        if self.audit.audits(tenant):
            summary = {
                "time": iso_now(),
                "type": "request",
                "request_id": tally.request_id,
                "tenant": tenant,
                "model": tally.model,
                "status": tally.status,
                "input_tokens": tokens_in,
                "output_tokens": tokens_out,
                "tokens_estimated": estimated,
                "latency_ms": round(latency_ms, 3),
                "rules": tally.rules,
            }
            try:
                await self.audit.append(tenant, [*tally.triggers, summary])
            except Exception as exc:
                store_failed("audit", tenant, exc)
        status = str(tally.status)
        REQUESTS.labels(tenant, status).inc()
        LATENCY.labels(tenant, "total").observe(latency_ms)
        label = model_label(tally.model, models)
        TOKENS.labels(tenant, label, "input").inc(tokens_in)
        TOKENS.labels(tenant, label, "output").inc(tokens_out)
        SPEND.labels(tenant, label).inc(cost)
        # One line per request; no prompt, answer or key ever goes here.
        log.info(
            json.dumps(
                {
                    "event": "request",
                    "request_id": tally.request_id,
                    "tenant": tenant,
                    "model": tally.model,
                    "status": tally.status,
                    "latency_ms": round(latency_ms, 3),
                    "input_tokens": tokens_in,
                    "output_tokens": tokens_out,
                    "tokens_estimated": estimated,
                    "cost_usd": cost,
                    "rules": tally.rules,
                }
            )
        )


def audit_dirs(loaded: LoadedConfig) -> dict[str, Path]:
    return {tenant: path for tenant, (path, _cfg) in resolve_audit_dirs(loaded).items()}


def store_failed(kind: str, tenant: str, exc: Exception, **context: str) -> None:
    """Count and log a store that failed (limiter, usage_ledger, audit); never the request's
    text or keys, which a store error does not carry."""
    EXTPROC_ERRORS.labels(kind).inc()
    event = {"event": f"{kind}_error", "tenant": tenant, "error": str(exc), **context}
    log.error(json.dumps(event))
