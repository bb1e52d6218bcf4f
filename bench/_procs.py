"""Processes for the benchmarks: a TRAICE server of their own, and process groups ended for good."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_group(process: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """SIGKILL a process started with ``start_new_session=True`` and whatever it started (Ray's helpers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def traice_server(database_url: str, log: Path, env: dict[str, str]) -> Iterator[str]:
    """``traice server`` on a free loopback port, until the block ends; yields its URL once it answers."""
    port = free_port()
    with log.open("wb") as err:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen(
            [sys.executable, "-m", "traice", "server", "--host", "127.0.0.1", "--port", str(port),
             "--database-url", database_url, "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception), urllib.request.urlopen(url + "/healthz", timeout=2):
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"TRAICE server did not start; see {log}")
            time.sleep(0.2)
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # a clean stop: the writer commits what it holds
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(15)
        kill_group(server)
