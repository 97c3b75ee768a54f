"""What the journal of open requests (accounting/journal.py) adds to each counted request.

Usage (from the repo root, with the project's venv)::

    .venv/bin/python bench/journal_cost.py [--requests 20000] [--rounds 5]

Per request the worker calls ``Accounts.journaled`` (one "open" line) and, in
``Accounts.finish``, ``Journal.closed`` (one "close" line, compaction now and then). Measured
in interleaved rounds against the store work every counted request already does in the same
run: ``UsageLedger.record`` of its usage row into SQLite (batched, as in the worker). Prints
microseconds per request (wall, one process) and the journal's cost as % of the ledger's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from checkstream.accounting.accounts import Accounts, Tally
from checkstream.accounting.journal import Journal
from checkstream.audit.trail import AuditLog
from checkstream.ledger.usage import UsageLedger, UsageRecord
from checkstream.limits.memory import MemoryLimiter


def journal_round(accounts: Accounts, n: int) -> float:
    journal = accounts.journal
    assert journal is not None
    tallies = [Tally.start("bench", None) for _ in range(n)]
    for tally in tallies:
        tally.model, tally.prompt_chars, tally.reserved_tokens = "gpt-4o-mini", 1200, 800
    started = time.perf_counter()
    for tally in tallies:
        accounts.journaled(tally)
        journal.closed(tally.journal_key)
    return (time.perf_counter() - started) / n * 1e6


async def ledger_round(ledger: UsageLedger, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        await ledger.record(
            UsageRecord(
                time=time.time(),
                request_id=f"r{i}",
                tenant="bench",
                model="gpt-4o-mini",
                input_tokens=300,
                output_tokens=200,
                estimated=False,
                status=200,
                latency_ms=12.5,
                cost_usd=0.0,
            )
        )
    return (time.perf_counter() - started) / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        ledger = UsageLedger.open(base / "usage.db")
        accounts = Accounts(limiter=MemoryLimiter(), ledger=None, audit=AuditLog({}))
        accounts.journal = Journal(base / "open-requests.jsonl")
        journal_us, ledger_us = [], []
        for _ in range(args.rounds):
            journal_us.append(journal_round(accounts, args.requests))
            ledger_us.append(await ledger_round(ledger, min(args.requests, 2000)))
        await ledger.aclose()
        await accounts.aclose()
    j, led = statistics.median(journal_us), statistics.median(ledger_us)
    print(f"journal open+close: {j:.2f} us/request (median of {args.rounds} rounds)")
    print(f"ledger record:      {led:.2f} us/request")
    print(f"journal / ledger:   {100 * j / led:.1f}%")


if __name__ == "__main__":
    asyncio.run(main())
