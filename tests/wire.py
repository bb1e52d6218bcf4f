"""Raw worker-socket helpers for tests that speak the protocol themselves."""

from __future__ import annotations

import json
import uuid
from typing import Any

from websockets.sync.client import ClientConnection, connect

from traice.server import ServerThread


def ws_url(server: ServerThread, path: str = "/ws/worker") -> str:
    return f"ws://{server.host}:{server.port}{path}"


def hello(run: str = "run-a", node_id: str = "n1", session: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "hello",
        "seq": 0,
        "protocol": 1,
        "run": run,
        "node_id": node_id,
        "session": session or uuid.uuid4().hex,
        "location": {"country_iso_code": "FRA", "intensity_g_per_kwh": 56.0},
        **extra,
    }


def round_msg(seq: int, number: int, energy_kwh: float = 0.001, **extra: Any) -> dict[str, Any]:
    return {
        "type": "round",
        "seq": seq,
        "round": number,
        "duration_s": 1.0,
        "cpu_energy_kwh": energy_kwh,
        "energy_kwh": energy_kwh,
        "emissions_kg": energy_kwh * 0.056,
        **extra,
    }


def recv_json(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))  # type: ignore[no-any-return]


def events_of(frame: dict[str, Any]) -> list[dict[str, Any]]:
    """The events in a dashboard frame: a batch frame carries several."""
    return frame["events"] if frame.get("type") == "batch" else [frame]  # type: ignore[no-any-return]


def dashboard_events(ws: ClientConnection, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next ``count`` events from a dashboard socket, batches unpacked."""
    events: list[dict[str, Any]] = []
    while len(events) < count:
        events.extend(events_of(recv_json(ws, timeout)))
    return events


def dial(url: str, **kwargs: Any) -> ClientConnection:
    """A connected client socket (the caller closes it)."""
    return connect(url, open_timeout=10, **kwargs).__enter__()


def open_worker(server: ServerThread, **hello_fields: Any) -> tuple[ClientConnection, dict[str, Any]]:
    """A raw worker socket that has said hello; returns it with the server's ack."""
    ws = dial(ws_url(server), max_size=None)
    ws.send(json.dumps(hello(**hello_fields)))
    return ws, recv_json(ws)
