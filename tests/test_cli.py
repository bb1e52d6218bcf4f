"""The command line as a person uses it: help texts, runs, export."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from traice import TraiceClient
from traice.server import ServerThread


def _traice(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "traice", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _record_a_run(url: str) -> None:
    with TraiceClient(url, run="cli-run", node_id="w1") as client:
        client.update(1, 0.5, 1.0)
        client.update(2, 0.7, 0.6)


def test_help_explains_every_command() -> None:
    top = _traice("--help")

    assert top.returncode == 0
    for command in ("server", "demo", "runs", "export"):
        assert command in top.stdout
        sub = _traice(command, "--help")
        assert sub.returncode == 0 and "Usage" in sub.stdout
    assert "--database-url" in _traice("server", "--help").stdout
    assert "--no-browser" in _traice("demo", "--help").stdout


def test_runs_as_json_and_table(server: ServerThread) -> None:
    _record_a_run(server.url)

    as_json = _traice("runs", "--server", server.url, "--format", "json")
    as_table = _traice("runs", "--server", server.url)

    assert as_json.returncode == 0
    (run,) = json.loads(as_json.stdout)
    assert (run["name"], run["rounds"]) == ("cli-run", 2)
    assert "cli-run" in as_table.stdout


def test_export_writes_csv_files(server: ServerThread, tmp_path: Path) -> None:
    _record_a_run(server.url)

    done = _traice("export", "cli-run", "--server", server.url, "--out", str(tmp_path / "out"))

    assert done.returncode == 0, done.stderr
    with open(tmp_path / "out" / "run-1-rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["1", "2"]
    assert (tmp_path / "out" / "run-1-clients.csv").exists() and (tmp_path / "out" / "run-1-samples.csv").exists()


def test_errors_are_clear(server: ServerThread) -> None:
    unknown_run = _traice("export", "no-such-run", "--server", server.url)
    no_server = _traice("runs", "--server", "http://127.0.0.1:9")

    assert unknown_run.returncode == 1 and "no run 'no-such-run'" in unknown_run.stderr
    assert no_server.returncode == 2 and "cannot reach the TRAICE server" in no_server.stderr


def test_pause_resume_stop_from_the_command_line(server: ServerThread) -> None:
    client = TraiceClient(server.url, run="cli-control", node_id="w1").start()
    client.update(1, 0.5)
    assert client.flush(10)

    paused = _traice("pause", "cli-control", "--server", server.url, "--wait", "10")
    again = _traice("pause", "cli-control", "--server", server.url)
    resumed = _traice("resume", "cli-control", "--server", server.url, "--wait", "10")
    excluded = _traice("exclude", "cli-control", "w1", "--server", server.url, "--wait", "10")
    stopped = _traice("stop", "cli-control", "--server", server.url, "--wait", "10")
    client.stop()

    assert paused.returncode == 0 and "pause run cli-control" in paused.stdout and "done" in paused.stdout
    assert again.returncode == 1 and "already_paused" in again.stderr
    assert resumed.returncode == 0 and "done" in resumed.stdout
    assert excluded.returncode == 0 and "client w1" in excluded.stdout
    assert stopped.returncode == 0 and client.should_stop
