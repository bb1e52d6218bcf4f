"""Real processes for tests: the demo's Flower training, started and ended as a person would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from traice.server import ServerThread


def start_demo(server: ServerThread, run: str, rounds: int, log: Path) -> subprocess.Popen[bytes]:
    """``traice demo`` reporting to ``server``, in its own process group."""
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "traice", "demo", "--server", server.url, "--rounds", str(rounds), "--run", run,
             "--no-browser", "--no-serve"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
            start_new_session=True,
        )


def end_demo(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
