"""The chat page at GET /, driven in a real headless Chromium (Debian's, installed by `make test`)."""

from __future__ import annotations

import time

from playwright.sync_api import sync_playwright

from tests.serve.conftest import API_KEY

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def test_chat_page_streams_an_answer_and_stops(live):
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(live.url + "/")
            assert "loom" in page.title()
            page.fill("#api-key", API_KEY)
            page.fill("#temperature", "0")
            page.fill("#input", "What is the capital of France?")
            page.click("#send")
            answer = page.locator(".msg.assistant").nth(0)
            page.wait_for_function("document.querySelector('.msg.assistant').dataset.state === 'done'",
                                   timeout=120_000)
            assert "Paris" in answer.inner_text()
            assert "tok/s" in page.inner_text("#speed")

            # A long answer, stopped while it streams.
            page.fill("#max-tokens", "400")
            page.fill("#input", "Write a very long story about a dragon who learns to bake bread.")
            page.click("#send")
            second = page.locator(".msg.assistant").nth(1)
            page.wait_for_function(
                "document.querySelectorAll('.msg.assistant')[1].textContent.length > 40", timeout=120_000)
            assert page.is_enabled("#stop")
            page.click("#stop")
            page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].dataset.state === 'stopped'",
                                   timeout=30_000)
            assert second.inner_text().endswith("[stopped]")
            assert page.is_enabled("#send") and not page.is_enabled("#stop")
            assert page.locator(".msg").count() == 4  # the conversation is kept on the page
        finally:
            browser.close()
    assert requests and all(u.startswith(live.url) for u in requests)  # nothing fetched from elsewhere
    deadline = time.time() + 10  # the stopped request was aborted and its blocks freed
    while (live.engine.requests or live.engine.block_manager.num_used_blocks) and time.time() < deadline:
        time.sleep(0.1)
    assert not live.engine.requests and live.engine.block_manager.num_used_blocks == 0
