"""The operator console in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by selenium, against a real gateway (Envoy + extproc + the demo
upstream) started as ``checkstream run``. Traffic goes through Envoy's listener."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.console_gateway import (
    ADMIN_TOKEN,
    UPSTREAM_SECRET,
    Operator,
    console_config,
    gateway_env,
)
from tests.support import DemoUpstreamThread, Gateway, Reply, request, start_gateway, wait_until
from tests.test_console import _rows

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HEADLESS_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--window-size=1400,1000",
)  # fmt: skip

webdriver = pytest.importorskip("selenium.webdriver")
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.skip("chromium and chromium-driver are not installed", allow_module_level=True)

from selenium.common.exceptions import NoSuchElementException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.expected_conditions import staleness_of  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402


def chromium(profile: Path) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in HEADLESS_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver: WebDriver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    demo = DemoUpstreamThread().start(chunk_delay_ms=1)
    directory = tmp_path_factory.mktemp("console")
    config = console_config(directory, demo.port)
    admin_port = yaml.safe_load(config.read_text())["server"]["admin_port"]
    gw = start_gateway(config, gateway_env())
    try:
        yield gw, f"http://127.0.0.1:{admin_port}/ui/"
    finally:
        gw.stop()
        demo.stop()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        driver = chromium(Path(profile))
        try:
            yield driver
        finally:
            driver.quit()


def chat(gw: Gateway, tenant: str, prompt: str = "hello") -> Reply:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    return request(gw.url + "/v1/chat/completions", body, {"X-Tenant-ID": tenant})


def sign_in(driver: WebDriver, console: str, token: str = ADMIN_TOKEN) -> None:
    driver.get(console)
    assert driver.current_url == console + "sign-in"  # signed out: sent to the form
    driver.find_element(By.ID, "token").send_keys(token)
    submit(driver, "sign-in")


def submit(driver: WebDriver, button: str) -> None:
    """Click a form's button and wait for the page it leads to."""
    element = driver.find_element(By.ID, button)
    element.click()
    WebDriverWait(driver, 20).until(staleness_of(element))


def listed_tenants(driver: WebDriver) -> list[str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#tenants tbody tr")
    return [str(row.get_attribute("data-tenant")) for row in rows]


def csp_violations(driver: WebDriver) -> list[str]:
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"]
    ]


def test_sign_in_see_every_tenant_suspend_one_and_sign_out(
    gateway: tuple[Gateway, str], browser: WebDriver
) -> None:
    gw, console = gateway
    for tenant in ("acme-corp", "globex", "hooli"):
        assert chat(gw, tenant).status == 200
    assert chat(gw, "acme-corp", "tell me about falcon").status == 400  # a block, audited

    sign_in(browser, console)
    assert browser.current_url == console, browser.page_source
    loaded = yaml.safe_load(gw.config_path.read_text())
    assert sorted(listed_tenants(browser)) == sorted(loaded["tenants"]["configs"])
    totals = browser.find_element(By.ID, "totals").text
    assert "6 tenants" in totals and "1 suspended" in totals
    # The bundled script runs under the CSP: filtering hides rows without a page load.
    browser.find_element(By.ID, "filter").send_keys("glob")
    visible = [
        row.get_attribute("data-tenant")
        for row in browser.find_elements(By.CSS_SELECTOR, "#tenants tbody tr")
        if row.is_displayed()
    ]
    assert visible == ["globex"]
    assert csp_violations(browser) == []

    # Sorting is a link: the server orders the rows.
    browser.get(console + "?sort=tenant&order=desc")
    names = listed_tenants(browser)
    assert names == sorted(names, reverse=True)

    browser.get(browser.find_element(By.LINK_TEXT, "globex").get_attribute("href") or "")
    assert browser.find_element(By.ID, "tenant-status").text == "active"
    submit(browser, "suspend")
    assert browser.find_element(By.ID, "notice").text == "Suspended."
    assert browser.find_element(By.ID, "tenant-status").text == "suspended (admin)"
    refused = chat(gw, "globex")
    assert refused.status == 403
    assert refused.json()["error"]["code"] == "tenant_suspended"
    assert chat(gw, "hooli").status == 200  # only that tenant

    submit(browser, "resume")
    assert browser.find_element(By.ID, "tenant-status").text == "active"
    assert chat(gw, "globex").status == 200

    # The tenant page: charts drawn on the server, triggers from the audit trail, no secret.
    browser.get(console + "tenants/acme-corp")
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert wait_until(lambda: _has_trigger(browser, console), timeout=30)
    assert "no_falcon" in browser.find_element(By.ID, "triggers").text
    assert UPSTREAM_SECRET not in browser.page_source
    href = browser.find_element(By.ID, "export-csv").get_attribute("href")
    assert href is not None and "/usage.csv?period=" in href

    submit(browser, "sign-out")
    assert browser.current_url == console + "sign-in"
    browser.get(console)
    assert browser.current_url == console + "sign-in"


def _has_trigger(browser: WebDriver, console: str) -> bool:
    """The audit record is read by the next refresh (every few seconds)."""
    browser.get(console + "tenants/acme-corp")
    try:
        browser.find_element(By.ID, "triggers")
    except NoSuchElementException:
        return False
    return True


def test_a_wrong_token_is_refused_in_the_browser(
    gateway: tuple[Gateway, str], browser: WebDriver
) -> None:
    _, console = gateway
    sign_in(browser, console, "not-the-admin-token")
    assert browser.find_element(By.ID, "sign-in-error").text == "Wrong token."
    browser.get(console)
    assert browser.current_url == console + "sign-in"


def _post(url: str, fields: dict[str, str], headers: dict[str, str]) -> Reply:
    data = urllib.parse.urlencode(fields).encode()
    form = {"Content-Type": "application/x-www-form-urlencoded", **headers}
    return request(url, data, form, method="POST")


def test_forged_and_cookie_less_posts_are_refused(
    gateway: tuple[Gateway, str], browser: WebDriver
) -> None:
    gw, console = gateway
    sign_in(browser, console)
    session = browser.get_cookie("checkstream_console")
    assert session is not None
    assert session["httpOnly"] is True and session["sameSite"] == "Strict"
    assert session.get("secure") is False  # plain HTTP on loopback
    browser.get(console + "tenants/hooli")
    csrf = browser.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")
    assert csrf
    cookie = {"Cookie": f"checkstream_console={session['value']}"}
    target = console + "tenants/hooli/suspend"

    assert _post(target, {"csrf": csrf}, {}).status == 403  # no cookie
    assert _post(target, {"csrf": "forged"}, cookie).status == 403  # wrong CSRF token
    assert _post(target, {}, cookie).status == 403  # none
    evil = {**cookie, "Origin": "http://evil.example"}
    assert _post(target, {"csrf": csrf}, evil).status == 403  # another site's form
    assert chat(gw, "hooli").status == 200  # nothing was suspended

    # The browser's own form, same cookie and token, works.
    submit(browser, "suspend")
    assert chat(gw, "hooli").status == 403
    submit(browser, "resume")
    assert chat(gw, "hooli").status == 200


def test_the_console_is_not_on_the_public_listener(gateway: tuple[Gateway, str]) -> None:
    gw, _ = gateway
    reply = request(gw.url + "/ui/sign-in", headers={"X-Tenant-ID": "hooli"})
    assert b"Operator console" not in reply.body


def test_the_operator_can_put_the_console_on_the_listener(
    tmp_path: Path, browser: WebDriver
) -> None:
    demo = DemoUpstreamThread().start(chunk_delay_ms=1)
    config = console_config(tmp_path, demo.port)
    data = yaml.safe_load(config.read_text())
    data["server"]["console_on_listener"] = True
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    gw = start_gateway(config, gateway_env())
    try:
        console = gw.url + "/ui/"
        sign_in(browser, console)
        assert browser.current_url == console
        assert "acme-corp" in listed_tenants(browser)
        assert chat(gw, "hooli").status == 200  # traffic still flows beside it
    finally:
        gw.stop()
        demo.stop()


def test_the_sidecar_worker_serves_the_console_too(tmp_path: Path) -> None:
    """``checkstream serve --admin`` (Kubernetes: no launcher) has the same console; its
    headroom comes from the worker's own limiter, exact."""
    demo = DemoUpstreamThread().start(chunk_delay_ms=1)
    config = console_config(tmp_path, demo.port)
    server = yaml.safe_load(config.read_text())["server"]
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "checkstream", "serve", "--admin", "-c", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **gateway_env()},
        start_new_session=True,
    )  # fmt: skip
    try:
        console = f"http://127.0.0.1:{server['admin_port']}/ui/"
        assert wait_until(lambda: _answers(console + "sign-in"), timeout=30), log_path.read_text()
        operator = Operator(console)
        rows = _rows(operator.get(""))
        assert sorted(rows) == sorted(yaml.safe_load(config.read_text())["tenants"]["configs"])
        assert rows["globex"]["headroom"] == "100% requests/min"  # no "*": the limiter's
        assert operator.post("tenants/hooli/suspend", {}) == 200
        assert _rows(operator.get(""))["hooli"]["status"] == "suspended (admin)"
    finally:
        process.terminate()
        process.wait(30)
        log.close()
        demo.stop()


def _answers(url: str) -> bool:
    try:
        return request(url).status == 200
    except OSError:  # not listening yet
        return False
