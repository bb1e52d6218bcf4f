"""The runs page in a real browser (Debian's Chromium driven by Playwright)."""

from __future__ import annotations

from typing import Any

from conftest import ARTIFACTS

from traice import TraiceClient
from traice.server import ServerThread


def test_runs_page_lists_runs_and_updates_live(server: ServerThread, browser: Any) -> None:
    with TraiceClient(server.url, run="first-run", node_id="w1") as client:
        client.update(1, 0.61, 1.2)
    page = browser.new_page()
    page.goto(server.url + "/")

    page.wait_for_selector("text=first-run")
    page.wait_for_selector("#live:not(.off)")  # the dashboard socket is open
    with TraiceClient(server.url, run="second-run", node_id="w2") as client:  # arrives without a reload
        client.update(1, 0.7, 0.9)
    page.wait_for_selector("text=second-run", timeout=10_000)

    rows = page.locator("#runs tbody tr")
    assert rows.count() == 2
    first = rows.filter(has_text="first-run")
    assert "finished" in first.inner_text() and "0.610" in first.inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "runs-page.png"), full_page=True)
    page.close()
