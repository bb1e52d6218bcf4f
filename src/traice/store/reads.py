"""What the API reads: runs, rounds, clients and samples, with energy and emissions by component.

Components (Green FL's breakdown): ``compute`` (the clients' measured energy × their PUE),
``upload`` and ``download`` (the bytes a client sent and received × the run's network energy
intensity, charged at that client's grid intensity), and ``server`` (the FL server's measured
energy × its PUE). ``energy_kwh`` and ``emissions_kg`` are always the sum of the four.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, and_, case, func, select

from ..carbon import network_energy_kwh
from .models import clients, round_clients, round_totals, runs, samples

COMPONENTS = ("compute", "upload", "download", "server")
# What finish_components turns into components (network bytes are charged at the sender's intensity).
_SUMS = ("compute_energy_kwh", "compute_emissions_kg", "server_energy_kwh", "server_emissions_kg",
         "bytes_up", "bytes_up_g", "bytes_down", "bytes_down_g")
_SUMS_RUN = (*_SUMS, "cpu_energy_kwh", "gpu_energy_kwh", "ram_energy_kwh")


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite keeps no zone; everything is written in UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def from_unix(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc)


def finish_components(row: dict[str, Any], kwh_per_gb: float) -> dict[str, Any]:
    """Replace the raw sums in ``row`` by energy and emissions per component and their totals."""
    sums = {name: float(row.pop(name, 0) or 0) for name in _SUMS}
    row["bytes_up"], row["bytes_down"] = int(sums["bytes_up"]), int(sums["bytes_down"])
    parts = {
        "compute": (sums["compute_energy_kwh"], sums["compute_emissions_kg"]),
        "upload": (network_energy_kwh(sums["bytes_up"], kwh_per_gb),
                   network_energy_kwh(sums["bytes_up_g"], kwh_per_gb) / 1000.0),
        "download": (network_energy_kwh(sums["bytes_down"], kwh_per_gb),
                     network_energy_kwh(sums["bytes_down_g"], kwh_per_gb) / 1000.0),
        "server": (sums["server_energy_kwh"], sums["server_emissions_kg"]),
    }
    for name, (energy, emissions) in parts.items():
        row[f"{name}_energy_kwh"] = energy
        row[f"{name}_emissions_kg"] = emissions
    row["energy_kwh"] = sum(energy for energy, _ in parts.values())
    row["emissions_kg"] = sum(emissions for _, emissions in parts.values())
    return row


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _client_sums(row: dict[str, Any]) -> dict[str, Any]:
    """A (round, client) totals row in the shape finish_components reads."""
    client = row["role"] == "client"
    return {
        "compute_energy_kwh": row["energy_kwh"] if client else 0.0,
        "compute_emissions_kg": row["emissions_kg"] if client else 0.0,
        "server_energy_kwh": 0.0 if client else row["energy_kwh"],
        "server_emissions_kg": 0.0 if client else row["emissions_kg"],
        **{n: row[n] if client else 0.0 for n in ("bytes_up", "bytes_up_g", "bytes_down", "bytes_down_g")},
    }


class ReadQueries:
    """The store's read side; mixed into :class:`~traice.store.sql.SqlStore`."""

    engine: Engine

    def _network_factor(self, run_id: int) -> float:
        with self.engine.connect() as conn:
            factor = conn.execute(select(runs.c.network_kwh_per_gb).where(runs.c.id == run_id)).scalar()
        return float(factor) if factor is not None else 0.0

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        """Per round: energy and emissions by component summed over clients and the FL server,
        duration of the slowest client, accuracy and loss weighted by ``num_examples``."""
        factor = self._network_factor(run_id)
        query = select(round_totals).where(round_totals.c.run_id == run_id).order_by(round_totals.c.round)
        with self.engine.connect() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
        out = []
        for t in rows:
            row = {
                "round": t["round"],
                "clients": t["clients"],
                "duration_s": t["duration_s"],
                "cpu_energy_kwh": t["cpu_energy_kwh"],
                "gpu_energy_kwh": t["gpu_energy_kwh"],
                "ram_energy_kwh": t["ram_energy_kwh"],
                "accuracy": _ratio(t["acc_num"], t["acc_den"]),
                "loss": _ratio(t["loss_num"], t["loss_den"]),
                "server_accuracy": _ratio(t["server_acc_num"], t["server_acc_den"]),
                "server_loss": _ratio(t["server_loss_num"], t["server_loss_den"]),
                "num_examples": t["num_examples"] or None,
                "started_at": iso(t["started_at"]),
                "ended_at": iso(t["ended_at"]),
                **{n: t[n] for n in _SUMS},
            }
            out.append(finish_components(row, factor))
        return out

    def client_rounds(self, run_id: int, node_id: str | None = None) -> list[dict[str, Any]]:
        """Per round and client: energy and emissions by component, duration, weighted accuracy and loss."""
        rc = round_clients.c
        query = (
            select(round_clients, clients.c.node_id)
            .join(clients, clients.c.id == rc.client_id)
            .where(rc.run_id == run_id)
            .order_by(rc.round, clients.c.node_id)
        )
        if node_id is not None:  # by client id, so that the (client_id, round) index serves it
            one = select(clients.c.id).where(clients.c.run_id == run_id, clients.c.node_id == node_id)
            query = query.where(rc.client_id == one.scalar_subquery())
        factor = self._network_factor(run_id)
        with self.engine.connect() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
        out = []
        for t in rows:
            row = {
                "round": t["round"],
                "node_id": t["node_id"],
                "role": t["role"],
                "duration_s": t["duration_s"],
                "accuracy": _ratio(t["acc_num"], t["acc_den"]),
                "loss": _ratio(t["loss_num"], t["loss_den"]),
                "num_examples": t["num_examples"],
                **_client_sums(t),
            }
            out.append(finish_components(row, factor))
        return out

    def _run_summaries(self, run_id: int | None) -> list[dict[str, Any]]:
        t = round_totals.c
        totals = select(t.run_id, func.count().label("rounds"), *[func.sum(getattr(t, n)).label(n) for n in _SUMS_RUN])
        if run_id is not None:
            totals = totals.where(t.run_id == run_id)
        totals_q = totals.group_by(t.run_id).subquery()
        members = (
            select(
                clients.c.run_id,
                func.count(case((clients.c.role == "client", 1))).label("clients"),
                func.count(case((and_(clients.c.role == "client", clients.c.status == "online"), 1))).label(
                    "clients_online"
                ),
            )
            .group_by(clients.c.run_id)
            .subquery()
        )
        query = (
            select(
                runs,
                func.coalesce(members.c.clients, 0).label("clients"),
                func.coalesce(members.c.clients_online, 0).label("clients_online"),
                func.coalesce(totals_q.c.rounds, 0).label("rounds"),
                *[getattr(totals_q.c, name).label(name) for name in _SUMS_RUN],
            )
            .outerjoin(totals_q, totals_q.c.run_id == runs.c.id)
            .outerjoin(members, members.c.run_id == runs.c.id)
            .order_by(runs.c.id.desc())
        )
        if run_id is not None:
            query = query.where(runs.c.id == run_id)
        with self.engine.connect() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
            last = self._last_accuracies(conn, run_id)
        for row in rows:
            finish_components(row, float(row["network_kwh_per_gb"]))
            row["by_component"] = {
                name: {"energy_kwh": row.pop(f"{name}_energy_kwh"), "emissions_kg": row.pop(f"{name}_emissions_kg")}
                for name in COMPONENTS
            }
            row["started_at"] = iso(row["started_at"])
            row["ended_at"] = iso(row["ended_at"])
            row["accuracy"] = last.get(row["id"])
        return rows

    def _last_accuracies(self, conn: Any, run_id: int | None) -> dict[int, float]:
        """Each run's latest accuracy: the global model's (the FL server's evaluation) if it reports
        one, else the clients' weighted evaluation, as in the rules and the forecast."""
        t = round_totals.c
        latest = select(t.run_id, func.max(t.round).label("round")).where((t.acc_den > 0) | (t.server_acc_den > 0))
        if run_id is not None:
            latest = latest.where(t.run_id == run_id)
        sub = latest.group_by(t.run_id).subquery()
        query = select(round_totals).join(sub, and_(sub.c.run_id == t.run_id, sub.c.round == t.round))
        found = {}
        for row in conn.execute(query).mappings():
            value = _ratio(row["server_acc_num"], row["server_acc_den"])
            found[row["run_id"]] = value if value is not None else _ratio(row["acc_num"], row["acc_den"])
        return found

    def list_runs(self) -> list[dict[str, Any]]:
        return self._run_summaries(None)

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        found = self._run_summaries(run_id)
        return found[0] if found else None

    def clients(self, run_id: int) -> list[dict[str, Any]]:
        """Every party of the run, with its status, location, hardware, and energy by component."""
        rc = round_clients.c
        totals = (
            select(
                rc.client_id,
                func.count().label("rounds"),
                *[func.sum(getattr(rc, n)).label(n) for n in ("energy_kwh", "emissions_kg", "bytes_up", "bytes_up_g",
                                                               "bytes_down", "bytes_down_g")],
                func.max(case((rc.acc_den > 0, rc.round))).label("last_accuracy_round"),
            )
            .where(rc.run_id == run_id)
            .group_by(rc.client_id)
            .subquery()
        )
        last = round_clients.alias("last")
        query = (
            select(
                clients,
                func.coalesce(totals.c.rounds, 0).label("rounds"),
                *[func.coalesce(getattr(totals.c, n), 0.0).label(f"t_{n}") for n in
                  ("energy_kwh", "emissions_kg", "bytes_up", "bytes_up_g", "bytes_down", "bytes_down_g")],
                (last.c.acc_num / func.nullif(last.c.acc_den, 0)).label("last_accuracy"),
            )
            .outerjoin(totals, totals.c.client_id == clients.c.id)
            .outerjoin(last, and_(last.c.run_id == run_id, last.c.client_id == clients.c.id,
                                  last.c.round == totals.c.last_accuracy_round))
            .where(clients.c.run_id == run_id)
            .order_by(clients.c.role, clients.c.node_id)
        )
        factor = self._network_factor(run_id)
        with self.engine.connect() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
            run_status = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()
        for row in rows:
            sums = {n: row.pop(f"t_{n}") for n in ("energy_kwh", "emissions_kg", "bytes_up", "bytes_up_g",
                                                    "bytes_down", "bytes_down_g")}
            row.update(_client_sums({"role": row["role"], **sums}))
            finish_components(row, factor)
            if row["last_accuracy"] is not None:
                row["last_accuracy"] = float(row["last_accuracy"])
            del row["session"], row["id"]
            if row["excluded"] and row["status"] in ("online", "offline"):
                row["status"] = "excluded"
            elif run_status == "paused" and row["status"] == "online":
                row["status"] = "paused"
            row["first_seen"] = iso(row["first_seen"])
            row["last_seen"] = iso(row["last_seen"])
        return rows

    def samples(
        self, run_id: int, *, since: float | None = None, node_id: str | None = None, limit: int = 10_000
    ) -> list[dict[str, Any]]:
        s = samples.c
        query = (
            select(clients.c.node_id, s.t, s.cpu_w, s.gpu_w, s.ram_w)
            .join(clients, clients.c.id == s.client_id)
            .where(s.run_id == run_id)
            .order_by(s.t, s.id)
            .limit(limit)
        )
        if since is not None:
            query = query.where(s.t > from_unix(since))
        if node_id is not None:
            query = query.where(clients.c.node_id == node_id)
        with self.engine.connect() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
        for row in rows:
            row["t"] = iso(row["t"])
            row["power_w"] = row["cpu_w"] + row["gpu_w"] + row["ram_w"]
        return rows
