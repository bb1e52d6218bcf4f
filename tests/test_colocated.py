"""Many clients on one machine: their energies add up to what the machine used, not a multiple of it."""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from traice.server import ServerThread, create_app


class _MachineTimeline:
    """A reference: codecarbon in machine mode, its cumulative energy sampled every second."""

    def __init__(self) -> None:
        from codecarbon import OfflineEmissionsTracker
        from codecarbon.output_methods.base_output import BaseOutput

        self.points: list[tuple[float, float]] = []
        lock = threading.Lock()
        timeline = self

        class Recorder(BaseOutput):  # type: ignore[misc]
            def live_out(self, total: Any, delta: Any) -> None:
                with lock:
                    timeline.points.append((datetime.now().timestamp(), float(total.cpu_energy + total.ram_energy
                                                                                + total.gpu_energy)))

        self.tracker = OfflineEmissionsTracker(
            country_iso_code="FRA", tracking_mode="machine", measure_power_secs=1, api_call_interval=1,
            output_methods=[], output_handlers=[Recorder()], log_level="error", allow_multiple_runs=True,
        )

    def energy_kwh(self, start: float, end: float) -> float:
        times = [t for t, _ in self.points]

        def at(t: float) -> float:  # linear between samples
            i = bisect.bisect_left(times, t)
            (t0, e0), (t1, e1) = self.points[max(0, i - 1)], self.points[min(i, len(times) - 1)]
            return e0 if t1 == t0 else e0 + (e1 - e0) * (t - t0) / (t1 - t0)

        assert times[0] <= start and end <= times[-1], "the reference must cover the run"
        return at(end) - at(start)


@pytest.mark.flower
@pytest.mark.timeout(600)
def test_the_clients_of_a_simulation_add_up_to_the_machine(tmp_path: Path) -> None:
    database = tmp_path / "demo.db"
    reference = _MachineTimeline()
    reference.tracker.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "traice", "demo", "--rounds", "15", "--clients", "4", "--no-browser",
             "--no-serve", "--port", "0", "--database-url", f"sqlite:///{database}", "--run", "colocated"],
            cwd=tmp_path, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0",
                               "TRAICE_LEDGER_DIR": str(tmp_path / "ledger")},
            capture_output=True, text=True, timeout=540,
        )
    finally:
        reference.tracker.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with ServerThread(create_app(database_url=f"sqlite:///{database}")) as server:
        run = httpx.get(f"{server.url}/api/runs").json()[0]
        rounds = httpx.get(f"{server.url}/api/runs/{run['id']}/rounds").json()
    start = min(datetime.fromisoformat(r["started_at"].replace("Z", "+00:00")).timestamp() for r in rounds)
    end = max(datetime.fromisoformat(r["ended_at"].replace("Z", "+00:00")).timestamp() for r in rounds)
    parties_kwh = run["by_component"]["compute"]["energy_kwh"] + run["by_component"]["server"]["energy_kwh"]
    machine_kwh = reference.energy_kwh(start, end)

    print(f"parties {parties_kwh * 1000:.3f} Wh, machine {machine_kwh * 1000:.3f} Wh over {end - start:.1f} s: "
          f"ratio {parties_kwh / machine_kwh:.3f}")
    assert run["clients"] == 4
    assert parties_kwh == pytest.approx(machine_kwh, rel=0.05)
