"""The chat page (dsv2/server/static/chat.html) in headless Chromium against a real `dsv2 serve`.

Needs Debian's chromium at /usr/bin/chromium and the `playwright` package (its own browser
download is not used). DSV2_SCREENSHOT=1 also rewrites docs/chat_page.png.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .server_util import running_server

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "chat_page.png"
REPLY_TIMEOUT_MS = 120_000   # a CPU model answering while the test suite runs beside it

# Every text the newest assistant bubble showed, recorded by the page itself on each DOM change,
# so that tokens arriving a few milliseconds apart are not missed by polling from Python.
RECORD_SAMPLES = """() => {
  window.samples = [];
  new MutationObserver(() => {
    const bubbles = document.querySelectorAll('.msg.assistant');
    if (bubbles.length) window.samples.push(bubbles[bubbles.length - 1].textContent);
  }).observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true});
}"""

REPLY_DONE = """(n) => document.querySelectorAll('.msg.assistant').length === n
  && !document.querySelector('.msg.streaming') && !document.querySelector('#send').disabled"""


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    with running_server() as (url, _):
        yield url


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 900, "height": 680})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def open_chat(page, url: str, max_tokens: int = 24) -> None:
    page.goto(url + "/")
    page.click("summary")   # open the settings
    page.fill("#max-tokens", str(max_tokens))


def wait_for_model(page) -> str:
    page.wait_for_function("() => document.querySelector('#model').value"
                           " && !document.querySelector('#model').selectedOptions[0].text.includes('unavailable')")
    return page.input_value("#model")


def send(page, text: str, replies: int) -> str:
    """Type `text`, send it, wait until the `replies`-th assistant bubble is complete; its text."""
    page.fill("#input", text)
    page.click("#send")
    page.wait_for_function(REPLY_DONE, arg=replies, timeout=REPLY_TIMEOUT_MS)
    return page.locator(".msg.assistant").nth(replies - 1).text_content()


def test_streams_and_keeps_the_conversation(server, page):
    open_chat(page, server)
    assert wait_for_model(page)
    page.evaluate(RECORD_SAMPLES)

    first = send(page, "Hello! Who are you?", replies=1)
    assert first
    assert page.text_content("#error") == ""
    shown = [s for s in page.evaluate("window.samples") if s]
    assert len(set(shown)) > 1, f"the reply appeared in one piece, not streamed: {shown}"
    assert shown[-1] == first

    second = send(page, "Tell me more.", replies=2)
    assert second
    assert page.locator(".msg.user").count() == 2
    assert page.locator(".msg.assistant").count() == 2
    assert page.locator(".msg.user").nth(1).text_content() == "Tell me more."
    if os.environ.get("DSV2_SCREENSHOT") == "1":
        page.click("summary")  # fold the settings away: the picture is of the conversation
        # replies vary in length: grow the window by what the message list would scroll, so all of it shows
        overflow = page.evaluate("(m => m.scrollHeight - m.clientHeight)"
                                 "(document.querySelector('#messages'))")
        page.set_viewport_size({"width": 900, "height": 680 + overflow})
        page.screenshot(path=str(SCREENSHOT))


def test_stop_keeps_the_partial_answer(server, page):
    open_chat(page, server, max_tokens=2000)
    wait_for_model(page)
    page.fill("#input", "Write a long story.")
    page.click("#send")
    page.wait_for_function("() => document.querySelector('.msg.assistant.streaming')?.textContent",
                           timeout=REPLY_TIMEOUT_MS)
    page.click("#stop")
    page.wait_for_function(REPLY_DONE, arg=1)
    assert page.locator(".msg.assistant").text_content()
    assert "stopped" in page.text_content(".meta")
    assert page.text_content("#error") == ""


def test_api_key(page):
    with running_server("--api-key", "secret") as (url, _):
        open_chat(page, url)
        page.fill("#input", "Hello")
        page.click("#send")
        page.wait_for_function("() => document.querySelector('#error').textContent")
        assert "401" in page.text_content("#error")
        # the refused turn is not kept; its text is back in the box to send again
        assert page.locator(".msg").count() == 0
        assert page.input_value("#input") == "Hello"

        page.fill("#apikey", "secret")
        page.click("#send")
        page.wait_for_function(REPLY_DONE, arg=1, timeout=REPLY_TIMEOUT_MS)
        assert page.locator(".msg.assistant").text_content()
        assert page.text_content("#error") == ""
        assert wait_for_model(page)
        assert page.evaluate("localStorage.getItem('dsv2.apikey')") == "secret"
