"""The SQL store: SQLite (a file, WAL, nothing to set up) or PostgreSQL, through SQLAlchemy."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Engine,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from ..carbon import CarbonModel, zone_of
from ..protocol import Bye, Hello, Round, Sample
from .base import Event, Op, Session, StoreError
from .control import ACTIVE, ControlStore
from .models import clients, reports, runs, samples
from .reads import ReadQueries, from_unix, iso
from .totals import accumulate

log = logging.getLogger(__name__)


def normalize_database_url(url: str) -> str:
    """Accept the URLs people write and pick the driver: ``postgresql://`` → psycopg 3,
    ``sqlite:///file.db`` as is, and a bare path → an SQLite file."""
    url = url.strip()
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso_utc(value: datetime) -> str:
    """``reads.iso`` for a datetime already in UTC with its zone (no conversion to do)."""
    return value.isoformat()[:-6] + "Z"


#: A client's ``last_seen`` is written at most this often by ``apply`` (every message would be an
#: UPDATE per client per batch); hello, bye and disconnect write it at once.
LAST_SEEN_RESOLUTION_S = 1.0


#: From this many samples in a batch, PostgreSQL gets them as arrays (cheaper from about 5).
ARRAYS_FROM = 5
_SAMPLE_COLUMNS = ("run_id", "client_id", "session", "seq", "t", "cpu_w", "gpu_w", "ram_w")

# What a hello sets on its client row, joining or rejoining.
_HELLO_FIELDS = ("role", "status", "session", "country_iso_code", "region", "intensity_g_per_kwh",
                 "intensity_source", "pue", "hardware", "sdk_version", "last_seen")


class _Statements:
    """The write path's statements, built once per store: built per batch, SQLAlchemy spent more
    time coercing arguments and computing cache keys than the database spent storing the rows."""

    def __init__(self, dialect: str) -> None:
        dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self.insert_samples = (
            dialect_insert(samples).on_conflict_do_nothing(index_elements=["session", "seq"])
            .returning(samples.c.session, samples.c.seq)
        )
        # PostgreSQL takes a bigger batch of samples as one array per column (INSERT ... SELECT
        # FROM unnest): the statement above, a row of placeholders per sample, is parsed again by
        # psycopg for every batch, which was most of the cost of a big batch.
        self.insert_sample_arrays: Any = None
        if dialect == "postgresql":
            arrays = [bindparam(f"a_{c}", type_=postgresql.ARRAY(samples.c[c].type)) for c in _SAMPLE_COLUMNS]
            batch = func.unnest(*arrays).table_valued(*_SAMPLE_COLUMNS).render_derived(name="batch")
            self.insert_sample_arrays = (
                postgresql.insert(samples).from_select(_SAMPLE_COLUMNS, select(*[batch.c[c] for c in _SAMPLE_COLUMNS]))
                .on_conflict_do_nothing(index_elements=["session", "seq"])
                .returning(samples.c.session, samples.c.seq)
            )
        self.insert_reports = (
            dialect_insert(reports).on_conflict_do_nothing(index_elements=["session", "seq"])
            .returning(reports.c.session, reports.c.seq)
        )
        self.touch_clients = (
            update(clients)
            .where(clients.c.id.in_(bindparam("b_ids", expanding=True)))
            .values(last_seen=bindparam("b_now"))
        )
        self.run_by_id = select(runs).where(runs.c.id == bindparam("b_id"))
        self.active_run_by_name = (
            select(runs).where(runs.c.name == bindparam("b_name"), runs.c.status.in_(ACTIVE))
            .order_by(runs.c.id.desc()).limit(1)
        )
        upsert = dialect_insert(clients)
        # A hello joins or rejoins in one statement; first_seen and excluded stay as they were.
        self.upsert_client = upsert.on_conflict_do_update(
            index_elements=["run_id", "node_id"],
            set_={name: upsert.excluded[name] for name in _HELLO_FIELDS},
        ).returning(clients.c.id)


def _stored(
    sessions: list[Session], rows: list[dict[str, Any]], returned: Sequence[Any]
) -> list[tuple[Session, dict[str, Any]]]:
    """The rows the database stored (``returned``: their keys), with their sessions, in arrival
    order; a key sent twice in one batch is stored and reported once."""
    new = {tuple(key) for key in returned}
    out = []
    for session, row in zip(sessions, rows):
        key = (row["session"], row["seq"])
        if key in new:
            new.discard(key)
            out.append((session, row))
    return out


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class SqlStore(ReadQueries, ControlStore):
    """:class:`~traice.store.base.Store` on SQLAlchemy 2; migrates the schema on open."""

    def __init__(
        self, url: str = "sqlite:///traice.db", *, migrate: bool = True, carbon: CarbonModel | None = None
    ) -> None:
        self.url = normalize_database_url(url)
        self.carbon = carbon or CarbonModel()
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite" and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(self.url, pool_pre_ping=True)
        self._sql = _Statements(self.dialect)
        self._last_seen: dict[int, float] = {}  # client id -> unix time last written, by apply
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _set_sqlite_pragmas)
        if migrate:
            from .migrate import upgrade

            upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
            return True
        except Exception:
            return False

    # ---------------------------------------------------------------- writes

    def open(self, hello: Hello) -> tuple[Session, list[Event]]:
        now = _now()
        events: list[Event] = []
        sql = self._sql
        with self.engine.begin() as conn:
            if hello.run_id is not None:
                run = conn.execute(sql.run_by_id, {"b_id": hello.run_id}).mappings().first()
                if run is None:
                    raise StoreError("unknown_run", f"run {hello.run_id} does not exist")
                if run["name"] != hello.run:  # a token allowed for one run name must not reach another by id
                    raise StoreError("run_mismatch", f"run {hello.run_id} is not named {hello.run!r}")
            else:
                run = conn.execute(sql.active_run_by_name, {"b_name": hello.run}).mappings().first()
            if run is None:
                run_id = conn.execute(
                    insert(runs).values(
                        name=hello.run,
                        status="running",
                        started_at=now,
                        rounds_planned=hello.rounds_planned,
                        network_kwh_per_gb=self.carbon.network_kwh_per_gb,
                        carbon_model=self.carbon.describe(),
                    )
                ).inserted_primary_key[0]
                events.append(Event("run", run_id, {"id": run_id, "name": hello.run, "status": "running"}))
            else:
                run_id = run["id"]
                if hello.rounds_planned is not None and run["rounds_planned"] is None:
                    conn.execute(update(runs).where(runs.c.id == run_id).values(rounds_planned=hello.rounds_planned))
            location = hello.location
            client_id = conn.execute(sql.upsert_client, {
                "run_id": run_id,
                "node_id": hello.node_id,
                "first_seen": now,
                "role": hello.role,
                "status": "online",
                "session": hello.session,
                "country_iso_code": location.country_iso_code,
                "region": location.region,
                "intensity_g_per_kwh": location.intensity_g_per_kwh,
                "intensity_source": location.intensity_source,
                "pue": location.pue,
                "hardware": hello.hardware.model_dump(exclude_none=True),
                "sdk_version": hello.sdk_version,
                "last_seen": now,
            }).scalar_one()
        self._last_seen[client_id] = now.timestamp()
        events.append(Event("client", run_id, {"node_id": hello.node_id, "role": hello.role, "status": "online"}))
        session = Session(
            run_id, client_id, hello.node_id, hello.role, hello.session,
            intensity_g_per_kwh=location.intensity_g_per_kwh, pue=location.pue,
            zone=zone_of(location.country_iso_code, location.region),
        )
        return session, events

    def apply(self, ops: Sequence[Op]) -> list[Event]:
        """Store a batch in one transaction; duplicates of ``(session, seq)`` are ignored."""
        events: list[Event] = []
        now = _now()
        now_s = now.timestamp()
        sql = self._sql
        sample_rows: list[dict[str, Any]] = []
        round_rows: list[dict[str, Any]] = []
        byes: list[tuple[Session, Bye]] = []
        sample_from: list[Session] = []
        round_from: list[Session] = []
        seen: dict[int, None] = {}  # client ids in arrival order
        for session, message in ops:
            seen[session.client_id] = None
            if isinstance(message, Sample):
                sample_from.append(session)
                sample_rows.append({
                    "run_id": session.run_id, "client_id": session.client_id, "session": session.session,
                    "seq": message.seq, "t": from_unix(message.t),
                    "cpu_w": message.cpu_w, "gpu_w": message.gpu_w, "ram_w": message.ram_w,
                })
            elif isinstance(message, Round):
                fields = message.model_dump(exclude={"type", "started_at"})
                start = message.started_at if message.started_at is not None else now_s - message.duration_s
                # The server charges each interval: PUE once, and the intensity of its hours if a
                # trace covers the party's zone, else the party's annual intensity.
                intensity = self.carbon.intensity(session.intensity_g_per_kwh, session.zone, start,
                                                  start + message.duration_s)
                fields["emissions_kg"] = message.energy_kwh * session.pue * intensity / 1000.0
                round_from.append(session)
                round_rows.append({
                    "run_id": session.run_id, "client_id": session.client_id, "session": session.session,
                    **fields, "intensity_g_per_kwh": intensity, "started_at": from_unix(message.started_at),
                    "reported_at": now,
                })
            elif isinstance(message, Bye):
                byes.append((session, message))
        last_seen = self._last_seen
        touched = [c for c in seen if now_s - last_seen.get(c, 0.0) >= LAST_SEEN_RESOLUTION_S]
        with self.engine.begin() as conn:
            if sample_rows:
                if sql.insert_sample_arrays is not None and len(sample_rows) >= ARRAYS_FROM:
                    arrays = {f"a_{c}": [row[c] for row in sample_rows] for c in _SAMPLE_COLUMNS}
                    stored = conn.execute(sql.insert_sample_arrays, arrays).all()
                else:
                    stored = conn.execute(sql.insert_samples, sample_rows).all()
                for who, row in _stored(sample_from, sample_rows, stored):
                    events.append(
                        Event(
                            "sample",
                            who.run_id,
                            {
                                "node_id": who.node_id,
                                "t": _iso_utc(row["t"]),
                                "cpu_w": row["cpu_w"],
                                "gpu_w": row["gpu_w"],
                                "ram_w": row["ram_w"],
                                "power_w": row["cpu_w"] + row["gpu_w"] + row["ram_w"],
                            },
                        )
                    )
            if round_rows:
                new_reports = _stored(round_from, round_rows, conn.execute(sql.insert_reports, round_rows).all())
                accumulate(conn, new_reports)
                for who, row in new_reports:
                    data = {k: v for k, v in row.items() if k not in ("run_id", "client_id", "session")}
                    data["started_at"] = iso(row["started_at"])
                    data["reported_at"] = iso(row["reported_at"])
                    events.append(Event("round", who.run_id, {"node_id": who.node_id, "role": who.role, **data}))
            if touched:
                conn.execute(sql.touch_clients, {"b_ids": touched, "b_now": now})
            for session, bye in byes:
                conn.execute(
                    update(clients).where(clients.c.id == session.client_id).values(status="finished", last_seen=now)
                )
                events.append(Event("client", session.run_id, {"node_id": session.node_id, "status": "finished"}))
                if self._run_is_over(conn, session, bye):
                    status = conn.execute(select(runs.c.status).where(runs.c.id == session.run_id)).scalar()
                    if status in ACTIVE:
                        # A run asked to stop ends "stopped"; one whose FL server failed, "failed";
                        # one that ran its course, "finished".
                        if status == "stopping":
                            final = "stopped"
                        elif session.role == "server" and (bye.reason or "").startswith("failed"):
                            final = "failed"
                        else:
                            final = "finished"
                        conn.execute(update(runs).where(runs.c.id == session.run_id).values(status=final, ended_at=now))
                        events.append(Event("run", session.run_id, {"id": session.run_id, "status": final}))
        if len(last_seen) > 100_000:  # clients of runs long over; the next batch of each writes again
            last_seen.clear()
        for client_id in touched:  # only once committed: a failed batch wrote nothing
            last_seen[client_id] = now_s
        return events

    @staticmethod
    def _run_is_over(conn: Any, session: Session, bye: Bye) -> bool:
        if session.role == "server":
            return bye.final
        # Without an FL server in the run, it is over when every client has said bye.
        others = conn.execute(
            select(func.count())
            .select_from(clients)
            .where(
                clients.c.run_id == session.run_id,
                (clients.c.role == "server") | (clients.c.status != "finished"),
            )
        ).scalar()
        return others == 0

    def disconnect(self, session: Session) -> list[Event]:
        """Mark a client offline when its socket closes without ``bye``."""
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(clients)
                .where(clients.c.id == session.client_id, clients.c.status == "online")
                .values(status="offline", last_seen=_now())
            ).rowcount
        if not changed:
            return []
        return [Event("client", session.run_id, {"node_id": session.node_id, "status": "offline"})]
