"""Run control in the store: commands with their state machine, and alert rules.

A command is ``requested`` when a person (or a rule) asks, ``acknowledged`` when the worker or
FL server has it, ``done`` when it has taken effect (or ``failed``). The run's status follows
what was asked at once (``paused``, ``running``, ``stopping``) so that a second, contradictory
request is refused with nothing changed.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, and_, bindparam, delete, insert, select, update

from .base import Event, StoreError
from .models import clients, commands, rules, runs
from .reads import iso

ACTIVE = ("running", "paused", "stopping")
ENDED = ("stopped", "finished", "failed")
STATUS_ORDER = {"requested": 0, "acknowledged": 1, "done": 2, "failed": 2}
RULE_KINDS = ("emissions_kg_over", "power_w_over", "accuracy_gain_per_100g_below")
POWER_WINDOW_S = 60.0


# What a hello asks, built once (a hello is the commonest control query): the run's status and
# whether this node is excluded, through the (run_id, node_id) unique index; then, only if
# something is in force, the latest command that put it there.
_RUN_AND_NODE = (
    select(runs.c.status, clients.c.excluded)
    .select_from(runs)
    .outerjoin(clients, and_(clients.c.run_id == runs.c.id, clients.c.node_id == bindparam("b_node")))
    .where(runs.c.id == bindparam("b_run"))
)
_EXCLUDED_NODES = (
    select(clients.c.node_id)
    .where(clients.c.run_id == bindparam("b_run"), clients.c.excluded.is_(True))
    .order_by(clients.c.id)
)
_LATEST = select(commands).where(commands.c.run_id == bindparam("b_run"), commands.c.action == bindparam("b_action"))
_LATEST_FOR_RUN = _LATEST.where(commands.c.node_id.is_(None)).order_by(commands.c.id.desc()).limit(1)
_LATEST_FOR_NODE = _LATEST.where(commands.c.node_id == bindparam("b_node")).order_by(commands.c.id.desc()).limit(1)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _command_out(row: Any) -> dict[str, Any]:
    out = dict(row)
    out["requested_at"] = iso(out["requested_at"])
    out["updated_at"] = iso(out["updated_at"])
    return out


def _rule_out(row: Any) -> dict[str, Any]:
    out = dict(row)
    out["fired_at"] = iso(out["fired_at"])
    out["created_at"] = iso(out["created_at"])
    return out


class ControlStore:
    """Commands and rules; mixed into :class:`~traice.store.sql.SqlStore`."""

    engine: Engine

    # The read side (reads.py) provides these.
    rounds: Any
    get_run: Any
    samples: Any

    # ---------------------------------------------------------------- commands

    def request_command(
        self, run_id: int, action: str, node_id: str | None = None, source: str = "user"
    ) -> tuple[dict[str, Any], list[Event]]:
        """Record a command and change the run's (or client's) status, or refuse with a code."""
        now = _now()
        events: list[Event] = []
        with self.engine.begin() as conn:
            run = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
            if run is None:
                raise StoreError("run_not_found", f"run {run_id} does not exist")
            status = run["status"]
            if status in ENDED:
                raise StoreError("run_finished", f"run {run_id} is {status}; it takes no more commands")
            if action in ("pause", "resume", "stop"):
                if node_id is not None:
                    raise StoreError("invalid_action", f"{action} applies to a whole run, not to a client")
                new_status = self._run_transition(run_id, status, action)
                conn.execute(update(runs).where(runs.c.id == run_id).values(status=new_status))
                events.append(Event("run", run_id, {"id": run_id, "status": new_status}))
            elif action in ("exclude", "include"):
                client = conn.execute(
                    select(clients).where(clients.c.run_id == run_id, clients.c.node_id == node_id)
                ).mappings().first()
                if client is None or client["role"] != "client":
                    raise StoreError("client_not_found", f"run {run_id} has no client {node_id!r}")
                excluded = action == "exclude"
                if client["excluded"] == excluded:
                    code = "already_excluded" if excluded else "not_excluded"
                    raise StoreError(code, f"client {node_id!r} is {'already' if excluded else 'not'} excluded")
                conn.execute(update(clients).where(clients.c.id == client["id"]).values(excluded=excluded))
                events.append(Event("client", run_id, {"node_id": node_id, "excluded": excluded}))
            else:
                raise StoreError("invalid_action", f"unknown action {action!r}")
            command_id = conn.execute(
                insert(commands).values(
                    run_id=run_id, node_id=node_id, action=action, status="requested", source=source,
                    requested_at=now, updated_at=now,
                )
            ).inserted_primary_key[0]
            command = conn.execute(select(commands).where(commands.c.id == command_id)).mappings().one()
        out = _command_out(command)
        events.append(Event("command", run_id, out))
        return out, events

    @staticmethod
    def _run_transition(run_id: int, status: str, action: str) -> str:
        if action == "pause":
            if status == "paused":
                raise StoreError("already_paused", f"run {run_id} is already paused")
            if status == "stopping":
                raise StoreError("run_stopping", f"run {run_id} is stopping")
            return "paused"
        if action == "resume":
            if status != "paused":
                raise StoreError("not_paused", f"run {run_id} is {status}, not paused")
            return "running"
        if status == "stopping":
            raise StoreError("run_stopping", f"run {run_id} is already stopping")
        return "stopping"

    def update_command(
        self, run_id: int, command_id: int, status: str, detail: str | None = None
    ) -> list[Event]:
        """Advance a command (never backwards) on the word of a worker of the same run."""
        with self.engine.begin() as conn:
            command = conn.execute(
                select(commands).where(commands.c.id == command_id, commands.c.run_id == run_id)
            ).mappings().first()
            if command is None:
                raise StoreError("unknown_command", f"run {run_id} has no command {command_id}")
            if STATUS_ORDER[status] <= STATUS_ORDER[command["status"]]:
                return []
            conn.execute(
                update(commands)
                .where(commands.c.id == command_id)
                .values(status=status, detail=detail, updated_at=_now())
            )
            command = conn.execute(select(commands).where(commands.c.id == command_id)).mappings().one()
        return [Event("command", run_id, _command_out(command))]

    def list_commands(self, run_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(commands).where(commands.c.run_id == run_id).order_by(commands.c.id.desc())
            ).mappings()
            return [_command_out(r) for r in rows]

    def standing_commands(self, run_id: int, node_id: str | None = None) -> list[dict[str, Any]]:
        """What a worker joining now must be told: the pause or stop in force, the exclusions
        (only its own when ``node_id`` is given; every one for the FL server)."""
        with self.engine.connect() as conn:
            found = conn.execute(_RUN_AND_NODE, {"b_run": run_id, "b_node": node_id}).first()
            if found is None:
                return []
            status, node_excluded = found
            wanted: list[tuple[str, str | None]] = []
            if status == "paused":
                wanted.append(("pause", None))
            elif status == "stopping":
                wanted.append(("stop", None))
            if node_id is None:
                wanted += [("exclude", node) for node in conn.execute(_EXCLUDED_NODES, {"b_run": run_id}).scalars()]
            elif node_excluded:
                wanted.append(("exclude", node_id))
            standing = []
            for action, node in wanted:
                params: dict[str, Any] = {"b_run": run_id, "b_action": action}
                if node is None:
                    latest = conn.execute(_LATEST_FOR_RUN, params).mappings().first()
                else:
                    latest = conn.execute(_LATEST_FOR_NODE, {**params, "b_node": node}).mappings().first()
                if latest is not None:
                    standing.append(_command_out(latest))
            return standing

    # ---------------------------------------------------------------- rules

    def add_rule(
        self, run_id: int, *, kind: str, threshold: float, level: str = "warning", action: str = "none",
        window_rounds: int | None = None,
    ) -> tuple[dict[str, Any], list[Event]]:
        with self.engine.begin() as conn:
            status = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()
            if status is None:
                raise StoreError("run_not_found", f"run {run_id} does not exist")
            if kind == "accuracy_gain_per_100g_below" and not window_rounds:
                raise StoreError("invalid_rule", "accuracy_gain_per_100g_below needs window_rounds >= 1")
            rule_id = conn.execute(
                insert(rules).values(
                    run_id=run_id, kind=kind, threshold=threshold, level=level, action=action,
                    window_rounds=window_rounds, created_at=_now(),
                )
            ).inserted_primary_key[0]
            row = conn.execute(select(rules).where(rules.c.id == rule_id)).mappings().one()
        rule = _rule_out(row)
        return rule, [Event("rule", run_id, rule)]

    def list_rules(self, run_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(rules).where(rules.c.run_id == run_id).order_by(rules.c.id)).mappings()
            return [_rule_out(r) for r in rows]

    def delete_rule(self, run_id: int, rule_id: int) -> None:
        with self.engine.begin() as conn:
            gone = conn.execute(delete(rules).where(rules.c.id == rule_id, rules.c.run_id == run_id)).rowcount
        if not gone:
            raise StoreError("rule_not_found", f"run {run_id} has no rule {rule_id}")

    def runs_with_armed_rules(self) -> set[int]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(rules.c.run_id).where(rules.c.fired_at.is_(None))).scalars())

    def evaluate_rules(self, run_id: int) -> list[dict[str, Any]]:
        """Fire the run's armed rules whose condition holds now; returns the fired rules."""
        with self.engine.connect() as conn:
            armed = list(
                conn.execute(select(rules).where(rules.c.run_id == run_id, rules.c.fired_at.is_(None))).mappings()
            )
        fired = []
        for rule in armed:
            value = self._rule_value(run_id, rule)
            if value is None:
                continue
            below = rule["kind"].endswith("_below")
            if (value < rule["threshold"]) if below else (value > rule["threshold"]):
                with self.engine.begin() as conn:
                    conn.execute(
                        update(rules)
                        .where(rules.c.id == rule["id"], rules.c.fired_at.is_(None))
                        .values(fired_at=_now(), fired_value=value)
                    )
                    row = conn.execute(select(rules).where(rules.c.id == rule["id"])).mappings().one()
                fired.append(_rule_out(row))
        return fired

    def _rule_value(self, run_id: int, rule: Any) -> float | None:
        kind = rule["kind"]
        if kind == "emissions_kg_over":
            run = self.get_run(run_id)
            return None if run is None else float(run["emissions_kg"])
        if kind == "power_w_over":
            since = (_now() - timedelta(seconds=POWER_WINDOW_S)).timestamp()
            latest: dict[str, float] = {}
            for sample in self.samples(run_id, since=since, limit=100_000):
                latest[sample["node_id"]] = sample["power_w"]  # ordered by time: the last one wins
            return sum(latest.values()) if latest else None
        # accuracy_gain_per_100g_below: what the last k rounds bought per 100 g CO2e
        window = int(rule["window_rounds"] or 1)
        history = []
        for r in self.rounds(run_id):
            accuracy = r["server_accuracy"] if r["server_accuracy"] is not None else r["accuracy"]
            history.append((accuracy, r["emissions_kg"]))
        with_accuracy = [i for i, (a, _) in enumerate(history) if a is not None]
        if len(with_accuracy) < window + 1:
            return None
        last, base = with_accuracy[-1], with_accuracy[-1 - window]
        grams = sum(e for _, e in history[base + 1 : last + 1]) * 1000
        if grams <= 0:
            return None
        return (history[last][0] - history[base][0]) / (grams / 100)  # type: ignore[operator]
