"""The chat page at / in a real browser (Playwright driving Debian's Chromium) against a real server."""
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_server import REPO, ServerProcess, wait_for
from playwright.sync_api import BrowserContext, ConsoleMessage, Page, Request, Route, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO / "docs" / "chat-page.png"
UPDATE_SCREENSHOT_ENV = "UPDATE_DOCS_SCREENSHOT"  # 1: the test also refreshes docs/chat-page.png
ABORTED_METRIC = re.compile(r'^dots_serve_request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', re.M)
STATS = re.compile(r"^\d+ tokens? · \d+\.\d\d s to first token · \d+\.\d tokens/s")
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-system-deps.sh")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1100, "height": 760},
        )
        yield context
        context.close()


class PageWatch:
    """Everything the page logs and requests, to check that it stays quiet and local."""

    def __init__(self, page: Page) -> None:
        self.console_errors: list[ConsoleMessage] = []
        self.page_errors: list[str] = []
        self.requests: list[Request] = []
        page.on("console", lambda message: message.type == "error" and self.console_errors.append(message))
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("request", lambda request: self.requests.append(request))

    def chat_requests(self) -> list[dict]:
        return [request.post_data_json for request in self.requests if request.url.endswith("/v1/chat/completions")]


def open_page(browser: BrowserContext, url: str) -> tuple[Page, PageWatch]:
    page = browser.new_page()
    watch = PageWatch(page)
    page.goto(url)
    page.evaluate("localStorage.clear(); sessionStorage.clear()")  # settings an earlier test left for this origin
    page.reload()
    return page, watch


def aborted_requests(http: httpx.Client) -> float:
    match = ABORTED_METRIC.search(http.get("/metrics").text)
    return float(match.group(1)) if match else 0.0


def assistant_text_updates(page: Page) -> int:
    return page.evaluate("window.__assistantUpdates")


def count_assistant_updates(page: Page) -> None:
    """Counts changes to assistant messages' text, to see a reply arrive in pieces rather than at once."""
    page.evaluate("""() => {
        window.__assistantUpdates = 0;
        new MutationObserver((records) => {
            for (const record of records) {
                const target = record.target;
                const element = target.nodeType === Node.ELEMENT_NODE ? target : target.parentElement;
                if (element && element.closest('[data-role="assistant"] .text')) window.__assistantUpdates += 1;
            }
        }).observe(document.getElementById("conversation"), {subtree: true, childList: true, characterData: true});
    }""")


def without_eos(route: Route) -> None:
    """Asks for a reply that cannot end early, so that Stop lands mid-stream (the page itself never sends this)."""
    body = {**route.request.post_data_json, "ignore_eos": True, "max_tokens": 1500}
    route.continue_(post_data=json.dumps(body))


def test_chat_page_streams_stops_continues_and_shows_errors(
    browser: BrowserContext, server: ServerProcess, http: httpx.Client, tmp_path: Path
) -> None:
    page, watch = open_page(browser, server.url + "/")
    expect(page.locator("#model")).to_have_value("dots1-tiny")
    message_box = page.get_by_role("textbox", name="Message", exact=True)
    assert message_box.evaluate("element => element.tagName") == "TEXTAREA"
    assistant = page.locator('[data-role="assistant"]')
    user = page.locator('[data-role="user"]')

    # Turn 1: Shift+Enter is a new line, Enter sends; the reply streams in and gets its statistics.
    count_assistant_updates(page)
    message_box.fill("Hello there")
    message_box.press("Shift+Enter")
    message_box.press_sequentially("Who are you?")
    assert message_box.input_value() == "Hello there\nWho are you?"
    message_box.press("Enter")
    expect(user.nth(0)).to_have_text("Hello there\nWho are you?")
    expect(assistant.nth(0).locator(".stats")).to_have_text(STATS, timeout=WAIT_MS)
    first_reply = assistant.nth(0).locator(".text").text_content()
    assert first_reply.strip()
    assert assistant_text_updates(page) >= 2  # arrived in pieces
    assert message_box.input_value() == ""
    [first_request] = watch.chat_requests()
    assert first_request["stream"] is True and first_request["stream_options"] == {"include_usage": True}
    assert first_request["model"] == "dots1-tiny" and first_request["temperature"] == 0.8
    assert first_request["messages"] == [{"role": "user", "content": "Hello there\nWho are you?"}]

    # Turn 2: Stop mid-stream; the server aborts the request.
    aborted_before = aborted_requests(http)
    page.route("**/v1/chat/completions", without_eos)
    message_box.fill("Tell me a long story.")
    message_box.press("Enter")
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_visible()
    expect(assistant.nth(1).locator(".text")).not_to_have_text("", timeout=WAIT_MS)
    stop.click()
    expect(assistant.nth(1).locator(".stats")).to_contain_text("stopped", timeout=WAIT_MS)
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    page.unroute("**/v1/chat/completions")
    wait_for(lambda: aborted_requests(http) == aborted_before + 1, 30, "the stopped request to be aborted")
    wait_for(lambda: http.get("/health").json()["num_running"] == 0, 30, "the engine to be idle")
    stopped_reply = assistant.nth(1).locator(".text").text_content()

    # Turn 3 continues the conversation: the request carries every earlier turn, as shown.
    message_box.fill("Go on.")
    message_box.press("Enter")
    expect(assistant.nth(2).locator(".stats")).to_have_text(STATS, timeout=WAIT_MS)
    third_request = watch.chat_requests()[-1]
    assert third_request["messages"] == [
        {"role": "user", "content": "Hello there\nWho are you?"},
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "Tell me a long story."},
        {"role": "assistant", "content": stopped_reply},
        {"role": "user", "content": "Go on."},
    ]
    page.screenshot(path=str(tmp_path / "chat-page.png"))
    if os.environ.get(UPDATE_SCREENSHOT_ENV) == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "chat-page.png", SCREENSHOT)

    # A setting the server refuses: its error, in words, in the conversation; the message comes back to the box.
    page.get_by_label("Max tokens").fill("5000")
    message_box.fill("One more.")
    message_box.press("Enter")
    error = page.get_by_role("alert")
    expect(error).to_contain_text("maximum context length is 2048 tokens", timeout=WAIT_MS)
    expect(error).to_contain_text("400")
    expect(assistant).to_have_count(3)  # no empty reply left behind
    expect(user.nth(3)).to_have_class(re.compile(r"\bunsent\b"))
    assert message_box.input_value() == "One more."

    # New chat: an empty conversation, and the next request carries no history.
    page.get_by_label("Max tokens").fill("16")
    page.get_by_role("button", name="New chat").click()
    expect(page.locator("[data-role]")).to_have_count(0)
    message_box.fill("Hello again")
    message_box.press("Enter")
    expect(assistant.nth(0).locator(".stats")).not_to_be_empty(timeout=WAIT_MS)
    assert watch.chat_requests()[-1]["messages"] == [{"role": "user", "content": "Hello again"}]
    assert watch.chat_requests()[-1]["max_tokens"] == 16

    assert watch.page_errors == []
    # The one refused request is the only thing the browser reports, as its failed load.
    assert [(message.text, message.location["url"]) for message in watch.console_errors] == [
        ("Failed to load resource: the server responded with a status of 400 (Bad Request)",
         f"{server.url}/v1/chat/completions")
    ]
    assert all(request.url.startswith(server.url + "/") for request in watch.requests)
    page.close()


def test_model_text_is_shown_as_text_never_as_html(browser: BrowserContext, server: ServerProcess) -> None:
    page, watch = open_page(browser, server.url + "/")
    message_box = page.get_by_role("textbox", name="Message", exact=True)
    markup = '<img src="x" onerror="window.__injected = 1"><b>bold</b>'
    page.get_by_label("Max tokens").fill("4")
    message_box.fill(markup)
    message_box.press("Enter")
    expect(page.locator('[data-role="assistant"] .stats')).not_to_be_empty(timeout=WAIT_MS)
    expect(page.locator('[data-role="user"] .text')).to_have_text(markup)
    assert page.locator("#conversation img, #conversation b").count() == 0
    assert page.evaluate("window.__injected") is None
    assert watch.page_errors == []
    page.close()


def test_new_chat_mid_stream_leaves_the_new_conversation_empty(browser: BrowserContext, server: ServerProcess,
                                                               http: httpx.Client) -> None:
    page, watch = open_page(browser, server.url + "/")
    expect(page.locator("#model")).to_have_value("dots1-tiny")
    message_box = page.get_by_role("textbox", name="Message", exact=True)
    assistant = page.locator('[data-role="assistant"]')
    page.route("**/v1/chat/completions", without_eos)
    message_box.fill("Tell me a long story.")
    message_box.press("Enter")
    expect(assistant.nth(0).locator(".text")).not_to_have_text("", timeout=WAIT_MS)
    page.unroute("**/v1/chat/completions")
    page.get_by_label("Max tokens").fill("8")
    page.get_by_role("button", name="New chat").click()
    expect(page.locator("[data-role]")).to_have_count(0)
    message_box.fill("Fresh start")
    message_box.press("Enter")
    expect(assistant.nth(0).locator(".stats")).to_have_text(STATS, timeout=WAIT_MS)
    assert watch.chat_requests()[-1]["messages"] == [{"role": "user", "content": "Fresh start"}]
    reply = assistant.nth(0).locator(".text").text_content()
    message_box.fill("And then?")
    message_box.press("Enter")
    expect(assistant.nth(1).locator(".stats")).to_have_text(STATS, timeout=WAIT_MS)
    assert watch.chat_requests()[-1]["messages"] == [
        {"role": "user", "content": "Fresh start"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And then?"},
    ]
    expect(page.locator("[data-role]")).to_have_count(4)  # the aborted turn is nowhere
    wait_for(lambda: http.get("/health").json()["num_running"] == 0, 30, "the aborted request to end")
    assert watch.page_errors == []
    page.close()


def test_api_key_from_the_settings_is_used_and_kept(browser: BrowserContext) -> None:
    with ServerProcess("--api-key", "sesame") as server:
        page, watch = open_page(browser, server.url + "/")
        expect(page.locator("#server-status")).to_have_text("This server needs an API key (see Settings).")
        page.get_by_label("API key").fill("sesame")
        page.get_by_label("API key").dispatch_event("change")  # as when leaving the field
        expect(page.locator("#model")).to_have_value("dots1-tiny")
        page.get_by_label("Max tokens").fill("8")
        message_box = page.get_by_role("textbox", name="Message", exact=True)
        message_box.fill("Hello")
        message_box.press("Enter")
        expect(page.locator('[data-role="assistant"] .stats')).to_have_text(STATS, timeout=WAIT_MS)
        chat_request = next(request for request in watch.requests if request.url.endswith("/v1/chat/completions"))
        assert chat_request.headers["authorization"] == "Bearer sesame"
        page.reload()  # the key lasts as long as the tab, and never reaches localStorage
        expect(page.get_by_label("API key")).to_have_value("sesame")
        expect(page.get_by_label("Max tokens")).to_have_value("8")
        expect(page.locator("#model")).to_have_value("dots1-tiny")
        assert "sesame" not in json.dumps(page.evaluate("Object.entries(localStorage)"))
        page.evaluate("localStorage.clear(); sessionStorage.clear()")
        page.close()


def test_no_ui_serves_no_page() -> None:
    with ServerProcess("--no-ui") as server:
        for path in ("/", "/static/chat.js"):
            response = httpx.get(server.url + path)
            assert response.status_code == 404
            assert response.json() == {"error": {"message": f"Unknown route GET {path}", "type":
                                                 "invalid_request_error", "param": None, "code": "not_found"}}
        assert "Chat page" not in server.log_text()
        assert httpx.get(server.url + "/v1/models").status_code == 200


def test_page_and_assets_are_served_with_a_strict_policy(server: ServerProcess) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace(server.url, "")  # nothing from elsewhere
    for name, kind in (("chat.js", "text/javascript"), ("chat.css", "text/css")):
        asset = httpx.get(f"{server.url}/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert "http" not in asset.text
    missing = httpx.get(server.url + "/static/../server/app.py")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert f"Chat page: {server.url}/" in server.log_text()


def test_page_fits_a_phone_and_follows_the_dark_scheme(browser: BrowserContext, server: ServerProcess) -> None:
    page, watch = open_page(browser, server.url + "/")
    page.set_viewport_size({"width": 390, "height": 844})
    message_box = page.get_by_role("textbox", name="Message", exact=True)
    expect(message_box).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    expect(page.get_by_label("Model")).to_be_hidden()  # settings fold away on a narrow screen
    page.get_by_role("button", name="Settings").click()
    expect(page.get_by_label("Model")).to_be_visible()
    expect(page.get_by_role("button", name="Settings")).to_have_attribute("aria-expanded", "true")

    def background() -> str:
        return page.evaluate("getComputedStyle(document.body).backgroundColor")

    page.emulate_media(color_scheme="light")
    light = background()
    page.emulate_media(color_scheme="dark")
    assert background() != light
    assert watch.page_errors == [] and watch.console_errors == []
    page.close()
