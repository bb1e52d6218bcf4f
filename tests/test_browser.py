"""The runs page in a real browser (Debian's Chromium driven by Playwright)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import ARTIFACTS

from traice import TraiceClient
from traice.server import ServerThread, create_app
from traice.server.auth import Auth


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


def test_a_server_with_an_admin_token_asks_the_browser_to_sign_in(tmp_path: Path, browser: Any) -> None:
    admin = "admin-token-for-the-browser-test"
    app = create_app(database_url=f"sqlite:///{tmp_path / 't.db'}", auth=Auth(admin_token=admin, worker_tokens=["w"]))
    with ServerThread(app) as server:
        with TraiceClient(server.url, run="guarded-run", node_id="w1", token="w") as client:
            client.update(1, 0.5, 1.0)
        context = browser.new_context()  # its own cookie jar
        page = context.new_page()
        page.goto(server.url + "/")
        page.wait_for_url("**/login")  # the dashboard's first API call was refused: sign in
        page.fill("#token", "not-the-token")
        page.click("button[type=submit]")
        page.wait_for_selector("text=That is not the admin token.")
        page.fill("#token", admin)
        page.click("button[type=submit]")
        page.wait_for_selector("text=guarded-run")
        page.wait_for_selector("#live:not(.off)")  # the dashboard socket took the cookie too
        assert admin not in page.content()
        context.close()
