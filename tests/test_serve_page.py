"""The page at / in a real headless browser: Debian's chromium, driven by Selenium and chromedriver."""

from __future__ import annotations

import httpx
import pytest

from edge_fslm.testing import chromium_paths, headless_chrome, start_server

from .serve_helpers import write_quick_stack

pytest.importorskip("selenium.webdriver")

pytestmark = pytest.mark.skipif(
    chromium_paths() is None,
    reason="needs Debian's chromium and chromium-driver (scripts/install.sh installs them where apt is available)")


@pytest.fixture(scope="module")
def browser():
    driver = headless_chrome()
    yield driver
    driver.quit()


def test_the_page_shows_every_stage_as_it_runs(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    stack = write_quick_stack(tmp_path, answer_tokens=40)
    srv = start_server(["--stack", str(stack), "--preload"], tmp_path / "server.log")
    try:
        prompt = "Why do leaves change color in autumn?"
        want = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
            "model": "quick", "messages": [{"role": "user", "content": prompt}]}).json()["fslm"]["stages"]

        browser.get(srv.url + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda d: Select(d.find_element(By.ID, "model")).options)
        Select(browser.find_element(By.ID, "model")).select_by_value("quick")
        browser.find_element(By.ID, "prompt").send_keys(prompt)
        browser.find_element(By.ID, "send").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-done='1']")))
        wait.until(lambda d: all(c.get_attribute("data-done") == "1" for c in d.find_elements(By.CLASS_NAME, "stage")))

        cards = browser.find_elements(By.CLASS_NAME, "stage")
        assert [c.get_attribute("data-stage") for c in cards] == [s["name"] for s in want]
        for card, stage in zip(cards, want):
            assert card.find_element(By.CLASS_NAME, "text").text == stage["output"].strip()
            stats = card.find_element(By.CLASS_NAME, "stats").text
            assert f"→ {stage['completion_tokens']} tokens" in stats and " ms" in stats and "RSS" in stats
        assert "peak RSS" in browser.find_element(By.ID, "summary").text
        assert browser.find_element(By.ID, "error").text == ""
        assert browser.save_screenshot(str(tmp_path / "page.png"))  # benchmarks/serve.py keeps one
    finally:
        assert srv.terminate() == 0, srv.output()


def test_the_page_shows_a_refusal(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    stack = write_quick_stack(tmp_path)
    srv = start_server(["--stack", str(stack)], tmp_path / "server.log", env={"EDGE_FSLM_API_KEY": "k"})
    try:
        browser.get(srv.url + "/")
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").text)
        assert "API key" in browser.find_element(By.ID, "error").text
    finally:
        assert srv.terminate() == 0, srv.output()
