"""A person at the dashboard during a real Flower run: watches it fill, pauses, resumes, stops."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ARTIFACTS
from processes import kill_group, start_demo
from traice.server import ServerThread


def _until(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _reports(api: httpx.Client, run_id: int) -> list[dict[str, Any]]:
    return api.get(f"/api/runs/{run_id}/rounds/clients").json()  # type: ignore[no-any-return]


@pytest.mark.flower
@pytest.mark.timeout(600)
def test_pause_resume_and_stop_a_flower_run_from_the_dashboard(
    server: ServerThread, api: httpx.Client, browser: Any, tmp_path: Path
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    demo = start_demo(server, "from-the-browser", rounds=80, log=tmp_path / "demo.log")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        run = _until(lambda: next((r for r in api.get("/api/runs").json() if r["name"] == "from-the-browser"), None),
                     240, "the run to appear")
        page.goto(f"{server.url}/#/runs/{run['id']}")

        # The charts and the client table fill as the training reports.
        page.wait_for_selector("#clients tr[data-node='client-2']", timeout=120_000)
        page.wait_for_selector("#chart-emissions.js-plotly-plot", timeout=60_000)
        page.wait_for_selector("#chart-tradeoff.js-plotly-plot", timeout=60_000)
        page.wait_for_selector("#chart-breakdown.js-plotly-plot", timeout=60_000)
        _until(lambda: api.get(f"/api/runs/{run['id']}").json()["rounds"] >= 3, 120, "round 3")
        page.screenshot(path=str(ARTIFACTS / "dashboard-running.png"), full_page=True)

        page.click("#btn-pause")
        page.wait_for_selector("#commands [data-status='done']", timeout=60_000)
        page.wait_for_function("document.querySelector('#run-status').textContent.includes('paused')")
        held = _reports(api, run["id"])
        time.sleep(5)  # many rounds' worth of time: nothing may train
        assert _reports(api, run["id"]) == held
        page.screenshot(path=str(ARTIFACTS / "dashboard-paused.png"), full_page=True)

        page.click("#btn-resume")
        _until(lambda: len(_reports(api, run["id"])) > len(held), 60, "training to continue after resume")

        page.once("dialog", lambda dialog: dialog.accept())  # "Stop this run?"
        page.click("#btn-stop")
        assert demo.wait(180) == 0  # the FL server ended the run and every FL process exited
        page.wait_for_function("document.querySelector('#run-status').textContent.includes('stopped')",
                               timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "dashboard-stopped.png"), full_page=True)

        final = api.get(f"/api/runs/{run['id']}").json()
        statuses = {c["action"]: c["status"] for c in api.get(f"/api/runs/{run['id']}/commands").json()}
        assert final["status"] == "stopped" and final["rounds"] < 80
        assert statuses == {"pause": "done", "resume": "done", "stop": "done"}
        assert page.is_disabled("#btn-pause") and page.is_disabled("#btn-stop")
        assert errors == []
    finally:
        page.close()
        kill_group(demo)
