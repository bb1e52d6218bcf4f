"""Running totals per (round, client) and per round, updated in the transaction that stores reports.

Reads then sum a few hundred rows instead of every report: a run of 1,000 clients and 500
rounds has a million reports but 500 round totals. All writes go through the server's single
writer, so read-modify-write here needs no locking.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, and_, bindparam, insert, select, update

from .base import Session
from .models import _SUMS, round_clients, round_totals

_ZERO_CLIENT = {name: 0.0 for name in _SUMS} | {"energy_kwh": 0.0, "emissions_kg": 0.0, "num_examples": None,
                                                 "started_at": None, "ended_at": None}
_ROUND_EXTRA = ("compute_energy_kwh", "compute_emissions_kg", "server_energy_kwh", "server_emissions_kg",
                "server_acc_num", "server_acc_den", "server_loss_num", "server_loss_den")


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything TRAICE writes is UTC.
    return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


def _min(a: datetime | None, b: datetime | None) -> datetime | None:
    a, b = _utc(a), _utc(b)
    return b if a is None else a if b is None else min(a, b)


def _max(a: datetime | None, b: datetime | None) -> datetime | None:
    a, b = _utc(a), _utc(b)
    return b if a is None else a if b is None else max(a, b)


def _contribution(row: dict[str, Any], pue: float) -> dict[str, Any]:
    """What one stored report adds to its (round, client) totals."""
    weight = row["num_examples"] if row["num_examples"] is not None else 1
    up, down, intensity = row["bytes_up"] or 0, row["bytes_down"] or 0, row["intensity_g_per_kwh"]
    return {
        "duration_s": row["duration_s"],
        "cpu_energy_kwh": row["cpu_energy_kwh"],
        "gpu_energy_kwh": row["gpu_energy_kwh"],
        "ram_energy_kwh": row["ram_energy_kwh"],
        "bytes_up": up,
        "bytes_up_g": up * intensity,
        "bytes_down": down,
        "bytes_down_g": down * intensity,
        "acc_num": row["accuracy"] * weight if row["accuracy"] is not None else 0.0,
        "acc_den": weight if row["accuracy"] is not None else 0.0,
        "loss_num": row["loss"] * weight if row["loss"] is not None else 0.0,
        "loss_den": weight if row["loss"] is not None else 0.0,
        "energy_kwh": row["energy_kwh"] * pue,
        "emissions_kg": row["emissions_kg"],
    }


class _Table:
    """A totals table's statements, built once: built per batch they cost more than the database."""

    def __init__(self, table: Any, names: tuple[str, ...]) -> None:
        self.names = names
        # IN lists per key column use the primary key; the few extra rows they match are dropped.
        self.load = select(table).where(
            and_(*[table.c[n].in_(bindparam(f"k_{n}", expanding=True)) for n in names])
        )
        self.insert = insert(table)
        # SET takes every other column from the parameters (all rows carry every column).
        self.update = update(table).where(and_(*[table.c[n] == bindparam(f"k_{n}") for n in names]))


_CLIENTS = _Table(round_clients, ("run_id", "round", "client_id"))
_ROUNDS = _Table(round_totals, ("run_id", "round"))


def _load(conn: Connection, table: _Table, keys: Iterable[tuple[int, ...]]) -> dict[Any, Any]:
    wanted = set(keys)
    if not wanted:
        return {}
    names = table.names
    params = {f"k_{n}": sorted({k[i] for k in wanted}) for i, n in enumerate(names)}
    found: dict[Any, Any] = {}
    for row in conn.execute(table.load, params).mappings():
        key = tuple(row[n] for n in names)
        if key in wanted:
            found[key] = dict(row)
    return found


def _save(conn: Connection, table: _Table, new: dict[Any, dict[str, Any]], existing: dict[Any, Any]) -> None:
    inserts = [row for key, row in new.items() if key not in existing]
    if inserts:
        conn.execute(table.insert, inserts)
    names = table.names
    updates = [
        {**{k: v for k, v in row.items() if k not in names}, **{f"k_{n}": v for n, v in zip(names, key)}}
        for key, row in new.items()
        if key in existing
    ]
    if updates:
        conn.execute(table.update, updates)


def accumulate(conn: Connection, stored: list[tuple[Session, dict[str, Any]]]) -> None:
    """Add newly stored report rows (each with its session) to the running totals."""
    if not stored:
        return
    keys = {(s.run_id, row["round"], s.client_id) for s, row in stored}
    old_clients = _load(conn, _CLIENTS, keys)
    new_clients: dict[Any, dict[str, Any]] = {}
    for session, row in stored:
        key = (session.run_id, row["round"], session.client_id)
        current = new_clients.get(key) or dict(old_clients.get(key) or {
            "run_id": key[0], "round": key[1], "client_id": key[2], "role": session.role, **_ZERO_CLIENT,
        })
        for name, value in _contribution(row, session.pue).items():
            current[name] = (current[name] or 0.0) + value
        if row["num_examples"] is not None:
            current["num_examples"] = max(current["num_examples"] or 0, row["num_examples"])
        current["started_at"] = _min(current["started_at"], row["started_at"] or row["reported_at"])
        current["ended_at"] = _max(current["ended_at"], row["reported_at"])
        new_clients[key] = current

    round_keys = {(k[0], k[1]) for k in new_clients}
    old_rounds = _load(conn, _ROUNDS, round_keys)
    new_rounds: dict[Any, dict[str, Any]] = {
        key: dict(old_rounds.get(key) or {"run_id": key[0], "round": key[1], "clients": 0, "num_examples": 0,
                                          "started_at": None, "ended_at": None,
                                          **{n: 0.0 for n in (*_SUMS, *_ROUND_EXTRA)}})
        for key in round_keys
    }
    for key, now in new_clients.items():
        before = old_clients.get(key) or {"role": now["role"], **_ZERO_CLIENT}
        total = new_rounds[(key[0], key[1])]
        delta = {name: (now[name] or 0.0) - (before[name] or 0.0) for name in (*_SUMS, "energy_kwh", "emissions_kg")}
        for name in ("cpu_energy_kwh", "gpu_energy_kwh", "ram_energy_kwh"):
            total[name] += delta[name]
        if now["role"] == "client":
            total["clients"] += 0 if key in old_clients else 1
            total["duration_s"] = max(total["duration_s"], now["duration_s"])  # the slowest client's
            for name in ("bytes_up", "bytes_up_g", "bytes_down", "bytes_down_g", "acc_num", "acc_den",
                         "loss_num", "loss_den"):
                total[name] += delta[name]
            total["compute_energy_kwh"] += delta["energy_kwh"]
            total["compute_emissions_kg"] += delta["emissions_kg"]
            total["num_examples"] += (now["num_examples"] or 0) - (before["num_examples"] or 0)
        else:  # the FL server: a component of its own; its accuracy is the global model's
            total["server_energy_kwh"] += delta["energy_kwh"]
            total["server_emissions_kg"] += delta["emissions_kg"]
            for name in ("acc_num", "acc_den", "loss_num", "loss_den"):
                total[f"server_{name}"] += delta[name]
        total["started_at"] = _min(total["started_at"], now["started_at"])
        total["ended_at"] = _max(total["ended_at"], now["ended_at"])

    _save(conn, _CLIENTS, new_clients, old_clients)
    _save(conn, _ROUNDS, new_rounds, old_rounds)
