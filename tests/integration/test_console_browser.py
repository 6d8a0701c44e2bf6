"""The web console in a real browser: Debian's Chromium, driven headless by Playwright, against a
real `coe serve` with the real SmolLM2 and Gemma experts and the trained router.

Screenshots go to test-artifacts/ (or $COE_TEST_ARTIFACTS)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra installs playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (make test installs it with apt)", allow_module_level=True)

REPLY_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    folder = Path(os.environ.get("COE_TEST_ARTIFACTS", "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """A console page at a viewport size, recording console errors and uncaught exceptions."""

    def __init__(self, browser, base_url: str, width: int, height: int = 800):
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(base_url + "/ui")
        sync_api.expect(self.page.locator("#experts tbody tr").first).to_be_visible()

    def tier(self, expert: str):
        return self.page.locator(f'tr[data-expert="{expert}"] [data-testid=tier]')

    def send(self, prompt: str, model: str = "coe", max_tokens: int = 24):
        self.page.select_option("#model", model)
        self.page.fill("#max-tokens", str(max_tokens))
        self.page.fill("#prompt", prompt)
        self.page.click("#send")


def test_a_routed_chat_streams_shows_its_decision_and_moves_the_expert(server_with_config, two_experts,
                                                                       browser, artifacts):
    server = server_with_config(two_experts)  # fresh: every expert starts on disk
    ui = Page(browser, server.base_url, 1280)
    sync_api.expect(ui.page.locator("#experts tbody tr")).to_have_count(2)
    assert {ui.tier(e).inner_text() for e in ("smollm2-135m", "gemma3-270m")} == {"disk"}
    assert ui.page.locator("#map tbody tr").count() >= 2  # the category-to-expert map is shown

    ui.send("Write a short poem about the sea.")
    reply = ui.page.locator("[data-testid=reply]").last
    decision = reply.locator("[data-testid=decision]")  # drawn when the stream ends
    # not the reply's text: a base model sampled at the console's temperature (1) may stop at once
    sync_api.expect(decision).to_be_visible(timeout=REPLY_TIMEOUT_MS)
    expert = decision.locator("[data-testid=expert]").inner_text()
    assert expert in ("smollm2-135m", "gemma3-270m")
    assert decision.locator("[data-testid=category]").inner_text() == "writing"
    assert decision.locator(".bar").count() >= 2  # category probabilities as bars
    assert "tok/s" in decision.inner_text() and "switch" in decision.inner_text()
    sync_api.expect(ui.tier(expert)).to_have_text("device", timeout=10_000)  # traffic made it hot
    sync_api.expect(ui.page.locator("#routing-bars .bar")).to_have_count(1, timeout=10_000)
    ui.page.screenshot(path=str(artifacts / "console-1280x800.png"), full_page=True)
    assert ui.errors == []


def test_the_page_fits_a_narrow_window_and_chats_with_a_named_expert(smollm_server, browser, artifacts):
    ui = Page(browser, smollm_server.base_url, 400)
    ui.send("Say hello.", model="smollm2-135m", max_tokens=12)
    reply = ui.page.locator("[data-testid=reply]").last
    sync_api.expect(reply.locator("[data-testid=decision]")).to_be_visible(timeout=REPLY_TIMEOUT_MS)
    assert reply.locator("[data-testid=expert]").inner_text() == "smollm2-135m"
    overflow = ui.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a 400 px window"
    assert ui.page.locator("#send").is_visible()
    ui.page.screenshot(path=str(artifacts / "console-400.png"), full_page=True)
    assert ui.errors == []


def test_a_server_error_is_shown_as_a_readable_message(smollm_server, browser):
    ui = Page(browser, smollm_server.base_url, 1280)
    ui.send("Hello", model="smollm2-135m", max_tokens=10**7)  # beyond server.max_tokens_limit: 400
    error = ui.page.locator("#error")
    sync_api.expect(error).to_be_visible(timeout=30_000)
    assert "Error 400" in error.inner_text() and "max_tokens" in error.inner_text()


def test_429_and_401_are_explained(smollm_server, browser):
    ui = Page(browser, smollm_server.base_url, 1280)
    busy = {"error": {"message": "5 requests are waiting (scheduler.max_queue); retry later",
                      "type": "rate_limit_error", "param": None, "code": "overloaded"}}
    ui.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "7", "Content-Type": "application/json"}, body=json.dumps(busy)))
    ui.send("Hello", model="smollm2-135m")
    error = ui.page.locator("#error")
    sync_api.expect(error).to_contain_text("Error 429", timeout=30_000)
    assert "retry in 7 s" in error.inner_text() and "requests are waiting" in error.inner_text()

    denied = {"error": {"message": "missing API key", "type": "invalid_request_error", "param": None,
                        "code": "invalid_api_key"}}
    ui.page.route("**/v1/experts", lambda route: route.fulfill(
        status=401, headers={"Content-Type": "application/json"}, body=json.dumps(denied)))
    sync_api.expect(ui.page.locator("#key-form")).to_be_visible(timeout=10_000)
    sync_api.expect(error).to_contain_text("API key", timeout=10_000)


def test_with_api_keys_on_the_page_asks_for_a_key_and_then_works(server_with_config, two_experts,
                                                                  browser, monkeypatch):
    monkeypatch.setenv("COE_API_KEYS", "sk-console-key")
    server = server_with_config(two_experts)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(server.base_url + "/ui")
    sync_api.expect(page.locator("#key-form")).to_be_visible(timeout=10_000)
    sync_api.expect(page.locator("#error")).to_contain_text("Error 401")
    page.fill("#api-key", "sk-console-key")
    page.click("#key-form button")
    sync_api.expect(page.locator("#experts tbody tr")).to_have_count(2, timeout=10_000)
    sync_api.expect(page.locator("#key-form")).to_be_hidden()
    page.select_option("#model", "smollm2-135m")
    page.fill("#max-tokens", "8")
    page.fill("#prompt", "Hello")
    page.click("#send")
    reply = page.locator("[data-testid=reply]").last
    sync_api.expect(reply.locator("[data-testid=decision]")).to_be_visible(timeout=REPLY_TIMEOUT_MS)
    assert page.evaluate("sessionStorage.getItem('coe-api-key')") == "sk-console-key"
    assert page.evaluate("localStorage.length") == 0  # nothing kept beyond the browser session
