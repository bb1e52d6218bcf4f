"""Run control over REST and sockets: the command state machine, workers obeying, alert rules."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from wire import dial, events_of, open_worker, recv_json, round_msg, ws_url

from traice import TraiceClient
from traice.server import ServerThread


def _wait(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _run_with_client(server: ServerThread, run: str = "ctl", node: str = "w1") -> int:
    ws, ack = open_worker(server, run=run, node_id=node)
    ws.close()
    return int(ack["run_id"])


def _control(api: httpx.Client, run_id: int, action: str) -> httpx.Response:
    return api.post(f"/api/runs/{run_id}/control", json={"action": action})


def test_pause_resume_stop_state_machine(server: ServerThread, api: httpx.Client) -> None:
    run_id = _run_with_client(server)

    paused = _control(api, run_id, "pause")
    assert paused.status_code == 202
    assert (paused.json()["action"], paused.json()["status"], paused.json()["source"]) == ("pause", "requested", "user")
    assert api.get(f"/api/runs/{run_id}").json()["status"] == "paused"

    resumed = _control(api, run_id, "resume")
    stopped = _control(api, run_id, "stop")

    assert (resumed.status_code, stopped.status_code) == (202, 202)
    assert api.get(f"/api/runs/{run_id}").json()["status"] == "stopping"
    actions = [c["action"] for c in api.get(f"/api/runs/{run_id}/commands").json()]
    assert actions == ["stop", "resume", "pause"]  # newest first


@pytest.mark.parametrize(
    ("setup", "action", "status", "code", "run_status"),
    [
        (["pause"], "pause", 409, "already_paused", "paused"),
        ([], "resume", 409, "not_paused", "running"),
        (["stop"], "pause", 409, "run_stopping", "stopping"),
        (["stop"], "stop", 409, "run_stopping", "stopping"),
        ([], "teleport", 422, "invalid_request", "running"),
    ],
)
def test_commands_that_make_no_sense_are_refused_with_nothing_changed(
    server: ServerThread, api: httpx.Client, setup: list[str], action: str, status: int, code: str, run_status: str
) -> None:
    run_id = _run_with_client(server)
    for earlier in setup:
        assert _control(api, run_id, earlier).status_code == 202
    before = api.get(f"/api/runs/{run_id}/commands").json()

    refused = _control(api, run_id, action)

    assert refused.status_code == status
    assert refused.json()["error"]["code"] == code
    assert api.get(f"/api/runs/{run_id}").json()["status"] == run_status
    assert api.get(f"/api/runs/{run_id}/commands").json() == before


def test_commands_for_unknown_or_finished_runs_are_refused(server: ServerThread, api: httpx.Client) -> None:
    with TraiceClient(server.url, run="done", node_id="w1") as client:
        client.update(1, 0.5)
    (finished,) = api.get("/api/runs").json()

    unknown = _control(api, 999, "pause")
    after_end = _control(api, finished["id"], "pause")
    extra_field = api.post(f"/api/runs/{finished['id']}/control", json={"action": "pause", "now": True})

    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "run_not_found")
    assert (after_end.status_code, after_end.json()["error"]["code"]) == (409, "run_finished")
    assert extra_field.status_code == 422
    assert api.get(f"/api/runs/{finished['id']}/commands").json() == []


def test_exclude_and_include_a_client(server: ServerThread, api: httpx.Client) -> None:
    run_id = _run_with_client(server, node="w1")
    url = f"/api/runs/{run_id}/clients"

    excluded = api.post(f"{url}/w1/control", json={"action": "exclude"})
    twice = api.post(f"{url}/w1/control", json={"action": "exclude"})
    status_while_excluded = api.get(url).json()[0]
    included = api.post(f"{url}/w1/control", json={"action": "include"})
    not_excluded = api.post(f"{url}/w1/control", json={"action": "include"})
    nobody = api.post(f"{url}/ghost/control", json={"action": "exclude"})
    wrong = api.post(f"{url}/w1/control", json={"action": "pause"})

    assert excluded.status_code == 202 and excluded.json()["node_id"] == "w1"
    assert (twice.status_code, twice.json()["error"]["code"]) == (409, "already_excluded")
    assert status_while_excluded["excluded"] is True and status_while_excluded["status"] == "excluded"
    assert included.status_code == 202 and api.get(url).json()[0]["excluded"] is False
    assert (not_excluded.status_code, not_excluded.json()["error"]["code"]) == (409, "not_excluded")
    assert (nobody.status_code, nobody.json()["error"]["code"]) == (404, "client_not_found")
    assert wrong.status_code == 422


def test_a_worker_obeys_pause_resume_and_stop_and_acknowledges(server: ServerThread, api: httpx.Client) -> None:
    heard: list[str] = []
    client = TraiceClient(server.url, run="obey", node_id="w1", on_command=lambda c: heard.append(c.action)).start()
    client.update(1, 0.5)
    run_id = _wait(lambda: client.run_id, what="run id")

    _control(api, run_id, "pause")
    _wait(lambda: client.paused, what="pause")
    waited = client.wait_if_paused(0.2)
    _wait(lambda: api.get(f"/api/runs/{run_id}/commands").json()[0]["status"] == "done", what="pause done")
    _control(api, run_id, "resume")
    _wait(lambda: not client.paused, what="resume")
    _control(api, run_id, "stop")
    _wait(lambda: client.should_stop, what="stop")
    client.stop()

    assert waited is False  # wait_if_paused held while paused
    assert heard == ["pause", "resume", "stop"]
    assert {c["status"] for c in api.get(f"/api/runs/{run_id}/commands").json()} == {"done"}
    assert api.get(f"/api/runs/{run_id}").json()["status"] == "stopped"


def test_a_worker_joining_a_paused_run_is_paused(server: ServerThread, api: httpx.Client) -> None:
    first = TraiceClient(server.url, run="late-join", node_id="w1").start()
    first.update(1, 0.5)
    run_id = _wait(lambda: first.run_id, what="run id")
    _control(api, run_id, "pause")

    late = TraiceClient(server.url, run="late-join", node_id="w2").start()

    _wait(lambda: late.paused, what="the joiner to be paused")
    assert late.run_id == run_id
    first.stop()
    late.stop()


def test_a_command_ack_for_an_unknown_command_is_refused(server: ServerThread) -> None:
    ws, _ = open_worker(server, run="acks", node_id="w1")

    ws.send(json.dumps({"type": "command_ack", "seq": 1, "command_id": 4242, "status": "done"}))
    error = recv_json(ws)
    ws.close()

    assert error == {"type": "error", "code": "unknown_command", "message": error["message"], "seq": 1}


def test_a_command_reaches_only_its_own_run(server: ServerThread, api: httpx.Client) -> None:
    target, ack = open_worker(server, run="target", node_id="w1")
    bystander, _ = open_worker(server, run="bystander", node_id="w1")

    _control(api, ack["run_id"], "pause")
    command = recv_json(target)

    assert command["type"] == "command" and command["action"] == "pause"
    with pytest.raises(TimeoutError):
        bystander.recv(timeout=0.5)
    target.close()
    bystander.close()


# --------------------------------------------------------------------------- alert rules


def test_an_emissions_rule_fires_once_alerts_and_pauses(server: ServerThread, api: httpx.Client) -> None:
    ws, ack = open_worker(server, run="budget", node_id="w1")
    run_id = ack["run_id"]
    dashboard = dial(ws_url(server, "/ws/dashboard"))
    rule = api.post(
        f"/api/runs/{run_id}/rules",
        json={"kind": "emissions_kg_over", "threshold": 0.0001, "level": "critical", "action": "pause"},
    )
    assert rule.status_code == 201 and rule.json()["fired_at"] is None

    ws.send(json.dumps(round_msg(1, 1, energy_kwh=0.001)))  # 0.056 g: under the budget
    assert recv_json(ws) == {"type": "ack", "seq": 1}
    ws.send(json.dumps(round_msg(2, 2, energy_kwh=0.01)))  # now 0.616 g: over 0.1 g
    frames = [recv_json(ws), recv_json(ws)]
    events = []
    while not any(e["type"] == "alert" for e in events):
        events.extend(events_of(recv_json(dashboard)))
    ws.send(json.dumps(round_msg(3, 3, energy_kwh=0.01)))
    recv_json(ws)

    commands = [f for f in frames if f["type"] == "command"]
    assert [c["action"] for c in commands] == ["pause"]
    (fired,) = api.get(f"/api/runs/{run_id}/rules").json()
    assert fired["fired_at"] is not None and fired["fired_value"] == pytest.approx(0.011 * 0.056)
    assert api.get(f"/api/runs/{run_id}").json()["status"] == "paused"
    (command,) = api.get(f"/api/runs/{run_id}/commands").json()
    assert command["source"] == f"rule:{fired['id']}"
    alert = next(e for e in events if e["type"] == "alert")
    assert alert["data"]["level"] == "critical"
    ws.close()
    dashboard.close()


def test_an_accuracy_plateau_rule_stops_the_run(server: ServerThread, api: httpx.Client) -> None:
    client = TraiceClient(server.url, run="plateau", node_id="w1").start()
    client.update(1, 0.50)
    run_id = _wait(lambda: client.run_id, what="run id")
    api.post(
        f"/api/runs/{run_id}/rules",
        json={"kind": "accuracy_gain_per_100g_below", "threshold": 1e9, "window_rounds": 2, "action": "stop"},
    )
    for epoch, accuracy in ((2, 0.70), (3, 0.701)):
        time.sleep(0.05)
        client.update(epoch, accuracy)

    _wait(lambda: client.should_stop, what="the stop from the rule")
    client.stop()

    (rule,) = api.get(f"/api/runs/{run_id}/rules").json()
    assert rule["fired_at"] is not None
    assert api.get(f"/api/runs/{run_id}").json()["status"] == "stopped"


def test_bad_rules_are_refused(server: ServerThread, api: httpx.Client) -> None:
    run_id = _run_with_client(server)

    no_window = api.post(f"/api/runs/{run_id}/rules", json={"kind": "accuracy_gain_per_100g_below", "threshold": 1})
    unknown_kind = api.post(f"/api/runs/{run_id}/rules", json={"kind": "vibes", "threshold": 1})
    unknown_run = api.post("/api/runs/999/rules", json={"kind": "power_w_over", "threshold": 1})
    missing = api.delete(f"/api/runs/{run_id}/rules/77")

    assert (no_window.status_code, no_window.json()["error"]["code"]) == (422, "invalid_rule")
    assert unknown_kind.status_code == 422
    assert unknown_run.status_code == 404
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "rule_not_found")
    assert api.get(f"/api/runs/{run_id}/rules").json() == []


def test_a_power_rule_fires_on_live_samples(server: ServerThread, api: httpx.Client) -> None:
    ws, ack = open_worker(server, run="power", node_id="w1")
    api.post(f"/api/runs/{ack['run_id']}/rules", json={"kind": "power_w_over", "threshold": 100, "level": "info"})

    ws.send(json.dumps({"type": "sample", "seq": 1, "t": time.time(), "cpu_w": 60.0, "ram_w": 5.0}))
    recv_json(ws)
    quiet = api.get(f"/api/runs/{ack['run_id']}/rules").json()[0]["fired_at"]
    ws.send(json.dumps({"type": "sample", "seq": 2, "t": time.time(), "cpu_w": 150.0, "ram_w": 5.0}))
    recv_json(ws)

    rule = _wait(lambda: api.get(f"/api/runs/{ack['run_id']}/rules").json()[0]["fired_at"] and
                 api.get(f"/api/runs/{ack['run_id']}/rules").json()[0], what="the rule to fire")
    ws.close()
    assert quiet is None
    assert rule["fired_value"] == pytest.approx(155.0)
    assert api.get(f"/api/runs/{ack['run_id']}").json()["status"] == "running"  # level only, no action


def test_commands_are_not_lost_when_sent_from_many_threads(server: ServerThread, api: httpx.Client) -> None:
    run_id = _run_with_client(server)
    codes: list[int] = []

    def press(action: str) -> None:
        codes.append(_control(api, run_id, action).status_code)

    threads = [threading.Thread(target=press, args=("pause",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    assert sorted(codes) == [202] + [409] * 7  # exactly one pause wins
    assert len(api.get(f"/api/runs/{run_id}/commands").json()) == 1

