"""The storage contract every backend honours (tests/test_store.py runs it on each)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..protocol import Bye, Hello, Round, Sample


class StoreError(Exception):
    """A refusal the worker should hear about, with a protocol error ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Session:
    """One worker's connection, as the store knows it after ``hello``."""

    run_id: int
    client_id: int
    node_id: str
    role: str
    session: str
    intensity_g_per_kwh: float = 0.0  # the party's annual intensity
    pue: float = 1.0
    zone: str | None = None  # Electricity Maps zone, for an hourly trace


@dataclass(frozen=True)
class Event:
    """A stored change, for the dashboard stream: ``kind`` is run, client, round or sample."""

    kind: str
    run_id: int
    data: dict[str, Any]


Op = tuple[Session, Sample | Round | Bye]


class Store(Protocol):
    """Runs, clients, round reports and samples.

    - ``open`` MUST create the run named in ``hello`` when no running run has that name,
      join it otherwise, and MUST fail with ``unknown_run`` for a ``run_id`` that does not exist.
    - ``apply`` MUST store a batch in one transaction and MUST ignore a ``(session, seq)``
      it has already stored, so that resent reports are stored exactly once.
    """

    def open(self, hello: Hello) -> tuple[Session, list[Event]]: ...

    def apply(self, ops: Sequence[Op]) -> list[Event]: ...

    def disconnect(self, session: Session) -> list[Event]: ...

    def list_runs(self) -> list[dict[str, Any]]: ...

    def get_run(self, run_id: int) -> dict[str, Any] | None: ...

    def rounds(self, run_id: int) -> list[dict[str, Any]]: ...

    def client_rounds(self, run_id: int, node_id: str | None = None) -> list[dict[str, Any]]: ...

    def clients(self, run_id: int) -> list[dict[str, Any]]: ...

    def samples(
        self, run_id: int, *, since: float | None = None, node_id: str | None = None, limit: int = 10_000
    ) -> list[dict[str, Any]]: ...

    # Run control (store/control.py). request_command MUST refuse, with nothing changed, a
    # command that makes no sense in the run's state (codes: run_not_found, run_finished,
    # already_paused, not_paused, run_stopping, client_not_found, already_excluded, not_excluded).

    def request_command(
        self, run_id: int, action: str, node_id: str | None = None, source: str = "user"
    ) -> tuple[dict[str, Any], list[Event]]: ...

    def update_command(self, run_id: int, command_id: int, status: str, detail: str | None = None) -> list[Event]: ...

    def list_commands(self, run_id: int) -> list[dict[str, Any]]: ...

    def standing_commands(self, run_id: int, node_id: str | None = None) -> list[dict[str, Any]]: ...

    def add_rule(
        self, run_id: int, *, kind: str, threshold: float, level: str = "warning", action: str = "none",
        window_rounds: int | None = None,
    ) -> tuple[dict[str, Any], list[Event]]: ...

    def list_rules(self, run_id: int) -> list[dict[str, Any]]: ...

    def delete_rule(self, run_id: int, rule_id: int) -> None: ...

    def runs_with_armed_rules(self) -> set[int]: ...

    def evaluate_rules(self, run_id: int) -> list[dict[str, Any]]: ...

    def ping(self) -> bool:
        """True when the database answers."""
        ...

    def close(self) -> None: ...
