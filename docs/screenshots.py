"""Take the screenshots in docs/console.md: the overview and a tenant page.

    .venv/bin/python docs/screenshots.py

Starts a real gateway (the console test config: tests/console_gateway.py, plus a tenant whose
backend is down), seeds 30 days of sample usage for ``acme-corp`` into its ledger through
the ledger's own API (so the chart has history), sends a little traffic (some blocked by
policy, some failing), signs in with headless Chromium and saves
``docs/console-overview.png`` and ``docs/console-tenant.png``.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc.usage import Pricing, UsageLedger, UsageRecord, resolve_usage_path  # noqa: E402

from extproc.config import load_config  # noqa: E402
from tests.console_gateway import console_config, gateway_env  # noqa: E402
from tests.support import (  # noqa: E402
    DemoUpstreamThread,
    refusing_port,
    request,
    start_gateway,
)
from tests.test_e2e_console import chromium, sign_in  # noqa: E402


async def seed_usage(config: Path) -> None:
    loaded = load_config(config, require_secrets=False)
    pricing = Pricing(loaded.model.pricing)
    ledger = UsageLedger.open(resolve_usage_path(loaded))
    rng = random.Random(7)
    now = time.time()
    for day in range(30, 0, -1):
        for model, share in (("gpt-4o-mini", 1.0), ("gpt-4o", 0.3)):
            tokens_in = int(rng.uniform(20_000, 60_000) * share)
            tokens_out = int(tokens_in * rng.uniform(1.5, 3.0))
            cost = pricing.cost(model, tokens_in, tokens_out)
            at = now - day * 86400
            await ledger.record(
                UsageRecord(at, f"seed-{day}-{model}", "acme-corp", model,
                            tokens_in, tokens_out, False, 200, 900.0, cost)
            )  # fmt: skip
    await ledger.aclose()


def main() -> None:
    demo = DemoUpstreamThread().start(chunk_delay_ms=1)
    with tempfile.TemporaryDirectory() as tmp, refusing_port() as down:
        config = console_config(Path(tmp), demo.port, extra_tenants=0)
        data = yaml.safe_load(config.read_text())
        data["tenants"]["configs"]["legacy-app"] = {
            "backend_url": f"http://127.0.0.1:{down}/v1",
            "rate_limit": {"requests_per_minute": 60},
        }
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        asyncio.run(seed_usage(config))
        gw = start_gateway(config, gateway_env())
        try:
            chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
            for tenant, count in (("acme-corp", 40), ("globex", 12), ("hooli", 25),
                                  ("umbrella", 8), ("legacy-app", 6)):  # fmt: skip
                for _ in range(count):
                    request(gw.url + "/v1/chat/completions", chat, {"X-Tenant-ID": tenant})
            for prompt in ("about falcon", "falcon again", "pelican sighting"):
                body = {**chat, "messages": [{"role": "user", "content": prompt}]}
                request(gw.url + "/v1/chat/completions", body, {"X-Tenant-ID": "acme-corp"})
            time.sleep(62)  # the console's ledger totals refresh once a minute
            admin = f"http://127.0.0.1:{data['server']['admin_port']}/ui/"
            with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
                browser = chromium(Path(profile))
                try:
                    browser.set_window_size(1440, 640)
                    sign_in(browser, admin)
                    browser.save_screenshot(str(ROOT / "docs" / "console-overview.png"))
                    browser.set_window_size(1000, 1250)
                    browser.get(admin + "tenants/acme-corp")
                    browser.save_screenshot(str(ROOT / "docs" / "console-tenant.png"))
                finally:
                    browser.quit()
        finally:
            gw.stop()
            demo.stop()


if __name__ == "__main__":
    main()
