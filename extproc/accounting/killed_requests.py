"""Bill the requests a killed predecessor left open (journal.py), once, at a worker's start.

Each becomes one usage row through the normal ledger, status 499 (the client lost its
stream) with ``estimated`` tokens: the prompt's, estimated from its length, and none for the
answer (how much streamed before the kill is not journaled: an undercount, never a charge
for text that was not sent). Audited tenants also get the request's summary record. The
limiter is not settled: the dead process's slot and reservation expire with their window.

Run by the worker, before it serves.
"""

from __future__ import annotations

import time
from pathlib import Path

from checkstream.accounting.accounts import CLIENT_CLOSED, Accounts, iso_now, store_failed
from checkstream.accounting.journal import OpenRequest, read_open
from checkstream.accounting.metering import estimate_tokens
from checkstream.ledger.usage import Pricing, UsageRecord
from checkstream.ops import logs

log = logs.get("checkstream.journal")


async def bill_killed_requests(accounts: Accounts, pricing: Pricing, path: Path) -> int:
    """Record what ``path`` holds open, then empty it; returns how many were recorded."""
    left = read_open(path)
    for request in left:
        await _bill(accounts, pricing, request)
    path.unlink(missing_ok=True)
    if left:
        log.warning("requests of a killed worker recorded as 499", requests=len(left))
    return len(left)


async def _bill(accounts: Accounts, pricing: Pricing, request: OpenRequest) -> None:
    now = time.time()
    tokens_in = estimate_tokens(request.prompt_chars)
    latency_ms = round(max(0.0, now - request.started) * 1000, 3)  # an upper bound
    tenant = request.tenant
    if accounts.ledger is not None:
        record = UsageRecord(
            time=now,
            request_id=request.request_id,
            tenant=tenant,
            model=request.model,
            input_tokens=tokens_in,
            output_tokens=0,
            estimated=True,
            status=CLIENT_CLOSED,
            latency_ms=latency_ms,
            cost_usd=pricing.cost(request.model, tokens_in, 0),
        )
        try:
            await accounts.ledger.record(record)
        except Exception as exc:
            store_failed("usage_ledger", tenant, exc)
    if accounts.audit.audits(tenant):
        summary: dict[str, object] = {
            "time": iso_now(),
            "type": "request",
            "request_id": request.request_id,
            "tenant": tenant,
            "model": request.model,
            "status": CLIENT_CLOSED,
            "input_tokens": tokens_in,
            "output_tokens": 0,
            "tokens_estimated": True,
            "latency_ms": latency_ms,
            "rules": [],
        }
        if request.client_request_id is not None:
            summary["client_request_id"] = request.client_request_id
        try:
            await accounts.audit.append(tenant, [summary])
        except Exception as exc:
            store_failed("audit", tenant, exc)
