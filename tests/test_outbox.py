"""A worker's outbox on disk: reports survive the worker being killed and are sent after its restart."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from processes import free_port, kill_group, start_server
from traice.outbox import DiskOutbox, OutboxInUse

WORKER = textwrap.dedent(
    """
    import sys, time
    from traice import TraiceClient
    url, outbox, first, last, then = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    client = TraiceClient(url, run="crash", node_id="w1", outbox_path=outbox, live_samples=False,
                          flush_timeout_s=60).start()
    for number in range(first, last + 1):
        client.update(number, accuracy=number / 100)
    if then == "hang":  # to be killed: nothing after this line runs
        print("reported", flush=True)
        time.sleep(600)
    print("delivered" if client.stop() else "not delivered", flush=True)
    """
)


def _worker(url: str, outbox: Path, first: int, last: int, then: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, str(outbox), str(first), str(last), then],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def test_reports_outlive_a_killed_worker(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    outbox = tmp_path / "outbox.db"

    # The server is not there yet: five rounds wait in the outbox; then the worker is killed.
    first = _worker(url, outbox, 1, 5, "hang")
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "reported", first.stderr.read() if first.stderr else ""
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)  # reaps it and closes its pipes
    with sqlite3.connect(outbox) as db:
        kept = [seq for (seq,) in db.execute("SELECT seq FROM messages ORDER BY seq")]
    assert len(kept) == 5  # on disk, not in a dead process's memory

    server, url = start_server(["--database-url", f"sqlite:///{tmp_path / 't.db'}"], tmp_path / "server.log", port=port)
    try:
        # The restarted worker sends the dead one's rounds (under its session), then its own.
        second = _worker(url, outbox, 6, 8, "stop")
        out, err = second.communicate(timeout=120)
        assert out.strip() == "delivered", err
        (run,) = httpx.get(f"{url}/api/runs").json()
        per_client = httpx.get(f"{url}/api/runs/{run['id']}/rounds/clients").json()
    finally:
        kill_group(server)

    assert sorted(r["round"] for r in per_client) == list(range(1, 9))  # each round once, none lost
    assert {r["node_id"] for r in per_client} == {"w1"}
    with sqlite3.connect(outbox) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM sessions").fetchone() == (1,)  # only the last worker's


def test_one_outbox_file_serves_one_worker(tmp_path: Path) -> None:
    outbox = DiskOutbox(tmp_path / "outbox.db")
    try:
        with pytest.raises(OutboxInUse, match="in use by another process"):
            DiskOutbox(tmp_path / "outbox.db")
    finally:
        outbox.close()
    DiskOutbox(tmp_path / "outbox.db").close()  # free again once closed
