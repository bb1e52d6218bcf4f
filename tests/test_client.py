"""The worker library against a real server: original API, newer forms, outages, delivery."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from pathlib import Path

import httpx
import pytest

from traice import TraiceClient
from traice.server import ServerThread, create_app
from traice.transport import Transport, worker_socket_url


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(i * i for i in range(1000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _runs(url: str) -> list[dict]:  # type: ignore[type-arg]
    return httpx.get(f"{url}/api/runs", timeout=30).json()  # type: ignore[no-any-return]


def test_a_worker_using_only_the_original_api_is_recorded_with_every_epoch(server: ServerThread) -> None:
    client = TraiceClient(server.url)  # positional URL, as in the original TRAICE
    client.start()
    reported = []
    for epoch in range(1, 6):
        _busy(0.05)
        reported.append(client.update(epoch, 0.5 + epoch / 20, 1.0 / epoch))
    _busy(0.05)  # energy after the last update: stop() must report it too
    delivered = client.stop()

    (run,) = _runs(server.url)
    rounds = httpx.get(f"{server.url}/api/runs/{run['id']}/rounds").json()
    (worker,) = httpx.get(f"{server.url}/api/runs/{run['id']}/clients").json()
    assert delivered
    assert run["name"] == "default" and run["status"] == "finished"
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert [r["accuracy"] for r in rounds] == pytest.approx([0.55, 0.6, 0.65, 0.7, 0.75])
    assert [r["loss"] for r in rounds] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert all(r["energy_kwh"] > 0 for r in rounds)
    # Nothing measured is dropped: the stored total is every update plus the tail since the last one.
    assert run["energy_kwh"] > sum(r.energy_kwh for r in reported)
    assert run["emissions_kg"] == pytest.approx(run["energy_kwh"] * worker["intensity_g_per_kwh"] / 1000)
    assert worker["hardware"]["cpu_power_method"]  # how codecarbon measured (here: estimated from load)


def test_round_context_and_with_forms(server: ServerThread) -> None:
    with TraiceClient(server.url, run="forms", node_id="w7", country_iso_code="DEU") as client:
        for number in (1, 2):
            with client.round(number) as r:
                _busy(0.05)
                r.report(accuracy=0.8, loss=0.3, num_examples=120, bytes_up=1000, bytes_down=2000, metrics={"lr": 0.1})

    (run,) = _runs(server.url)
    rounds = httpx.get(f"{server.url}/api/runs/{run['id']}/rounds").json()
    (worker,) = httpx.get(f"{server.url}/api/runs/{run['id']}/clients").json()
    assert run["name"] == "forms" and run["status"] == "finished"
    assert [(r["round"], r["num_examples"], r["bytes_up"], r["bytes_down"]) for r in rounds] == [
        (1, 120, 1000, 2000),
        (2, 120, 1000, 2000),
    ]
    assert worker["node_id"] == "w7"
    assert (worker["country_iso_code"], worker["intensity_g_per_kwh"]) == ("DEU", pytest.approx(381.0, abs=1))


def test_server_down_at_start_then_up_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()
    client = TraiceClient(f"http://127.0.0.1:{port}", run="late-server", node_id="w1", flush_timeout_s=20)
    caplog.set_level(logging.WARNING, logger="traice")
    client.start()
    for epoch in (1, 2, 3):
        client.update(epoch, accuracy=0.1 * epoch)  # training goes on without a server
        time.sleep(0.3)
    assert not client.connected

    with ServerThread(create_app(database_url=f"sqlite:///{tmp_path / 'late.db'}"), port=port) as server:
        delivered = client.stop()
        (run,) = _runs(server.url)
        rounds = httpx.get(f"{server.url}/api/runs/{run['id']}/rounds").json()

    assert delivered
    assert [r["round"] for r in rounds] == [1, 2, 3]
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # one clear warning, not a log storm


def test_server_going_away_mid_run_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'restart.db'}"
    first = ServerThread(create_app(database_url=database_url)).start()
    port = first.port
    client = TraiceClient(first.url, run="restart", node_id="w1", flush_timeout_s=20)
    client.start()
    reported = [client.update(1, 0.1), client.update(2, 0.2)]
    assert client.flush(10)
    first.stop()  # the server goes away mid-run

    reported += [client.update(3, 0.3), client.update(4, 0.4)]  # queued while it is away
    with ServerThread(create_app(database_url=database_url), port=port) as second:
        reported.append(client.update(5, 0.5))
        assert client.flush(20)
        (run,) = _runs(second.url)
        rounds = httpx.get(f"{second.url}/api/runs/{run['id']}/rounds").json()
        client.stop()

    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert [r["energy_kwh"] for r in rounds] == pytest.approx([r.energy_kwh for r in reported])


def test_reports_sent_during_an_outage_do_not_cut_the_backoff_short() -> None:
    """A server that comes back must not meet one reconnect per queued report from every worker."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    attempts: list[float] = []

    def refuse_all() -> None:  # accepts each TCP connection and closes it: every handshake fails
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                attempts.append(time.monotonic())
                conn.close()

    threading.Thread(target=refuse_all, daemon=True).start()
    port = listener.getsockname()[1]
    transport = Transport(worker_socket_url(f"http://127.0.0.1:{port}"), lambda: None)  # type: ignore[arg-type,return-value]
    transport.start()
    try:
        began = time.monotonic()
        for i in range(200):  # a worker that keeps reporting through the outage, for 2 s
            transport.send({"type": "sample", "t": float(i)})
            time.sleep(0.01)
        window_s = time.monotonic() - began
    finally:
        transport.close(timeout_s=0)
        listener.close()
    # Backoff from 0.25 s, doubling, with 0.5-1.5x jitter: at most 6 attempts in ~2 s, not 200.
    assert 1 <= len(attempts) <= 6, (len(attempts), window_s)


def test_a_full_outbox_drops_live_samples_before_round_reports() -> None:
    transport = Transport("ws://127.0.0.1:9/ws/worker", lambda: None, outbox_max=4)  # type: ignore[arg-type,return-value]
    transport.send({"type": "round", "round": 1})
    for i in range(3):
        transport.send({"type": "sample", "t": float(i)})
    transport.send({"type": "round", "round": 2})
    transport.send({"type": "round", "round": 3})

    kept = [m["type"] for m in transport._pending.values()]

    assert transport.pending() == 4
    assert kept == ["round", "sample", "round", "round"]


def test_non_finite_accuracy_is_reported_as_missing(server: ServerThread) -> None:
    client = TraiceClient(server.url, run="nan", node_id="w1").start()

    report = client.update(1, float("nan"), float("inf"))
    client.stop()

    (run,) = _runs(server.url)
    (stored,) = httpx.get(f"{server.url}/api/runs/{run['id']}/rounds").json()
    assert (report.accuracy, report.loss) == (None, None)
    assert stored["round"] == 1 and stored["accuracy"] is None


def test_an_unknown_country_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="unknown country"):
        TraiceClient("localhost", country_iso_code="XXX")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://localhost:3000", "ws://localhost:3000/ws/worker"),
        ("https://traice.example.org", "wss://traice.example.org/ws/worker"),
        ("ws://10.0.0.5:8080/", "ws://10.0.0.5:8080/ws/worker"),
        ("wss://h:443/prefix", "wss://h:443/prefix/ws/worker"),
        ("localhost", "ws://localhost:3000/ws/worker"),
        ("gpu-node-7", "ws://gpu-node-7:3000/ws/worker"),
        ("192.168.1.20:3001", "ws://192.168.1.20:3001/ws/worker"),
        ("[::1]:3000", "ws://[::1]:3000/ws/worker"),
        ("http://h:3000/ws/worker", "ws://h:3000/ws/worker"),
    ],
)
def test_server_urls_people_write(given: str, expected: str) -> None:
    assert worker_socket_url(given) == expected


@pytest.mark.parametrize("bad", ["", "ftp://h", "http://"])
def test_unusable_server_urls_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        worker_socket_url(bad)
