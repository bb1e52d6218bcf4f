"""Hostile input against a real server: schemathesis on the REST API, hypothesis on the two sockets.

Both are property-based tests with a fixed budget and a fixed seed (``derandomize``), so CI sees the
same cases on every run. Neither uses mocks: a real server on a free port, on a scratch SQLite file.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.errors import FailureGroup
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.sync.client import ClientConnection

from traice import protocol
from traice.server import ServerThread, create_app
from wire import dial, events_of, hello, open_worker, recv_json, round_msg, ws_url

# --------------------------------------------------------------------------- REST: schemathesis

REST_BUDGET = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                       suppress_health_check=list(HealthCheck))
SEEDED_RUNS = {"alpha": 1, "beta": 2}
SEEDED_NODES = ("n1", "n2")


def _report(server: ServerThread, run: str, node: str, rounds: int) -> int:
    """One well-behaved worker: a hello, then a round and a sample per round; returns the run id."""
    ws, ack = open_worker(server, run=run, node_id=node, rounds_planned=5)
    seq = 0
    for number in range(1, rounds + 1):
        ws.send(json.dumps(round_msg(seq := seq + 1, number, accuracy=0.2 * number, num_examples=10)))
        ws.send(json.dumps({"type": "sample", "seq": (seq := seq + 1), "t": 1.7e9 + number, "cpu_w": 12.5}))
    while recv_json(ws)["seq"] < seq:  # acks are cumulative
        pass
    ws.close()
    return int(ack["run_id"])


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The live server's own OpenAPI, on a scratch database holding two runs of two clients each, with
    an alert rule each and a command."""
    database = tmp_path_factory.mktemp("schemathesis") / "traice.db"
    with ServerThread(create_app(database_url=f"sqlite:///{database}")) as server:
        for run, run_id in SEEDED_RUNS.items():
            assert {_report(server, run, node, rounds=3) for node in SEEDED_NODES} == {run_id}
            rule = httpx.post(f"{server.url}/api/runs/{run_id}/rules", json={"kind": "power_w_over", "threshold": 1e6})
            assert rule.status_code == 201, rule.text
        excluded = httpx.post(f"{server.url}/api/runs/1/clients/n2/control", json={"action": "exclude"})
        assert excluded.status_code == 202, excluded.text
        config = schemathesis.Config.from_dict(
            {
                "base-url": server.url,
                "checks": {
                    "enabled": False,
                    "not_a_server_error": {"enabled": True},
                    "status_code_conformance": {"enabled": True},
                    "content_type_conformance": {"enabled": True},
                    "response_schema_conformance": {"enabled": True},
                },
                # Many ids name real runs, clients and rules, so the happy paths see real data too; some
                # are past what an SQL integer or a date holds.
                "dictionaries": {
                    "runs": {"values": [*SEEDED_RUNS.values(), *SEEDED_RUNS.values(), 2**31, 2**64]},
                    "nodes": {"values": [*SEEDED_NODES, "n\x00"]},
                    "rules": {"values": [1, 2, 3, 2**64]},
                    "times": {"values": [1.7e9, 1e300]},
                },
                "parameters": {
                    "path.run_id": {"dictionary": "runs", "probability": 0.6},
                    "path.node_id": {"dictionary": "nodes", "probability": 0.6},
                    "query.node_id": {"dictionary": "nodes", "probability": 0.5},
                    "path.rule_id": {"dictionary": "rules", "probability": 0.6},
                    "query.since": {"dictionary": "times", "probability": 0.3},
                },
            }
        )
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
        assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"


def _fuzz_operation(operation: Any, mode: GenerationMode, session: requests.Session, seen: Counter[int]) -> None:
    @REST_BUDGET
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        seen[case.call_and_validate(session=session, timeout=30).status_code] += 1

    call()


def test_rest_api_matches_its_openapi(api_schema: Any) -> None:
    """Valid and invalid requests to every operation (control ones too): never a 5xx, and every answer
    (status, content type, body) as the OpenAPI document says.

    schemathesis's own pytest plugin (``@schema.parametrize()``) does not run on pytest 9.2, so each
    operation gets a plain hypothesis test over ``operation.as_strategy()``.
    """
    statuses: dict[str, Counter[int]] = {}
    failures: dict[str, Exception | FailureGroup] = {}
    with requests.Session() as session:
        for result in api_schema.get_all_operations():
            operation = result.ok()
            seen = statuses.setdefault(operation.label, Counter())
            modes = [GenerationMode.POSITIVE]
            if any(operation.iter_parameters()) or operation.body:  # else there is nothing to get wrong
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                try:
                    _fuzz_operation(operation, mode, session, seen)
                except (Exception, FailureGroup) as exc:  # noqa: BLE001 -- report every operation that fails
                    failures[f"{operation.label} ({mode.value})"] = exc
    assert not failures, "\n\n".join(f"{label}:\n{exc}" for label, exc in failures.items())
    # The budget reached real data: every read answered with success at least once.
    assert all(any(200 <= code < 300 for code in seen) for label, seen in statuses.items() if label.startswith("GET")), (
        statuses)


# --------------------------------------------------------------------------- sockets: hypothesis

# No shrinking: every try is real I/O (a refused frame that gets no answer costs a receive timeout);
# a failure names its frame (see _about).
FUZZ_BUDGET = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                       phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
RUN = "fuzzed"
ENERGY_KWH = 0.002
INT64_MAX = 2**63 - 1
#: What may answer a bad frame on a greeted socket, which stays open (docs/protocol.md).
OPEN_CODES = {"invalid_json", "unknown_type", "invalid_message", "duplicate_hello", "store_rejected",
              "unknown_command"}
#: What may answer a bad first frame; the socket is then closed with 1008.
FIRST_CODES = OPEN_CODES - {"duplicate_hello"} | {"hello_required", "unsupported_protocol", "unknown_run"}


class GoodWorker(threading.Thread):
    """A well-behaved worker: round n and a sample, each sent once, until stopped; every reply an ack."""

    def __init__(self, server: ServerThread) -> None:
        super().__init__(daemon=True)
        self.server, self.session = server, uuid.uuid4().hex
        self.ws, ack = open_worker(server, run=RUN, node_id="good", session=self.session)
        self.run_id: int = ack["run_id"]
        self.rounds = 0  # rounds sent and acknowledged
        self.failure: BaseException | None = None
        self._stop_asked = threading.Event()
        self._progress = threading.Condition()

    def run(self) -> None:
        try:
            while not self._stop_asked.is_set():
                number = self.rounds + 1
                self.ws.send(json.dumps(round_msg(2 * number - 1, number, energy_kwh=ENERGY_KWH)))
                self.ws.send(json.dumps({"type": "sample", "seq": 2 * number, "t": 1.7e9 + number, "cpu_w": 10.0}))
                acked = 0
                while acked < 2 * number:
                    reply = recv_json(self.ws)
                    assert reply["type"] == "ack", reply
                    acked = reply["seq"]
                with self._progress:
                    self.rounds = number
                    self._progress.notify_all()
                self._stop_asked.wait(0.02)  # pace, well under the server's per-socket rate limit
        except BaseException as exc:  # noqa: BLE001 -- handed to the test by finish()
            self.failure = exc
        finally:
            self.ws.close()

    def wait_past(self, rounds: int) -> None:
        with self._progress:
            moved = self._progress.wait_for(lambda: self.rounds > rounds or not self.is_alive(), timeout=60)
        assert moved and self.failure is None, f"the good worker stalled at round {self.rounds}: {self.failure!r}"

    def finish(self) -> int:
        """Stop; then resend the last round and sample on a new socket, as after a lost ack."""
        self._stop_asked.set()
        self.join(60)
        assert self.failure is None, repr(self.failure)
        ws, ack = open_worker(self.server, run=RUN, node_id="good", session=self.session, run_id=self.run_id)
        ws.send(json.dumps(round_msg(2 * self.rounds - 1, self.rounds, energy_kwh=ENERGY_KWH)))
        ws.send(json.dumps({"type": "sample", "seq": 2 * self.rounds, "t": 1.7e9 + self.rounds, "cpu_w": 10.0}))
        replies = [ack, recv_json(ws)]
        if replies[-1].get("seq") != 2 * self.rounds:  # the two acks may come apart
            replies.append(recv_json(ws))
        ws.close()
        assert [r["type"] for r in replies] == ["ack"] * len(replies) and replies[-1]["seq"] == 2 * self.rounds
        return self.rounds


class HostileWorker:
    """A worker that said a proper hello, then sends only what must be refused. If the server ever
    drops its socket (the example fails then), the next example starts on a new one."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.ws: ClientConnection | None = None

    def send(self, frame: str | bytes) -> protocol.Error:
        if self.ws is None or self.ws.state is not State.OPEN:
            self.ws, ack = open_worker(self.server, run=RUN, node_id="hostile", session="h" * 16)
            assert ack["type"] == "ack", ack
        self.ws.send(frame)
        return _error(recv_json(self.ws))


class Dashboard(threading.Thread):
    """A dashboard socket read all along, so that it never falls behind."""

    def __init__(self, server: ServerThread) -> None:
        super().__init__(daemon=True)
        self.ws = dial(ws_url(server, "/ws/dashboard"))
        self.events: list[dict[str, Any]] = []
        self.closed: ConnectionClosed | None = None
        self._arrived = threading.Condition()

    def run(self) -> None:
        try:
            for frame in self.ws:
                with self._arrived:
                    self.events.extend(events_of(json.loads(frame)))
                    self._arrived.notify_all()
        except ConnectionClosed as exc:
            self.closed = exc

    def wait_for(self, wanted: Callable[[dict[str, Any]], bool]) -> None:
        with self._arrived:
            assert self._arrived.wait_for(lambda: any(map(wanted, self.events)), timeout=60), self.closed


# ---- frames: hostile by construction (each breaks the protocol in at least one way)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),  # floats: NaN, ±Infinity too
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
not_numbers = st.text(max_size=10) | st.booleans() | st.lists(st.integers(), max_size=3) | st.dictionaries(
    st.text(max_size=5), st.integers(), max_size=2)
not_strings = st.integers() | st.floats() | st.booleans() | st.lists(st.text(max_size=3), max_size=3) | st.just({})
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])
too_big = st.integers(min_value=INT64_MAX + 1, max_value=2**200)
negative = st.integers(max_value=-1) | st.floats(max_value=-1e-9, allow_nan=False)
with_nul = st.text(max_size=20).map(lambda text: text + "\x00")  # PostgreSQL cannot store it

WRONG: dict[str, st.SearchStrategy[Any]] = {
    "count": negative | too_big | not_numbers | st.floats(),  # ints only: even 1.0 is not one
    "id": st.integers(max_value=0) | too_big | not_numbers | st.floats(),
    "int": too_big | not_numbers | st.floats(),
    "number": negative | non_finite | not_numbers,
    "finite": non_finite | not_numbers,
    "name": st.just("") | st.text(min_size=201, max_size=260) | with_nul | not_strings,
    "session": st.text(max_size=7) | st.text(min_size=65, max_size=80) | with_nul.map("session-".__add__) | not_strings,
    "text": st.text(min_size=501, max_size=560) | not_strings,
    "choice": st.text(max_size=12).filter(lambda s: s not in CHOICES) | not_strings,
    "bool": st.integers() | st.text(max_size=5) | st.none() | st.lists(st.booleans(), max_size=2),
    "object": st.integers() | st.text(max_size=10) | st.lists(st.integers(), max_size=3) | st.just({"unknown": 1}),
    "metrics": not_strings.filter(lambda v: v != {}) | st.dictionaries(
        st.text(max_size=5), st.none() | st.lists(st.integers(), max_size=2) | st.just({}), min_size=1, max_size=3),
}
CHOICES = {"client", "server", "round", "train", "evaluate", "tail", "idle", "acknowledged", "done", "failed"}
#: Each message's fields by kind; required ones first, up to the ``|``.
FIELDS: dict[str, dict[str, str]] = {
    "hello": {"run": "name", "node_id": "name", "session": "session", "location": "object", "|": "",
              "seq": "count", "protocol": "int", "run_id": "id", "role": "choice", "rounds_planned": "count",
              "hardware": "object", "sdk_version": "text"},
    "sample": {"seq": "count", "t": "number", "|": "", "cpu_w": "number", "gpu_w": "number", "ram_w": "number"},
    "round": {"seq": "count", "round": "count", "duration_s": "number", "energy_kwh": "number",
              "emissions_kg": "number", "|": "", "phase": "choice", "started_at": "number",
              "cpu_energy_kwh": "number", "gpu_energy_kwh": "number", "ram_energy_kwh": "number",
              "accuracy": "finite", "loss": "finite", "num_examples": "count", "bytes_up": "count",
              "bytes_down": "count", "metrics": "metrics"},
    "bye": {"seq": "count", "|": "", "reason": "text", "final": "bool"},
    "command_ack": {"seq": "count", "command_id": "int", "status": "choice", "|": "", "detail": "text"},
}


def _required(kind: str) -> list[str]:
    names = list(FIELDS[kind])
    return names[: names.index("|")]


def _valid(kind: str, seq: int) -> dict[str, Any]:
    """A message the server would take (a command_ack too, but this run has no commands: refused)."""
    return {
        "hello": lambda: hello(run=RUN, node_id="hostile", session="h" * 16, seq=seq),
        "sample": lambda: {"type": "sample", "seq": seq, "t": 1.7e9, "cpu_w": 1.0},
        "round": lambda: round_msg(seq, 1, accuracy=0.5, num_examples=3),
        "bye": lambda: {"type": "bye", "seq": seq, "reason": "done"},
        "command_ack": lambda: {"type": "command_ack", "seq": seq, "command_id": 1, "status": "done"},
    }[kind]()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def broken_messages(draw: st.DrawFn) -> str:
    """A message of a real type, broken in one way: a field missing, of the wrong type or range (NaN,
    infinity, huge or negative numbers, over-long strings), an unknown field, a bad ``type``, or deep nesting."""
    kind = draw(st.sampled_from(sorted(FIELDS)))
    message = _valid(kind, draw(st.integers(0, 10**6) | st.just(INT64_MAX)))
    how = draw(st.sampled_from(["missing", "wrong", "wrong", "wrong", "unknown", "type", "nested"]))
    if how == "missing":
        del message[draw(st.sampled_from(_required(kind)))]
    elif how == "wrong":
        field = draw(st.sampled_from([f for f in FIELDS[kind] if f != "|"]))
        message[field] = draw(WRONG[FIELDS[kind][field]] | (st.none() if field in _required(kind) else st.nothing()))
    elif how == "unknown":
        message[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in FIELDS[kind] and k != "type"))] = (
            draw(json_values))
    elif how == "type":
        message["type"] = draw(st.text(max_size=12).filter(lambda t: t not in FIELDS) | not_strings | st.none())
    else:  # deeper than the JSON parser goes (a 1 MiB frame has room for half a million levels)
        message[draw(st.sampled_from(list(message)))] = "NESTED"
        return json.dumps(message).replace('"NESTED"', _nested(draw(st.integers(1_000, 5_000))))
    return json.dumps(message)  # NaN and infinity as the text JSON parsers read: NaN, Infinity


garbage = st.one_of(
    st.binary(max_size=64),  # a binary frame
    st.text(max_size=64),
    json_values.map(json.dumps),
    broken_messages(),  # most of the time: these reach furthest into the server
    broken_messages(),
    broken_messages(),
    broken_messages().map(str.encode),  # the same, in a binary frame
    st.integers(0, 10**6).map(lambda seq: json.dumps(_valid("command_ack", seq))),  # no such command
)
#: What a greeted worker may send that must be refused: garbage, or a second hello (it opens nothing).
hostile_frames = garbage | st.just(json.dumps(hello(run="elsewhere", node_id="intruder")))
#: What may open a worker socket instead of a hello: garbage, or a valid message of another type.
first_frames = garbage | st.builds(_valid, st.sampled_from(["sample", "round", "bye"]), st.integers(0, 99)).map(
    json.dumps)
#: The dashboard only listens: worker messages sent to it must not be stored either.
dashboard_frames = hostile_frames | st.builds(_valid, st.sampled_from(sorted(FIELDS)), st.integers(0, 99)).map(
    json.dumps)


#: Frames that once got no answer, were stored, or took the socket down.
REGRESSIONS = [
    json.dumps({"type": "round", "seq": -1}),  # unanswered: the error could not name seq -1
    json.dumps({"type": "bye", "seq": True}),  # stored as seq 1
    json.dumps({**round_msg(7, 1), "energy_kwh": "0.001"}),  # stored: a string is not a number
    '{"type": "round", "seq": 8, "metrics": ' + _nested(3_000) + "}",  # RecursionError: socket gone
    json.dumps(round_msg(9, 2**40)),  # stored by SQLite, refused by PostgreSQL's INTEGER
    json.dumps({"type": "sample", "seq": 2**64, "t": 1.7e9}),  # a seq no database column holds
]


def _named_seq(frame: str | bytes) -> int | None:
    """The ``seq`` an error must name: the frame's, when it is a JSON object with a valid one."""
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    seq = data.get("seq") if isinstance(data, dict) else None
    return seq if type(seq) is int and 0 <= seq <= INT64_MAX else None


@contextlib.contextmanager
def _about(frame: str | bytes) -> Iterator[None]:
    """Name the frame in a failure (hypothesis, not shrinking, prints no example)."""
    try:
        yield
    except (AssertionError, ConnectionClosed, TimeoutError) as exc:
        shown = repr(frame[:300]) + (f"... ({len(frame)} in all)" if len(frame) > 300 else "")
        raise AssertionError(f"after {shown}: {exc!r}") from exc


def _error(reply: dict[str, Any]) -> protocol.Error:
    """The server's answer, which must be an ``error`` (an ack would mean a hostile frame was stored)."""
    parsed = protocol.parse_server_message(json.dumps(reply))
    assert isinstance(parsed, protocol.Error), reply
    return parsed


def _refused_first(server: ServerThread, frame: str | bytes) -> str:
    """Open a socket with ``frame`` instead of a hello: an error with a code, then a 1008 close."""
    ws = dial(ws_url(server))
    ws.send(frame)
    error = _error(recv_json(ws))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008, closed.value
    assert error.code in FIRST_CODES, error
    return error.code


# The server's and the clients' keepalive pings draw from the global `random` in their own threads;
# hypothesis, watching it while it generates a frame, would blame the frame's strategy.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
def test_hostile_frames_are_refused_and_a_good_worker_goes_on(sqlite_url: str) -> None:
    codes: Counter[str] = Counter()
    with ServerThread(create_app(database_url=sqlite_url)) as server:
        dashboard = Dashboard(server)  # first, so that it sees every round and sample
        dashboard.start()
        good = GoodWorker(server)
        good.start()
        good.wait_past(0)
        hostile = HostileWorker(server)

        @FUZZ_BUDGET
        @given(frames=st.lists(hostile_frames, min_size=1, max_size=4), first=st.none() | first_frames,
               to_dashboard=st.lists(dashboard_frames, max_size=2))
        @example(frames=REGRESSIONS, first=json.dumps(hello(run=RUN, run_id=2**70)), to_dashboard=REGRESSIONS)
        @example(frames=REGRESSIONS[:1], first=json.dumps(hello(run=RUN, node_id="nul\x00")), to_dashboard=[])
        @example(frames=REGRESSIONS[:1], first=REGRESSIONS[3], to_dashboard=[])
        def hostile_peers(frames: list[str | bytes], first: str | bytes | None, to_dashboard: list[str | bytes]) -> None:
            for frame in frames:  # one at a time: store refusals come later than parse ones
                with _about(frame):
                    error = hostile.send(frame)
                    assert error.code in OPEN_CODES and error.seq == _named_seq(frame), error
                codes[error.code] += 1
            if first is not None:
                with _about(first):
                    codes["first:" + _refused_first(server, first)] += 1
            for frame in to_dashboard:
                dashboard.ws.send(frame)

        hostile_peers()
        good.wait_past(good.rounds)  # it went on all along, and still does
        rounds = good.finish()
        assert hostile.ws is not None
        hostile.ws.close()
        dashboard.wait_for(lambda e: e["type"] == "round" and e["data"]["round"] == rounds)
        with pytest.raises(ConnectionClosed) as too_big:  # the one frame a dashboard is closed for
            big = dial(ws_url(server, "/ws/dashboard"))
            big.send("x" * (protocol.MAX_FRAME_BYTES + 1))
            for _ in range(100):  # events stored just before (a worker leaving) may come ahead of the close
                big.recv(timeout=10)
        assert too_big.value.rcvd is not None and too_big.value.rcvd.code == 1009

        with httpx.Client(base_url=server.url, timeout=30) as api:
            assert api.get("/healthz").json()["status"] == "ok"
            runs = api.get("/api/runs").json()
            clients = {c["node_id"]: c for c in api.get(f"/api/runs/{good.run_id}/clients").json()}
            per_round = api.get(f"/api/runs/{good.run_id}/rounds/clients").json()
            samples = api.get(f"/api/runs/{good.run_id}/samples", params={"limit": 100_000}).json()
        dashboard.ws.close()
        dashboard.join(10)

    # Every hostile path was taken: parse errors of each kind, store refusals, bad first frames.
    assert set(codes) >= {"invalid_json", "unknown_type", "invalid_message", "duplicate_hello", "unknown_command",
                          "first:hello_required", "first:invalid_json", "first:invalid_message"}, codes
    # Nothing hostile was stored; the good worker's reports are, each exactly once.
    assert [(r["name"], r["clients"], r["rounds"]) for r in runs] == [(RUN, 2, rounds)]
    assert set(clients) == {"good", "hostile"} and clients["hostile"]["rounds"] == 0
    assert clients["good"]["rounds"] == rounds
    assert clients["good"]["energy_kwh"] == pytest.approx(rounds * ENERGY_KWH)
    assert sorted(r["round"] for r in per_round) == list(range(1, rounds + 1))
    assert {r["node_id"] for r in per_round} == {"good"}
    assert len(samples) == rounds and {s["node_id"] for s in samples} == {"good"}
    streamed = [e for e in dashboard.events if e["type"] in ("round", "sample")]
    assert {e["data"]["node_id"] for e in streamed} == {"good"} and len(streamed) == 2 * rounds
    assert dashboard.closed is None or dashboard.closed.rcvd is not None and dashboard.closed.rcvd.code == 1000
