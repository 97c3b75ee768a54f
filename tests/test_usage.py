"""The usage ledger: durable batched writes, pricing, reports and ``checkstream usage``."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import astuple
from datetime import datetime
from decimal import Decimal
from itertools import count
from pathlib import Path

import pytest

from checkstream.cli.main import main
from checkstream.config.model import Price, load_config
from checkstream.ledger.usage import (
    LedgerWriteError,
    Pricing,
    UsageError,
    UsageLedger,
    UsageRecord,
    UsageRow,
    period_of,
    report,
    resolve_usage_path,
)

PRICING = Pricing(
    {
        "gpt-4o": Price(input=2.5, output=10.0),
        "gpt-4o-mini": Price(input=0.15, output=0.6),
        "claude-3-5-sonnet": Price(input=3.0, output=15.0),
    }
)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


MID_NOVEMBER = _epoch("2026-11-15T12:00:00+00:00")
NOVEMBER = period_of(MID_NOVEMBER)
_ids = count()


def _rec(
    tenant: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    *,
    at: float = MID_NOVEMBER,
    status: int = 200,
    estimated: bool = False,
) -> UsageRecord:
    return UsageRecord(
        time=at,
        request_id=f"req-{next(_ids)}",
        tenant=tenant,
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        estimated=estimated,
        status=status,
        latency_ms=12.5,
        cost_usd=PRICING.cost(model, input_tokens, output_tokens),
    )


SAMPLE = [
    _rec("acme", "gpt-4o", 120, 340),
    _rec("acme", "gpt-4o-mini-2024-07-18", 50, 10, estimated=True),
    _rec("acme", "gpt-4o", 7, 0, status=429),
    _rec("acme", "gpt-4o", 1000, 2500, status=502, estimated=True),
    _rec("beta", "claude-3-5-sonnet", 900, 1200),
    _rec("beta", "claude-3-5-sonnet", 30, 0, status=400, estimated=True),
    _rec("beta", "unpriced-model", 5, 5),
]


def _expected(records: Iterable[UsageRecord], *, by_model: bool) -> list[UsageRow]:
    """What a report must say, computed from the records themselves."""
    groups: dict[tuple[str, str], list[UsageRecord]] = {}
    for r in records:
        groups.setdefault((r.tenant, r.model if by_model else "*"), []).append(r)
    return [
        UsageRow(
            tenant=tenant,
            model=model,
            requests=len(rs),
            input_tokens=sum(r.input_tokens for r in rs),
            output_tokens=sum(r.output_tokens for r in rs),
            estimated_requests=sum(r.estimated for r in rs),
            errors=sum(r.status >= 400 for r in rs),
            # Whole nano-dollars per request, summed exactly.
            cost_usd=sum((Decimal(round(r.cost_usd * 10**9)) for r in rs), Decimal(0)) / 10**9,
        )
        for (tenant, model), rs in sorted(groups.items())
    ]


def _assert_rows(actual: Sequence[UsageRow], expected: Sequence[UsageRow]) -> None:
    # Exact: costs are decimals summed in nano-dollars, whatever the summation order.
    assert actual == expected


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[UsageLedger]:
    opened = UsageLedger.open(tmp_path / "nested" / "dir" / "usage.db")
    yield opened
    await opened.aclose()


async def _record_all(ledger: UsageLedger, records: Iterable[UsageRecord]) -> None:
    await asyncio.gather(*(ledger.record(r) for r in records))


# --- pricing ---------------------------------------------------------------------------


def test_pricing_exact_match_uses_that_models_price() -> None:
    price = Price(input=2.5, output=10.0)
    pricing = Pricing({"gpt-4o": price, "gpt-4o-mini": Price(input=0.15, output=0.6)})
    assert pricing.cost("gpt-4o", 1000, 2000) == pytest.approx(
        (1000 * price.input + 2000 * price.output) / 1_000_000
    )
    assert pricing.knows("gpt-4o")


def test_pricing_dated_snapshot_uses_the_longest_matching_prefix() -> None:
    big, mini = Price(input=2.5, output=10.0), Price(input=0.15, output=0.6)
    pricing = Pricing({"gpt-4o": big, "gpt-4o-mini": mini})
    assert pricing.cost("gpt-4o-mini-2024-07-18", 400, 100) == pytest.approx(
        (400 * mini.input + 100 * mini.output) / 1_000_000
    )
    assert pricing.cost("gpt-4o-2024-08-06", 400, 100) == pytest.approx(
        (400 * big.input + 100 * big.output) / 1_000_000
    )


@pytest.mark.parametrize("model", ["llama-3", "", "gpt-4omni", "gpt-4", "gpt"])
def test_pricing_unknown_model_costs_nothing(model: str) -> None:
    pricing = Pricing({"gpt-4o": Price(input=2.5, output=10.0)})
    assert pricing.cost(model, 1000, 1000) == 0.0
    assert not pricing.knows(model)


# --- the ledger ------------------------------------------------------------------------


async def test_record_then_report_gives_exact_totals(ledger: UsageLedger) -> None:
    acme = [r for r in SAMPLE if r.tenant == "acme"]
    await _record_all(ledger, acme)
    for by_model in (False, True):
        rows = report(ledger.path, tenant="acme", period=NOVEMBER, by_model=by_model)
        _assert_rows(rows, _expected(acme, by_model=by_model))


async def test_estimated_tokens_and_errors_are_counted(ledger: UsageLedger) -> None:
    await _record_all(ledger, SAMPLE)
    (row,) = report(ledger.path, tenant="beta", period=NOVEMBER, by_model=False)
    beta = [r for r in SAMPLE if r.tenant == "beta"]
    assert row.estimated_requests == sum(r.estimated for r in beta) > 0
    assert row.errors == sum(r.status >= 400 for r in beta) > 0
    stored = sqlite3.connect(ledger.path).execute(
        "SELECT request_id, estimated FROM usage ORDER BY request_id"
    )
    assert dict(stored) == {r.request_id: int(r.estimated) for r in SAMPLE}


async def test_a_tenants_report_holds_only_its_own_rows(ledger: UsageLedger) -> None:
    await _record_all(ledger, SAMPLE)
    for tenant in ("acme", "beta"):
        own = [r for r in SAMPLE if r.tenant == tenant]
        for by_model in (False, True):
            rows = report(ledger.path, tenant=tenant, period=NOVEMBER, by_model=by_model)
            assert {row.tenant for row in rows} == {tenant}
            _assert_rows(rows, _expected(own, by_model=by_model))
    every = report(ledger.path, tenant=None, period=NOVEMBER, by_model=False)
    _assert_rows(every, _expected(SAMPLE, by_model=False))


async def test_record_is_durable_when_it_returns(ledger: UsageLedger) -> None:
    rec = SAMPLE[1]
    await ledger.record(rec)
    # A separate connection, as another worker or the CLI would open, before aclose().
    other = sqlite3.connect(ledger.path)
    try:
        row = other.execute(
            "SELECT time, request_id, tenant, model, input_tokens, output_tokens, estimated,"
            " status, latency_ms, cost_usd FROM usage"
        ).fetchall()
        assert row == [
            (
                rec.time,
                rec.request_id,
                rec.tenant,
                rec.model,
                rec.input_tokens,
                rec.output_tokens,
                int(rec.estimated),
                rec.status,
                rec.latency_ms,
                rec.cost_usd,
            )
        ]
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        other.close()


async def test_concurrent_records_share_few_commits(ledger: UsageLedger) -> None:
    records = [_rec("acme", "gpt-4o", i, 2 * i) for i in range(200)]
    await _record_all(ledger, records)
    stored = sqlite3.connect(ledger.path).execute("SELECT request_id FROM usage").fetchall()
    assert sorted(r for (r,) in stored) == sorted(r.request_id for r in records)
    assert 1 <= ledger.commits <= len(records) // 10


async def test_month_boundary_is_utc(ledger: UsageLedger) -> None:
    october = _rec("acme", "gpt-4o", 10, 20, at=_epoch("2026-10-31T23:59:59+00:00"))
    november = _rec("acme", "gpt-4o", 30, 40, at=_epoch("2026-11-01T00:00:00+00:00"))
    assert (period_of(october.time), period_of(november.time)) == ("2026-10", "2026-11")
    await _record_all(ledger, [october, november])
    for rec in (october, november):
        period = period_of(rec.time)
        rows = report(ledger.path, tenant="acme", period=period, by_model=False)
        _assert_rows(rows, _expected([rec], by_model=False))
        assert await ledger.month_spend("acme", period) == pytest.approx(rec.cost_usd)


async def test_month_spend_sums_one_tenant_and_month(ledger: UsageLedger) -> None:
    last_month = _rec("acme", "gpt-4o", 5000, 5000, at=_epoch("2026-10-02T00:00:00+00:00"))
    await _record_all(ledger, [*SAMPLE, last_month])
    for tenant in ("acme", "beta"):
        want = sum(r.cost_usd for r in SAMPLE if r.tenant == tenant)
        assert await ledger.month_spend(tenant, NOVEMBER) == pytest.approx(want)
    assert await ledger.month_spend("nobody", NOVEMBER) == 0.0
    with pytest.raises(UsageError):
        await ledger.month_spend("acme", "November")


async def test_a_failed_commit_raises_and_the_ledger_carries_on(ledger: UsageLedger) -> None:
    admin = sqlite3.connect(ledger.path)
    admin.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON usage WHEN NEW.tenant = 'boom'"
        " BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
    )
    admin.commit()
    admin.close()
    with pytest.raises(LedgerWriteError, match="refused by test"):
        await asyncio.wait_for(ledger.record(_rec("boom", "gpt-4o", 1, 1)), 5)
    good = _rec("acme", "gpt-4o", 1, 1)
    await asyncio.wait_for(ledger.record(good), 5)
    rows = report(ledger.path, tenant=None, period=NOVEMBER, by_model=False)
    _assert_rows(rows, _expected([good], by_model=False))


async def test_records_from_other_threads_and_loops(ledger: UsageLedger) -> None:
    per_thread = [[_rec("acme", "gpt-4o", i, t) for i in range(20)] for t in range(4)]
    threads = [
        threading.Thread(target=asyncio.run, args=(_record_all(ledger, records),))
        for records in per_thread
    ]
    for thread in threads:
        thread.start()
    await asyncio.to_thread(lambda: [thread.join(10) for thread in threads])
    everything = [r for records in per_thread for r in records]
    rows = report(ledger.path, tenant="acme", period=NOVEMBER, by_model=False)
    _assert_rows(rows, _expected(everything, by_model=False))


async def test_aclose_flushes_and_refuses_more(tmp_path: Path) -> None:
    ledger = UsageLedger.open(tmp_path / "usage.db")
    pending = asyncio.ensure_future(ledger.record(SAMPLE[0]))
    await asyncio.sleep(0)  # queued, maybe not yet committed
    await ledger.aclose()
    await asyncio.wait_for(pending, 5)
    _assert_rows(
        report(ledger.path, tenant="acme", period=NOVEMBER, by_model=False),
        _expected([SAMPLE[0]], by_model=False),
    )
    with pytest.raises(RuntimeError, match="closed"):
        await ledger.record(SAMPLE[1])
    await ledger.aclose()  # twice is harmless


def test_report_on_a_missing_ledger_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.db"
    with pytest.raises(UsageError, match="no usage ledger"):
        report(missing, tenant=None, period=NOVEMBER, by_model=False)
    assert not missing.exists()


def test_report_on_a_file_that_is_not_a_ledger_is_a_clear_error(tmp_path: Path) -> None:
    other = tmp_path / "notes.db"
    other.write_text("not sqlite at all, just some notes\n" * 100)
    with pytest.raises(UsageError, match="not a usage ledger"):
        report(other, tenant=None, period=NOVEMBER, by_model=False)


@pytest.mark.parametrize("period", ["2026-13", "2026-00", "2026-1", "202611", "Nov 2026", ""])
def test_report_refuses_a_malformed_period(tmp_path: Path, period: str) -> None:
    with pytest.raises(UsageError, match="YYYY-MM"):
        report(tmp_path / "usage.db", tenant=None, period=period, by_model=False)


# --- checkstream usage -----------------------------------------------------------------

CONFIG = """\
usage: {path: ledger/usage.db}
tenants:
  configs:
    acme: {backend_url: "http://127.0.0.1:9001"}
    beta: {backend_url: "http://127.0.0.1:9002"}
"""


@pytest.fixture
async def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config whose ledger holds SAMPLE; the working directory is elsewhere."""
    path = tmp_path / "etc" / "checkstream.yaml"
    path.parent.mkdir()
    path.write_text(CONFIG)
    ledger = UsageLedger.open(resolve_usage_path(load_config(path)))
    await _record_all(ledger, SAMPLE)
    await ledger.aclose()
    monkeypatch.chdir(tmp_path)
    return path


def test_resolve_usage_path_is_relative_to_the_config(config: Path) -> None:
    assert resolve_usage_path(load_config(config)) == config.parent / "ledger" / "usage.db"


def _usage(config: Path, *args: str) -> list[str]:
    return ["usage", "-c", str(config), "--period", NOVEMBER, *args]


def test_cli_json_lists_one_object_per_row(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_usage(config, "--tenant", "acme", "--by", "model", "--format", "json")) == 0
    out, err = capsys.readouterr()
    assert err == ""
    rows = [UsageRow(**obj) for obj in json.loads(out, parse_float=Decimal)]
    _assert_rows(rows, _expected([r for r in SAMPLE if r.tenant == "acme"], by_model=True))


def test_cli_csv_has_a_header_and_all_tenants(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_usage(config, "--all-tenants", "--format", "csv")) == 0
    lines = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    expected = _expected(SAMPLE, by_model=False)
    assert [line["tenant"] for line in lines] == [row.tenant for row in expected]
    for line, row in zip(lines, expected, strict=True):
        assert line["model"] == "*"
        assert int(line["requests"]) == row.requests
        assert int(line["input_tokens"]) == row.input_tokens
        assert int(line["output_tokens"]) == row.output_tokens
        assert int(line["estimated_requests"]) == row.estimated_requests
        assert int(line["errors"]) == row.errors
        assert Decimal(line["cost_usd"]) == row.cost_usd


def test_cli_table_is_aligned_with_a_header(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No -c: ./checkstream.yaml in the working directory.
    monkeypatch.chdir(config.parent)
    assert main(["usage", "--all-tenants", "--period", NOVEMBER, "--by", "model"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "tenant",
        "model",
        "requests",
        "input_tokens",
        "output_tokens",
        "estimated_requests",
        "errors",
        "cost_usd",
    ]
    expected = _expected(SAMPLE, by_model=True)
    assert len(lines) == len(expected)
    for line, row in zip(lines, expected, strict=True):
        cells = line.split()
        assert cells[:7] == [str(v) for v in astuple(row)[:7]]
        assert cells[7] == f"{row.cost_usd:.9f}"
    # Numbers are right-aligned under their headers, so every line ends in the same column.
    assert len({len(line) for line in [header, *lines]}) == 1


def test_cli_refuses_an_unknown_tenant(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_usage(config, "--tenant", "nobody")) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "unknown tenant 'nobody'" in err


def test_cli_refuses_a_bad_period(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["usage", "-c", str(config), "--tenant", "acme", "--period", "2026-11-01"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "YYYY-MM" in err
    assert "Traceback" not in err


def test_cli_reports_a_missing_ledger_plainly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(CONFIG)
    assert main(_usage(path, "--all-tenants")) == 1
    err = capsys.readouterr().err
    assert "no usage ledger" in err
    assert str(tmp_path / "ledger" / "usage.db") in err


# --- rows that are no model's usage, costs without float noise ------------------------


async def test_bodiless_requests_are_not_billed_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(CONFIG)
    ledger = UsageLedger.open(resolve_usage_path(load_config(path)))
    # GET /v1/models: no model, no tokens (estimated), status 200. Then two refusals the
    # gateway answered before reading a model: a 429 at the headers, a 400 for a body that
    # was not JSON (its tokens estimated).
    bodiless = _rec("acme", "", 0, 0, estimated=True)
    throttled = _rec("acme", "", 0, 0, status=429)
    unreadable = _rec("acme", "", 12, 0, estimated=True, status=400)
    await _record_all(ledger, [*SAMPLE, bodiless, throttled, unreadable])
    await ledger.aclose()

    assert main(_usage(path, "--tenant", "acme", "--by", "model", "--format", "json")) == 0
    rows = json.loads(capsys.readouterr().out, parse_float=Decimal)
    models = [row["model"] for row in rows]
    assert "" not in models
    assert models.count("(no model)") == 1
    (refused,) = (row for row in rows if row["model"] == "(no model)")
    assert (refused["requests"], refused["input_tokens"], refused["errors"]) == (2, 12, 2)
    # The tenant's total counts the refusals, not the bodiless success.
    assert main(_usage(path, "--tenant", "acme", "--format", "json")) == 0
    (total,) = json.loads(capsys.readouterr().out)
    assert total["requests"] == sum(r.tenant == "acme" for r in SAMPLE) + 2


async def test_costs_are_exact_and_identical_in_every_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "checkstream.yaml"
    path.write_text(CONFIG)
    ledger = UsageLedger.open(resolve_usage_path(load_config(path)))
    costs = [1.23e-05, 3.33e-05]
    assert repr(sum(costs)) == "4.5600000000000004e-05"  # the float noise this avoids
    records = [
        UsageRecord(MID_NOVEMBER, f"noise-{i}", "acme", "m", 1, 1, False, 200, 1.0, cost)
        for i, cost in enumerate(costs)
    ]
    await _record_all(ledger, records)
    await ledger.aclose()
    outputs = {}
    for fmt in ("table", "csv", "json"):
        assert main(_usage(path, "--tenant", "acme", "--format", fmt)) == 0
        outputs[fmt] = capsys.readouterr().out
    assert outputs["table"].splitlines()[1].split()[-1] == "0.000045600"
    assert next(csv.DictReader(io.StringIO(outputs["csv"])))["cost_usd"] == "0.000045600"
    assert '"cost_usd": 0.000045600' in outputs["json"]
    assert json.loads(outputs["json"], parse_float=Decimal)[0]["cost_usd"] == Decimal("0.0000456")
