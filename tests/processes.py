"""Real processes for tests: the server and the demo's Flower training, started and ended as a person would."""

from __future__ import annotations

import contextlib
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


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process's whole group (each child here leads its own) and reap it."""
    if process.poll() is not None:
        return  # reaped: its pid, and so its group id, may belong to someone else by now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spawn_server(args: list[str], log: Path, env: dict[str, str] | None = None,
                 port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``traice server`` on 127.0.0.1 in its own process group; returns it and its URL at once.

    The developer's own ``TRAICE_*`` settings are not passed on: a test says what it runs.
    """
    port = port or free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TRAICE_")}
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "traice", "server", "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env={**inherited, **(env or {})}, start_new_session=True,
        )
    return process, f"http://127.0.0.1:{port}"


def wait_answers(process: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 60.0) -> None:
    """Wait until a spawned server answers ``/healthz`` with 200; fail with its log if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"traice server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    kill_group(process)
    raise RuntimeError(f"traice server did not answer within {timeout_s} s:\n{log.read_text()}")


def start_server(
    args: list[str], log: Path, env: dict[str, str] | None = None, port: int | None = None, timeout_s: float = 60.0
) -> tuple[subprocess.Popen[bytes], str]:
    """``traice server`` on 127.0.0.1 in its own process group; returns it and its URL once it answers."""
    process, url = spawn_server(args, log, env, port)
    wait_answers(process, url, log, timeout_s)
    return process, url
