"""The server over real sockets: worker protocol, bad input, dashboard stream, REST and exports."""

from __future__ import annotations

import csv
import io
import json
import threading

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from wire import dashboard_events, dial, hello, open_worker, recv_json, round_msg, ws_url

from traice.server import ServerThread


def _send_rounds(server: ServerThread, run: str, node: str, rounds: list[int]) -> int:
    ws, ack = open_worker(server, run=run, node_id=node)
    for i, number in enumerate(rounds, start=1):
        ws.send(json.dumps(round_msg(i, number, accuracy=0.1 * number, num_examples=10)))
    last = {}
    while last.get("seq") != len(rounds):
        last = recv_json(ws)
        assert last["type"] == "ack", last
    ws.close()
    return int(ack["run_id"])


def test_hello_is_acknowledged_with_the_run_id(server: ServerThread, api: httpx.Client) -> None:
    ws, ack = open_worker(server, run="exp-1", node_id="w1")
    ws.close()

    assert ack == {"type": "ack", "seq": 0, "run_id": 1}
    assert api.get("/api/runs/1").json()["name"] == "exp-1"


def test_reports_are_acknowledged_and_stored(server: ServerThread, api: httpx.Client) -> None:
    run_id = _send_rounds(server, "exp", "w1", [1, 2, 3])

    rounds = api.get(f"/api/runs/{run_id}/rounds").json()

    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["accuracy"] for r in rounds] == pytest.approx([0.1, 0.2, 0.3])


def test_several_runs_at_once(server: ServerThread, api: httpx.Client) -> None:
    results: dict[str, int] = {}

    def worker(run: str, node: str) -> None:
        results[f"{run}/{node}"] = _send_rounds(server, run, node, [1, 2])

    threads = [threading.Thread(target=worker, args=(r, n)) for r in ("a", "b") for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    runs = {r["name"]: r for r in api.get("/api/runs").json()}
    assert set(runs) == {"a", "b"}
    assert runs["a"]["clients"] == runs["b"]["clients"] == 2
    assert runs["a"]["energy_kwh"] == pytest.approx(0.004)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        (json.dumps({"type": "teleport", "seq": 5}), "unknown_type"),
        (json.dumps(round_msg(5, "three")), "invalid_message"),  # wrong field type
        (json.dumps({**round_msg(5, 1), "duration_s": "long"}), "invalid_message"),
        ('{"type":"round","seq":5,"round":1,"duration_s":1,"energy_kwh":NaN,"emissions_kg":0}', "invalid_message"),
        (json.dumps(round_msg(5, 1, energy_kwh=-0.5)), "invalid_message"),  # negative energy
        (json.dumps({**round_msg(5, 1), "emissions_kg": -1}), "invalid_message"),
        (json.dumps(round_msg(5, 1, energy_kwh=1e308)), "invalid_message"),  # finite, but would overflow sums
        (json.dumps({"type": "sample", "seq": 5, "t": 1.0, "cpu_w": 1e300}), "invalid_message"),
        (json.dumps({**round_msg(5, 1), "cpu_energy_kwh": 0.5}), "invalid_message"),  # parts do not add up
        (json.dumps({**round_msg(5, 1), "surprise": 1}), "invalid_message"),  # unknown field
        (json.dumps({"type": "sample", "seq": 5, "t": 1.0, "cpu_w": float("inf")}).replace("Infinity", "1e999"),
         "invalid_message"),
        (json.dumps(hello()), "duplicate_hello"),
    ],
)
def test_a_bad_frame_gets_an_error_and_the_socket_goes_on(
    server: ServerThread, api: httpx.Client, frame: str, code: str
) -> None:
    ws, ack = open_worker(server, run="bad", node_id="w1")

    ws.send(frame)
    error = recv_json(ws)
    ws.send(json.dumps(round_msg(6, 1)))  # the same socket still works
    after = recv_json(ws)
    ws.close()

    assert error["type"] == "error" and error["code"] == code, error
    assert error["message"]
    assert after == {"type": "ack", "seq": 6}
    rounds = api.get(f"/api/runs/{ack['run_id']}/rounds").json()
    assert [(r["round"], r["energy_kwh"]) for r in rounds] == [(1, pytest.approx(0.001))]  # nothing half-valid


def test_a_frame_over_one_mebibyte_closes_the_socket_with_1009(server: ServerThread, api: httpx.Client) -> None:
    ws, ack = open_worker(server, run="big", node_id="w1")

    ws.send(json.dumps(round_msg(1, 1, metrics={"blob": "x" * 999}) | {"pad": "y" * (1024 * 1024)}))
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=10)

    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert api.get(f"/api/runs/{ack['run_id']}/rounds").json() == []


def test_a_round_before_hello_is_refused_with_1008(server: ServerThread) -> None:
    ws = dial(ws_url(server))

    ws.send(json.dumps(round_msg(1, 1)))
    error = recv_json(ws)
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)

    assert error["code"] == "hello_required"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_a_round_for_an_unknown_run_is_refused(server: ServerThread, api: httpx.Client) -> None:
    ws = dial(ws_url(server))

    ws.send(json.dumps(hello(run_id=999)))
    error = recv_json(ws)
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)

    assert error["code"] == "unknown_run"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert api.get("/api/runs").json() == []


def test_an_unsupported_protocol_version_is_refused(server: ServerThread) -> None:
    ws = dial(ws_url(server))

    ws.send(json.dumps(hello(protocol=99)))

    assert recv_json(ws)["code"] == "unsupported_protocol"
    ws.close()


def test_a_hostile_worker_does_not_disturb_a_good_one(server: ServerThread, api: httpx.Client) -> None:
    bad, _ = open_worker(server, run="shared", node_id="bad")
    good, ack = open_worker(server, run="shared", node_id="good")

    for i in range(1, 51):
        bad.send("{garbage" if i % 2 else json.dumps({"type": "round", "seq": i, "round": -1}))
        good.send(json.dumps(round_msg(i, i)))
    acked = 0
    while acked < 50:
        acked = recv_json(good)["seq"]
    errors = [recv_json(bad) for _ in range(50)]
    bad.close()
    good.close()

    assert all(e["type"] == "error" for e in errors)
    clients = {c["node_id"]: c for c in api.get(f"/api/runs/{ack['run_id']}/clients").json()}
    assert clients["good"]["rounds"] == 50
    assert clients["bad"]["rounds"] == 0


# --------------------------------------------------------------------------- dashboard stream


def test_the_dashboard_socket_streams_what_is_stored(server: ServerThread) -> None:
    dashboard = dial(ws_url(server, "/ws/dashboard"))
    ws, ack = open_worker(server, run="live", node_id="w1")

    ws.send(json.dumps(round_msg(1, 4, accuracy=0.5)))
    ws.send(json.dumps({"type": "sample", "seq": 2, "t": 1.7e9, "cpu_w": 12.5, "ram_w": 3}))
    events = dashboard_events(dashboard, 4)  # run, client, round, sample
    ws.close()
    dashboard.close()

    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["run", "client"]
    by_kind = {e["type"]: e for e in events}
    assert by_kind["round"]["run_id"] == ack["run_id"]
    assert by_kind["round"]["data"]["round"] == 4 and by_kind["round"]["data"]["node_id"] == "w1"
    assert by_kind["sample"]["data"]["power_w"] == pytest.approx(15.5)


# --------------------------------------------------------------------------- REST


def test_rest_errors_are_json_with_a_code(api: httpx.Client) -> None:
    missing = api.get("/api/runs/77")
    invalid = api.get("/api/runs/seven")
    bad_limit = api.get("/api/runs/1/samples?limit=0")
    nowhere = api.get("/api/nothing-here")

    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "run_not_found")
    assert (invalid.status_code, invalid.json()["error"]["code"]) == (422, "invalid_request")
    assert (bad_limit.status_code, bad_limit.json()["error"]["code"]) == (422, "invalid_request")
    assert (nowhere.status_code, nowhere.json()["error"]["code"]) == (404, "not_found")
    for table in ("rounds", "clients", "samples"):
        for suffix in ("", ".csv", ".json"):
            response = api.get(f"/api/runs/77/{table}{suffix}")
            assert response.status_code == 404 and response.json()["error"]["code"] == "run_not_found"


def test_exports_as_csv_and_json(server: ServerThread, api: httpx.Client) -> None:
    run_id = _send_rounds(server, "export", "w1", [1, 2])

    as_csv = api.get(f"/api/runs/{run_id}/rounds.csv")
    as_json = api.get(f"/api/runs/{run_id}/rounds.json")
    clients_csv = api.get(f"/api/runs/{run_id}/clients.csv")

    assert as_csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in as_csv.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert float(rows[1]["energy_kwh"]) == pytest.approx(0.001)
    assert [r["round"] for r in as_json.json()] == [1, 2]
    (client,) = csv.DictReader(io.StringIO(clients_csv.text))
    assert client["node_id"] == "w1" and client["country_iso_code"] == "FRA"


def test_openapi_lists_the_api(api: httpx.Client) -> None:
    paths = api.get("/openapi.json").json()["paths"]

    for path in ("/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/rounds", "/api/runs/{run_id}/clients",
                 "/api/runs/{run_id}/samples", "/api/runs/{run_id}/rounds.csv", "/healthz"):
        assert path in paths
    assert api.get("/docs").status_code == 200
    # Every API operation declares the refusals any of them can give: no token, database away.
    operations = [op for path, item in paths.items() if path.startswith("/api/") for op in item.values()]
    assert operations and all({"401", "503"} <= set(op["responses"]) for op in operations)


def test_healthz_and_the_runs_page(api: httpx.Client) -> None:
    assert api.get("/healthz").json()["status"] == "ok"
    page = api.get("/")
    assert page.status_code == 200 and "TRAICE" in page.text
    assert api.get("/static/runs.js").status_code == 200


def test_a_report_resent_on_a_new_connection_is_stored_once(server: ServerThread, api: httpx.Client) -> None:
    session = "s" * 32
    first, ack = open_worker(server, run="resend", node_id="w1", session=session)
    first.send(json.dumps(round_msg(1, 1)))
    assert recv_json(first) == {"type": "ack", "seq": 1}
    first.close()  # as if the ack had been lost with the connection

    second, _ = open_worker(server, run="resend", node_id="w1", session=session, run_id=ack["run_id"])
    second.send(json.dumps(round_msg(1, 1)))
    second.send(json.dumps(round_msg(2, 2)))
    last = recv_json(second)
    while last["seq"] < 2:  # acks are cumulative and may be coalesced
        last = recv_json(second)
    second.close()

    rounds = api.get(f"/api/runs/{ack['run_id']}/rounds").json()
    assert [(r["round"], r["energy_kwh"]) for r in rounds] == [(1, pytest.approx(0.001)), (2, pytest.approx(0.001))]
    assert last == {"type": "ack", "seq": 2}
