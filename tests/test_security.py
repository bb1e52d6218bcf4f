"""Nobody unauthorised, and no peer costs more than its limits: against real `traice server` processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from processes import free_port, kill_group, start_server
from traice import TraiceClient
from traice.measure import Reading
from wire import dial, events_of, hello, recv_json, round_msg

ADMIN = "admin-6f1c0e5b9d2a4e8c"
WORKER = "worker-3b7d9f1a2c4e6a8b"
SCOPED = "scoped-9e8d7c6b5a4f3e2d"  # may report for run "alpha" as node "n1" only


def _ws(url: str, path: str, token: str | None = None) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return dial(url.replace("http://", "ws://") + path, additional_headers=headers, max_size=None)


def _refused(ws: ClientConnection) -> tuple[str, int]:
    """The refusal's code and the close code. The server sends an ``error`` frame, then closes with
    the same code as the reason; a client that is still sending may see only the close."""
    frames = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            frames.append(recv_json(ws))
    assert closed.value.rcvd is not None, "closed without a close frame"
    errors = [f["code"] for f in frames if f["type"] == "error"]
    assert errors in ([], [closed.value.rcvd.reason]), frames
    return closed.value.rcvd.reason, closed.value.rcvd.code


def _worker(url: str, token: str | None, **fields: Any) -> tuple[ClientConnection, dict[str, Any]]:
    ws = _ws(url, "/ws/worker", token)
    ws.send(json.dumps(hello(**fields)))
    return ws, recv_json(ws)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A server with an admin token, a deployment-wide worker token and a scoped one; and its log."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps([{"token": SCOPED, "run": "alpha", "nodes": ["n1"]}]))
    log = tmp_path / "server.log"
    process, url = start_server(
        ["--database-url", f"sqlite:///{tmp_path / 't.db'}", "--tokens-file", str(tokens), "--log-level", "info"],
        log, env={"TRAICE_ADMIN_TOKEN": ADMIN, "TRAICE_WORKER_TOKEN": WORKER},
    )
    try:
        yield url, log
    finally:
        kill_group(process)


@pytest.mark.parametrize(
    ("args", "missing"),
    [([], "--admin-token and --worker-token"), (["--admin-token", ADMIN], "--worker-token or --tokens-file")],
)
def test_a_server_beyond_loopback_without_tokens_refuses_to_start(args: list[str], missing: str) -> None:
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "traice", "server", "--host", "0.0.0.0", "--port", str(port), *args],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, said
    assert "refusing to listen on 0.0.0.0" in said and missing in said
    assert "anyone who can reach this port" in said
    assert ADMIN not in said  # not even the one it was given


def test_rest_and_control_need_the_admin_token(secured: tuple[str, Path]) -> None:
    url, _ = secured
    ws, ack = _worker(url, WORKER, run="beta", node_id="w1")
    ws.close()
    control = f"{url}/api/runs/{ack['run_id']}/control"
    for token in (None, WORKER, SCOPED, ADMIN + "x", ADMIN[:-1]):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        listed = httpx.get(f"{url}/api/runs", headers=headers)
        assert listed.status_code == 401 and listed.json()["error"]["code"] == "unauthorized"
        ordered = httpx.post(control, json={"action": "stop"}, headers=headers)  # a worker cannot issue commands
        assert ordered.status_code == 401 and ordered.json()["error"]["code"] == "unauthorized"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert [r["name"] for r in httpx.get(f"{url}/api/runs", headers=admin).json()] == ["beta"]
    assert httpx.get(f"{url}/api/runs/{ack['run_id']}", headers=admin).json()["status"] == "running"  # not stopped
    assert httpx.post(control, json={"action": "pause"}, headers=admin).status_code == 202
    assert httpx.get(f"{url}/healthz").status_code == 200  # liveness stays open to probes


def test_the_dashboard_signs_in_with_the_admin_token(secured: tuple[str, Path]) -> None:
    url, _ = secured
    assert _refused(_ws(url, "/ws/dashboard")) == ("unauthorized", 1008)
    assert _refused(_ws(url, "/ws/dashboard", WORKER)) == ("unauthorized", 1008)
    with httpx.Client(base_url=url) as browser:
        wrong = browser.post("/login", data={"token": WORKER})
        assert wrong.status_code == 401 and "not the admin token" in wrong.text and WORKER not in wrong.text
        signed_in = browser.post("/login", data={"token": ADMIN})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"
        cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/api/runs").status_code == 200  # the cookie is enough
        live = dial(url.replace("http://", "ws://") + "/ws/dashboard",
                    additional_headers={"Cookie": f"traice_admin={browser.cookies['traice_admin']}"})
        worker, ack = _worker(url, WORKER, run="gamma", node_id="w1")
        worker.send(json.dumps(round_msg(1, 1)))
        assert recv_json(worker) == {"type": "ack", "seq": 1}
        kinds = set()
        while "round" not in kinds:
            kinds.update(e["type"] for e in events_of(recv_json(live)))
        live.close()
        worker.close()


def test_a_worker_reports_only_for_what_its_token_allows(secured: tuple[str, Path]) -> None:
    url, _ = secured
    for token in (None, "not-a-token", ADMIN[:-1]):
        assert _refused(_ws(url, "/ws/worker", token)) == ("unauthorized", 1008)
    ws, ack = _worker(url, SCOPED, run="alpha", node_id="n1")
    assert ack["type"] == "ack"
    ws.send(json.dumps(round_msg(1, 1)))
    assert recv_json(ws) == {"type": "ack", "seq": 1}
    ws.close()
    other, beta = _worker(url, WORKER, run="beta", node_id="w9")
    other.close()
    for fields, code in [
        ({"run": "beta", "node_id": "n1"}, "forbidden"),  # another run
        ({"run": "alpha", "node_id": "n2"}, "forbidden"),  # another node
        ({"run": "alpha", "node_id": "n1", "run_id": beta["run_id"]}, "run_mismatch"),  # another run, by id
    ]:
        ws = _ws(url, "/ws/worker", SCOPED)
        ws.send(json.dumps(hello(**fields)))
        assert _refused(ws) == (code, 1008), fields
    # The deployment-wide token and the library: reports arrive through TraiceClient(token=...).
    with TraiceClient(url, run="beta", node_id="w2", token=WORKER, live_samples=False) as client:
        client.update(1, accuracy=0.5)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    runs = {r["name"]: r for r in httpx.get(f"{url}/api/runs", headers=admin).json()}
    assert set(runs) == {"alpha", "beta"}  # nothing was created for the refused hellos
    clients = httpx.get(f"{url}/api/runs/{runs['alpha']['id']}/clients", headers=admin).json()
    assert [c["node_id"] for c in clients] == ["n1"]
    beta_clients = httpx.get(f"{url}/api/runs/{runs['beta']['id']}/clients", headers=admin).json()
    assert sorted(c["node_id"] for c in beta_clients) == ["w2", "w9"]


def test_tokens_are_never_logged_or_echoed(secured: tuple[str, Path]) -> None:
    url, log = secured
    answers = []
    for token in (WORKER, SCOPED, ADMIN, ADMIN + "x"):
        answers.append(httpx.get(f"{url}/api/runs", headers={"Authorization": f"Bearer {token}"}).text)
        answers.append(httpx.post(f"{url}/login", data={"token": token}).text)
        ws = _ws(url, "/ws/worker", token)
        try:
            ws.send(json.dumps(hello(run="alpha", node_id="n2")))
        except ConnectionClosed:
            pass  # a wrong token is refused before the hello: its error is read below
        answers.append(str(ws.recv(timeout=10)))
        ws.close()
    said = "\n".join(answers)
    deadline = time.monotonic() + 10
    while said.count("GET /api/runs") < 4 and time.monotonic() < deadline:  # the log reaches its file
        said = "\n".join(answers) + log.read_text()
        time.sleep(0.1)
    assert said.count("GET /api/runs") >= 4  # the log is there, with the requests that carried tokens
    for token in (ADMIN, WORKER, SCOPED):
        assert token not in said


def _admitted(url: str) -> ClientConnection:
    """A dashboard socket, once the server has a free slot for this address (bounded wait)."""
    deadline = time.monotonic() + 10
    while True:
        ws = _ws(url, "/ws/dashboard")
        try:
            ws.recv(timeout=0.2)  # a refusal arrives at once; an admitted dashboard hears nothing yet
        except TimeoutError:
            return ws
        except ConnectionClosed:
            pass
        ws.close()
        assert time.monotonic() < deadline, "no slot freed within 10 s"
        time.sleep(0.1)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[str]:
    process, url = start_server(
        ["--database-url", f"sqlite:///{tmp_path / 't.db'}", "--max-frame-bytes", "4096",
         "--max-messages-per-s", "20", "--burst-messages", "10", "--max-connections-per-address", "3"],
        tmp_path / "server.log",
    )
    try:
        yield url
    finally:
        kill_group(process)


def test_limits_refuse_with_clear_errors(limited: str) -> None:
    url = limited
    # Connections per address: the fourth socket is turned away, and a slot frees when one closes.
    sockets = [_ws(url, "/ws/dashboard") for _ in range(3)]
    code, close = _refused(_ws(url, "/ws/dashboard"))
    assert (code, close) == ("too_many_connections", 1013)
    sockets.pop().close()
    sockets.append(_admitted(url))  # once the server has seen the close
    for ws in sockets:
        ws.close()
    _admitted(url).close()

    # Frame size: a frame over 4 KiB closes the socket with 1009 (message too big).
    ws, _ = _worker(url, None, run="limits", node_id="big")
    ws.send(json.dumps(round_msg(1, 1, metrics={"blob": "x" * 900, **{f"k{i}": "y" * 900 for i in range(5)}})))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    # Messages per second: a burst over the bucket is refused, the socket closed, and nothing
    # after the refused frame stored, so the worker's resend cannot double anything.
    ws, ack = _worker(url, None, run="limits", node_id="fast")
    for seq in range(1, 41):
        try:
            ws.send(json.dumps(round_msg(seq, seq)))
        except ConnectionClosed:
            break
    frames = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            frames.append(recv_json(ws))
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "rate_limited")
    for refusal in [f for f in frames if f["type"] == "error"]:
        assert refusal["code"] == "rate_limited" and "messages/s" in refusal["message"]
    acked = max([f["seq"] for f in frames if f["type"] == "ack"], default=0)
    stored = sorted(r["round"] for r in httpx.get(f"{url}/api/runs/{ack['run_id']}/rounds").json())
    # What was stored is what came before the refusal: acks may be cut short by the close, never the reverse.
    assert acked <= len(stored) < 40 and len(stored) >= 10  # the burst got in
    assert stored == list(range(1, len(stored) + 1))


def test_a_rate_limited_worker_loses_nothing(limited: str) -> None:
    # 40 reports at once (measured elsewhere, as the Flower mod does) against 20/s in bursts of 10:
    # the library backs off and resends until all are in.
    with TraiceClient(limited, run="patient", node_id="w1", live_samples=False, flush_timeout_s=60) as client:
        for number in range(1, 41):
            client.report_interval(number, "round", Reading(1.0, 1e-6, 0.0, 1e-7))
    run = next(r for r in httpx.get(f"{limited}/api/runs").json() if r["name"] == "patient")
    rounds = httpx.get(f"{limited}/api/runs/{run['id']}/rounds").json()
    assert [r["round"] for r in rounds] == list(range(1, 41))
    assert client._transport.pending() == 0
    assert any(e.code == "rate_limited" for e in client._transport.errors)
