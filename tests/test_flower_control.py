"""Pause, resume, exclude and stop a real Flower simulation through TRAICE's REST API."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from processes import kill_group, start_demo
from traice.server import ServerThread


def _wait(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def run_by_name(api: httpx.Client, name: str) -> dict[str, Any] | None:
    return next((r for r in api.get("/api/runs").json() if r["name"] == name), None)


def command_done(api: httpx.Client, run_id: int, command_id: int) -> dict[str, Any] | None:
    command = next(c for c in api.get(f"/api/runs/{run_id}/commands").json() if c["id"] == command_id)
    return command if command["status"] == "done" else None


@pytest.mark.flower
@pytest.mark.timeout(600)
def test_pause_resume_exclude_and_stop_a_flower_run(server: ServerThread, api: httpx.Client, tmp_path: Path) -> None:
    demo = start_demo(server, "controlled", rounds=60, log=tmp_path / "demo.log")
    try:
        run = _wait(lambda: (r := run_by_name(api, "controlled")) and r["rounds"] >= 2 and r, 240, "round 2")
        run_id = run["id"]

        pause = api.post(f"/api/runs/{run_id}/control", json={"action": "pause"}).json()
        done = _wait(lambda: command_done(api, run_id, pause["id"]), 60, "the pause to take effect")
        held_before = int(re.search(r"round (\d+)", done["detail"]).group(1))  # type: ignore[union-attr]
        reports_paused = api.get(f"/api/runs/{run_id}/rounds/clients").json()
        clients_paused = api.get(f"/api/runs/{run_id}/clients").json()
        time.sleep(4)  # several rounds' worth of time
        reports_later = api.get(f"/api/runs/{run_id}/rounds/clients").json()

        assert reports_later == reports_paused  # no client trained while paused
        assert max(r["round"] for r in reports_paused) == held_before - 1
        assert {c["status"] for c in clients_paused if c["role"] == "client"} == {"paused"}

        resume = api.post(f"/api/runs/{run_id}/control", json={"action": "resume"})
        assert resume.status_code == 202
        _wait(lambda: api.get(f"/api/runs/{run_id}").json()["rounds"] > held_before, 60, "training to continue")

        exclude = api.post(f"/api/runs/{run_id}/clients/client-1/control", json={"action": "exclude"}).json()
        done = _wait(lambda: command_done(api, run_id, exclude["id"]), 60, "the exclusion to take effect")
        from_round = int(re.search(r"round (\d+)", done["detail"]).group(1))  # type: ignore[union-attr]
        _wait(lambda: api.get(f"/api/runs/{run_id}").json()["rounds"] >= from_round + 1, 60, "rounds without it")

        stop = api.post(f"/api/runs/{run_id}/control", json={"action": "stop"}).json()
        assert demo.wait(180) == 0  # every FL process ends; the demo exits cleanly

        rounds = api.get(f"/api/runs/{run_id}/rounds").json()
        excluded_rounds = [r["round"] for r in api.get(f"/api/runs/{run_id}/rounds/clients?node_id=client-1").json()]
        final = api.get(f"/api/runs/{run_id}").json()
        assert resume.json()["status"] in ("requested", "acknowledged", "done")
        assert max(excluded_rounds) < from_round  # client-1 was not sampled after its exclusion
        assert all(r["clients"] == 2 for r in rounds if r["round"] >= from_round)
        assert final["status"] == "stopped" and final["rounds"] < 60
        assert command_done(api, run_id, stop["id"]) is not None
    finally:
        kill_group(demo)
