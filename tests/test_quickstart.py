"""examples/quickstart for real: a TRAICE server, ``server.py`` (a Flower SuperLink, then
``flwr run``) and two ``worker.py`` (Flower SuperNodes), each a separate process, on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import httpx
import psutil  # a dependency of codecarbon
import pytest

from traice.server import ServerThread, create_app

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quickstart"
RUN = "quickstart-test"
SERVER_DEADLINE_S = 420  # 2 rounds on 2 workers take ~2 minutes on 2 cores


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


class Processes:
    """The scripts the test starts, each in its own process group, and every process they start."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.seen: dict[int, psutil.Process] = {}  # every descendant ever seen
        self._files: list[IO[bytes]] = []
        self.env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        self._files.append(log)
        process = subprocess.Popen(
            [sys.executable, *args], cwd=EXAMPLE, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started[name] = process
        self.seen[process.pid] = psutil.Process(process.pid)
        return process

    def track(self) -> None:
        for process in list(self.seen.values()):
            try:
                for child in process.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.Error:
                pass

    def wait(self, process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            self.track()
            time.sleep(0.5)
        return process.poll()

    def alive(self) -> list[str]:
        running = []
        for process in self.seen.values():
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(f"{process.pid} {' '.join(process.cmdline())[:160]}")
            except psutil.Error:
                pass
        return running

    def report(self) -> str:
        return "\n".join(_tail(self.logs / f"{name}.log") for name in self.started)

    def cleanup(self) -> None:
        """Ask politely (SIGTERM, as Ctrl-C would), then SIGKILL every group and straggler."""
        self.track()
        for process in self.started.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.started.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in self.started.values():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        for process in self.seen.values():
            try:
                if process.is_running():
                    process.kill()
                    process.wait(10)
            except psutil.Error:
                pass
        for log in self._files:
            log.close()


@pytest.fixture
def traice_url(tmp_path: Path) -> Iterator[str]:
    server = ServerThread(create_app(database_url=f"sqlite:///{tmp_path / 't.db'}")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.mark.flower
@pytest.mark.timeout(600)
def test_quickstart_superlink_and_two_workers(tmp_path: Path, traice_url: str) -> None:
    superlink_port = _free_port()
    processes = Processes(tmp_path)
    with ExitStack() as cleanup:
        cleanup.callback(processes.cleanup)
        started = time.monotonic()
        server = processes.start(
            "server", "server.py", "--workers", "2", "--rounds", "2", "--traice", traice_url,
            "--port", str(superlink_port), "--run", RUN, "--wait", "180",
        )
        workers = [
            processes.start(
                f"worker-{node}", "worker.py", "--node-id", str(node), "--num-workers", "2",
                "--superlink", f"127.0.0.1:{superlink_port}", "--runtime-port", str(_free_port()), "--linger", "3",
            )
            for node in (0, 1)
        ]

        code = processes.wait(server, SERVER_DEADLINE_S)
        assert code == 0, f"server.py {'did not finish' if code is None else f'exited {code}'}\n{processes.report()}"
        elapsed = time.monotonic() - started
        # With the SuperLink gone the workers stop on their own (--linger 3).
        for worker in workers:
            assert processes.wait(worker, 60) == 0, f"a worker did not stop cleanly\n{processes.report()}"
        assert processes.alive() == [], f"processes left behind\n{processes.report()}"

    log = (tmp_path / "server.log").read_text(encoding="utf-8", errors="replace")
    assert "2/2 worker(s) online" in log, processes.report()

    with httpx.Client(base_url=traice_url, timeout=30) as api:
        runs: list[dict[str, Any]] = api.get("/api/runs").json()
        found = [r for r in runs if r["name"] == RUN]
        assert len(found) == 1, f"runs on TRAICE: {runs}\n{processes.report()}"
        run = found[0]
        clients = {c["node_id"]: c for c in api.get(f"/api/runs/{run['id']}/clients").json()}
        rounds = api.get(f"/api/runs/{run['id']}/rounds").json()
    state = f"run: {run}\nclients: {list(clients.values())}\nrounds: {rounds}\n{processes.report()}"

    assert run["status"] == "finished", state
    assert run["clients"] == 2, state
    assert run["rounds"] == 2, state
    assert run["energy_kwh"] > 0, state
    assert run["emissions_kg"] > 0, state
    assert run["accuracy"] is not None and 0 < run["accuracy"] <= 1, state

    assert set(clients) == {"worker-0", "worker-1", "fl-server"}, state
    assert clients["fl-server"]["role"] == "server", state
    for name in ("worker-0", "worker-1"):
        assert clients[name]["role"] == "client", state
        assert clients[name]["energy_kwh"] > 0, state
        assert clients[name]["rounds"] == 2, state

    assert [r["round"] for r in rounds] == [1, 2], state
    for row in rounds:
        assert row["clients"] == 2, state
        assert row["energy_kwh"] > 0, state
        assert row["server_accuracy"] is not None, state  # the ServerApp's evaluation of the global model
    # The ServerApp's own output, streamed by `flwr run --stream` (its last lines may be lost:
    # flwr 1.41 ends the stream as soon as the run is finished), and server.py's summary from TRAICE.
    assert f"[quickstart] TRAICE run {RUN!r} on {traice_url}" in log, processes.report()
    assert f"[server] TRAICE run {RUN!r} (id {run['id']}, finished): 2 round(s), 2 worker(s)" in log, log
    print(f"quickstart: server.py finished in {elapsed:.0f} s")
