"""Real processes for tests: the server and the demo's Flower training, started and ended as a person would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(
    args: list[str], log: Path, env: dict[str, str] | None = None, port: int | None = None, timeout_s: float = 60.0
) -> tuple[subprocess.Popen[bytes], str]:
    """``traice server`` on 127.0.0.1 in its own process group; returns it and its URL once it answers."""
    port = port or free_port()
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "traice", "server", "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"traice server exited with {process.returncode}:\n{log.read_text()}")
        try:
            httpx.get(f"{url}/healthz", timeout=1.0)
            return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    end_demo(process)
    raise RuntimeError(f"traice server did not answer within {timeout_s} s:\n{log.read_text()}")
