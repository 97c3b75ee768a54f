"""The PostgreSQL usage ledger against a real server: durable batched writes, one row per
request id, schema migrations, reports, ``checkstream usage`` and failures in the user's terms."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from checkstream.cli.main import main
from checkstream.ledger.postgres import (
    SCHEMA_VERSION,
    TABLE,
    LedgerUnavailable,
    PostgresLedger,
    migrate,
    redacted,
    report,
    request_times,
)
from checkstream.ledger.usage import LedgerWriteError, UsageError, UsageRecord
from tests.postgres_server import (
    PostgresServer,
    postgres_available,
    postgres_server,
    postgres_url,
)
from tests.support import refusing_port
from tests.test_usage import NOVEMBER, SAMPLE, _assert_rows, _expected, _rec

__all__ = ["postgres_server", "postgres_url"]  # fixtures used by name

pytestmark = pytest.mark.e2e


@pytest.fixture
async def ledger(postgres_url: str) -> AsyncIterator[PostgresLedger]:
    opened = PostgresLedger.open(postgres_url)
    yield opened
    await opened.aclose()


def _rows(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return [
            (str(t), str(r))
            for t, r in conn.execute(f"SELECT tenant, request_id FROM {TABLE} ORDER BY 1, 2")
        ]


async def test_record_then_report_gives_exact_totals(
    ledger: PostgresLedger, postgres_url: str
) -> None:
    await asyncio.gather(*(ledger.record(r) for r in SAMPLE))
    for by_model in (False, True):
        for tenant in ("acme", "beta", None):
            mine = [r for r in SAMPLE if tenant is None or r.tenant == tenant]
            want = _expected(mine, by_model=by_model)
            _assert_rows(
                await ledger.report(tenant=tenant, period=NOVEMBER, by_model=by_model), want
            )
            # The CLI's blocking reader says the same.
            _assert_rows(
                report(postgres_url, tenant=tenant, period=NOVEMBER, by_model=by_model), want
            )
    acme = sum(r.cost_usd for r in SAMPLE if r.tenant == "acme")
    assert await ledger.month_spend("acme", NOVEMBER) == pytest.approx(acme)
    assert await ledger.month_spend("nobody", NOVEMBER) == 0.0
    assert await ledger.report(tenant="acme", period="2026-10", by_model=False) == []


async def test_a_record_is_committed_when_it_returns(
    ledger: PostgresLedger, postgres_url: str
) -> None:
    rec = _rec("acme", "gpt-4o", 1, 2)
    await ledger.record(rec)
    # Another connection (another replica) sees it at once.
    assert ("acme", rec.request_id) in _rows(postgres_url)


async def test_a_request_id_is_recorded_once_per_tenant(
    ledger: PostgresLedger, postgres_url: str
) -> None:
    first = _rec("acme", "gpt-4o", 100, 100)
    again = replace(first, input_tokens=999, cost_usd=1.0)  # a second finish of the same request
    other = replace(first, tenant="beta")  # another tenant's request with the same id
    await asyncio.gather(ledger.record(first), ledger.record(again))
    await ledger.record(again)
    await ledger.record(other)
    assert _rows(postgres_url) == [("acme", first.request_id), ("beta", first.request_id)]
    (row,) = await ledger.report(tenant="acme", period=NOVEMBER, by_model=False)
    assert (row.requests, row.input_tokens) == (1, 100)
    (row,) = await ledger.report(tenant="beta", period=NOVEMBER, by_model=False)
    assert row.requests == 1


async def test_concurrent_records_share_few_commits(ledger: PostgresLedger) -> None:
    records = [_rec("acme", "gpt-4o-mini", i, i) for i in range(200)]
    await asyncio.gather(*(ledger.record(r) for r in records))
    (row,) = await ledger.report(tenant="acme", period=NOVEMBER, by_model=False)
    assert row.requests == 200
    assert row.input_tokens == sum(range(200))
    # Batched: records that arrive while a batch commits go together in the next one.
    assert 1 <= ledger.commits <= 20, ledger.commits


async def test_a_cancelled_callers_row_is_still_written(
    ledger: PostgresLedger, postgres_url: str
) -> None:
    rec = _rec("acme", "gpt-4o", 3, 4)
    task = asyncio.ensure_future(ledger.record(rec))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ledger.aclose()  # commits what is queued
    assert ("acme", rec.request_id) in _rows(postgres_url)
    with pytest.raises(RuntimeError, match="closed"):
        await ledger.record(_rec("acme", "gpt-4o", 1, 1))


async def test_request_times_for_audit_completeness(
    ledger: PostgresLedger, postgres_url: str
) -> None:
    old = _rec("acme", "gpt-4o", 1, 1, at=1_000.0)
    new = [_rec("acme", "gpt-4o", 1, 1, at=2_000.0 + i) for i in range(3)]
    await asyncio.gather(*(ledger.record(r) for r in [old, *new, _rec("beta", "x", 1, 1)]))
    want = {r.request_id: r.time for r in new}
    assert await ledger.request_times("acme", 1_500.0) == want
    assert request_times(postgres_url, "acme", 1_500.0) == want


# --- schema ----------------------------------------------------------------------------


def test_migrations_are_applied_once_even_by_replicas_starting_together(
    postgres_url: str,
) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            assert migrate(postgres_url) == SCHEMA_VERSION
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    with psycopg.connect(postgres_url) as conn:
        version = conn.execute(
            "SELECT version FROM checkstream_schema WHERE component = 'usage'"
        ).fetchone()
        indexes = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = %s ORDER BY 1", (TABLE,)
        ).fetchall()
    assert version == (SCHEMA_VERSION,)
    assert [name for (name,) in indexes] == [
        f"{TABLE}_pkey",
        f"{TABLE}_tenant_period",
        f"{TABLE}_tenant_time",
    ]


def test_an_older_schema_is_upgraded(postgres_url: str) -> None:
    import checkstream.ledger.postgres as pg

    with psycopg.connect(postgres_url, autocommit=True) as conn:  # as version 1 left it
        conn.execute(
            "CREATE TABLE checkstream_schema (component text PRIMARY KEY, version integer NOT NULL)"
        )
        for statement in pg._MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO checkstream_schema VALUES ('usage', 1)")
    assert migrate(postgres_url) == SCHEMA_VERSION
    with psycopg.connect(postgres_url) as conn:
        found = conn.execute("SELECT to_regclass(%s)", (f"{TABLE}_tenant_time",)).fetchone()
    assert found is not None and found[0] is not None


def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    migrate(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE checkstream_schema SET version = 99 WHERE component = 'usage'")
    with pytest.raises(LedgerUnavailable, match="schema version 99, newer"):
        migrate(postgres_url)


# --- failures --------------------------------------------------------------------------


def test_an_unreachable_server_fails_the_start_without_the_password() -> None:
    with refusing_port() as port:
        url = f"postgresql://billing:s3cret-pw@127.0.0.1:{port}/usage"
        with pytest.raises(LedgerUnavailable) as caught:
            PostgresLedger.open(url)
    message = str(caught.value)
    assert "is unavailable" in message and f"127.0.0.1:{port}" in message
    assert "s3cret-pw" not in message
    assert redacted(url) == f"postgresql://billing:***@127.0.0.1:{port}/usage"


async def test_a_write_to_a_stopped_server_raises_and_the_ledger_recovers() -> None:
    postgres_available()
    server = PostgresServer().start()  # its own server: this test stops it
    try:
        url = server.create_database()
        ledger = PostgresLedger.open(url)
        await ledger.record(_rec("acme", "gpt-4o", 1, 1))
        server.stop_only()
        with pytest.raises(LedgerWriteError, match="write failed"):
            await ledger.record(_rec("acme", "gpt-4o", 1, 1))
        with pytest.raises(LedgerUnavailable):
            await ledger.month_spend("acme", NOVEMBER)
        server.restart()
        later = _rec("acme", "gpt-4o", 2, 2)
        for _ in range(50):  # the pool reconnects in the background
            try:
                await ledger.record(later)
                break
            except LedgerWriteError:
                await asyncio.sleep(0.1)
        (row,) = await ledger.report(tenant="acme", period=NOVEMBER, by_model=False)
        assert row.requests == 2
        await ledger.aclose()
    finally:
        server.stop()


def test_report_before_any_gateway_created_the_table_is_a_clear_error(postgres_url: str) -> None:
    with pytest.raises(UsageError, match="no checkstream_usage table yet"):
        report(postgres_url, tenant=None, period=NOVEMBER, by_model=False)


# --- checkstream usage -----------------------------------------------------------------


async def test_checkstream_usage_reads_the_shared_ledger(
    tmp_path: Path,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ledger = PostgresLedger.open(postgres_url)
    await asyncio.gather(*(ledger.record(r) for r in SAMPLE))
    await ledger.aclose()
    config = tmp_path / "checkstream.yaml"
    config.write_text(
        "usage: {backend: postgres, url_env: TEST_USAGE_DSN}\n"
        "tenants:\n  configs:\n"
        "    acme: {backend_url: 'http://127.0.0.1:9001'}\n"
        "    beta: {backend_url: 'http://127.0.0.1:9002'}\n"
    )
    monkeypatch.setenv("TEST_USAGE_DSN", postgres_url)
    argv = ["usage", "-c", str(config), "--tenant", "beta", "--period", NOVEMBER]
    assert await asyncio.to_thread(main, [*argv, "--format", "json", "--by", "model"]) == 0
    printed = json.loads(capsys.readouterr().out)
    beta: list[UsageRecord] = [r for r in SAMPLE if r.tenant == "beta"]
    want = _expected(beta, by_model=True)
    assert [(r["model"], r["requests"]) for r in printed] == [(w.model, w.requests) for w in want]
    monkeypatch.delenv("TEST_USAGE_DSN")
    assert await asyncio.to_thread(main, argv) == 1
    assert "TEST_USAGE_DSN is not set" in capsys.readouterr().err


async def test_accounts_seed_budgets_from_the_shared_ledger_or_fail_in_the_tenants_mode(
    tmp_path: Path,
) -> None:
    from checkstream.accounting.accounts import Accounts
    from checkstream.config.model import load_config
    from checkstream.limits.decisions import NANO, LimiterUnavailable

    postgres_available()
    server = PostgresServer().start()  # its own server: this test stops it
    try:
        url = server.create_database()
        config = tmp_path / "checkstream.yaml"
        config.write_text(
            f"usage: {{backend: postgres, url: '{url}'}}\n"
            "tenants:\n  configs:\n    acme: {backend_url: 'http://127.0.0.1:9001'}\n"
        )
        other_replica = PostgresLedger.open(url)
        await other_replica.record(_rec("acme", "gpt-4o", 1000, 1000))  # $0.0125
        await other_replica.aclose()
        accounts = Accounts.open(load_config(config))
        assert isinstance(accounts.ledger, PostgresLedger)
        # What another replica recorded is where this one's month starts.
        assert await accounts.limiter.spent("acme", NOVEMBER) == round(0.0125 * NANO)
        server.stop_only()
        with pytest.raises(LimiterUnavailable, match="cannot seed the month's budget"):
            await accounts.limiter.spent("acme", "2026-12")
        await accounts.aclose()
    finally:
        server.stop()


async def test_days_for_the_console_match_the_sqlite_ledger(
    ledger: PostgresLedger, postgres_url: str, tmp_path: Path
) -> None:
    from datetime import date

    from checkstream.ledger import postgres
    from checkstream.ledger.days import daily_report as sqlite_days
    from checkstream.ledger.usage import UsageLedger

    await asyncio.gather(*(ledger.record(r) for r in SAMPLE))
    local = UsageLedger.open(tmp_path / "usage.db")
    try:
        await asyncio.gather(*(local.record(r) for r in SAMPLE))
    finally:
        await local.aclose()
    since = date(2026, 1, 1)
    for tenant in ("acme", None):
        shared = postgres.daily_report(postgres_url, tenant=tenant, since=since)
        single = sqlite_days(tmp_path / "usage.db", tenant=tenant, since=since)
        assert shared and [(r.tenant, r.day, r.model, r.requests) for r in shared] == [
            (r.tenant, r.day, r.model, r.requests) for r in single
        ]
        assert [round(r.cost_usd, 9) for r in shared] == [round(r.cost_usd, 9) for r in single]


async def test_a_tenant_is_exported_and_purged_from_the_shared_ledger(
    ledger: PostgresLedger, postgres_url: str, tmp_path: Path
) -> None:
    from checkstream.ledger.postgres import redacted
    from checkstream.ledger.usage import UsageLedger
    from checkstream.tenants.ledger_rows import PostgresRows, SqliteRows
    from checkstream.tenants.offboarding import export_tenant, purge_tenant

    await asyncio.gather(*(ledger.record(r) for r in SAMPLE))
    shared = PostgresRows(postgres_url)
    acme = [r for r in SAMPLE if r.tenant == "acme"]
    done = export_tenant("acme", shared, None, tmp_path / "export")
    assert done.usage_rows == len(acme)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["usage"]["ledger"] == redacted(postgres_url)  # never a password
    # The export's rows read the same as the SQLite ledger's for the same requests.
    local = UsageLedger.open(tmp_path / "usage.db")
    try:
        await asyncio.gather(*(local.record(r) for r in SAMPLE))
    finally:
        await local.aclose()
    from_sqlite = SqliteRows(tmp_path / "usage.db").rows("acme")
    assert [r[2:] for r in shared.rows("acme")] == [r[2:] for r in from_sqlite]
    purged = purge_tenant("acme", shared, None, tmp_path / "export")
    assert purged.usage_rows == len(acme)
    assert [t for t, _ in _rows(postgres_url)] == ["beta"] * (len(SAMPLE) - len(acme))
    with psycopg.connect(postgres_url) as conn:
        (recorded,) = conn.execute(f"SELECT usage_rows FROM {TABLE}_purges").fetchall()
    assert recorded == (len(acme),)
