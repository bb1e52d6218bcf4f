"""The storage contract, run against an SQLite file and a PostgreSQL database."""

from __future__ import annotations

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from traice.protocol import Bye, Hello, Location, Round, Sample
from traice.store import SqlStore, StoreError, normalize_database_url
from traice.store.base import Session
from traice.store.models import metadata


def _hello(run: str = "r", node: str = "n1", role: str = "client", run_id: int | None = None) -> Hello:
    return Hello(
        run=run,
        run_id=run_id,
        node_id=node,
        session=uuid.uuid4().hex,
        role=role,  # type: ignore[arg-type]
        location=Location(country_iso_code="FRA", intensity_g_per_kwh=56.0),
    )


def _round(seq: int, number: int, energy: float, **kw: object) -> Round:
    return Round(
        seq=seq, round=number, duration_s=kw.pop("duration_s", 1.0), cpu_energy_kwh=energy,  # type: ignore[arg-type]
        energy_kwh=energy, emissions_kg=energy * 0.056, **kw,  # type: ignore[arg-type]
    )


def _open(store: SqlStore, **kw: object) -> Session:
    session, _ = store.open(_hello(**kw))  # type: ignore[arg-type]
    return session


def test_hello_creates_a_run_and_later_hellos_join_it(store: SqlStore) -> None:
    a = _open(store, run="exp", node="a")
    b = _open(store, run="exp", node="b")
    other = _open(store, run="other", node="a")

    assert a.run_id == b.run_id
    assert other.run_id != a.run_id
    assert {c["node_id"] for c in store.clients(a.run_id)} == {"a", "b"}
    assert [r["name"] for r in store.list_runs()] == ["other", "exp"]


def test_hello_for_an_unknown_run_id_is_refused_and_stores_nothing(store: SqlStore) -> None:
    with pytest.raises(StoreError) as refused:
        store.open(_hello(run_id=4242))

    assert refused.value.code == "unknown_run"
    assert store.list_runs() == []


def test_a_resent_report_is_stored_once(store: SqlStore) -> None:
    s = _open(store)
    batch = [(s, _round(1, 1, 0.002)), (s, Sample(seq=2, t=1e9, cpu_w=10))]

    first = store.apply(batch)
    again = store.apply(batch)

    assert {e.kind for e in first} == {"round", "sample"}
    assert again == []
    assert store.get_run(s.run_id)["energy_kwh"] == pytest.approx(0.002)  # type: ignore[index]
    assert len(store.samples(s.run_id)) == 1


def test_rounds_aggregate_over_clients(store: SqlStore) -> None:
    a = _open(store, node="a")
    b = _open(store, node="b")
    store.apply(
        [
            (a, _round(1, 1, 0.001, duration_s=2.0, accuracy=0.5, loss=1.0, num_examples=100)),
            (b, _round(1, 1, 0.003, duration_s=5.0, accuracy=0.9, loss=0.2, num_examples=300)),
        ]
    )

    (row,) = store.rounds(a.run_id)

    assert row["clients"] == 2
    assert row["energy_kwh"] == pytest.approx(0.004)
    assert row["emissions_kg"] == pytest.approx(0.004 * 0.056)
    assert row["duration_s"] == pytest.approx(5.0)  # the slowest client
    assert row["accuracy"] == pytest.approx((0.5 * 100 + 0.9 * 300) / 400)  # weighted, not 0.7
    assert row["loss"] == pytest.approx((1.0 * 100 + 0.2 * 300) / 400)
    assert row["num_examples"] == 400


def test_train_and_evaluate_of_one_round_add_energy_and_keep_the_evaluated_accuracy(store: SqlStore) -> None:
    a = _open(store, node="a")
    store.apply(
        [
            (a, _round(1, 3, 0.002, duration_s=4.0, phase="train", num_examples=50)),
            (a, _round(2, 3, 0.001, duration_s=1.0, phase="evaluate", accuracy=0.8, num_examples=20)),
        ]
    )

    (row,) = store.rounds(a.run_id)

    assert row["round"] == 3
    assert row["energy_kwh"] == pytest.approx(0.003)
    assert row["duration_s"] == pytest.approx(5.0)
    assert row["accuracy"] == pytest.approx(0.8)


def test_gaps_in_round_numbers_and_clients_joining_mid_run(store: SqlStore) -> None:
    a = _open(store, node="a")
    store.apply([(a, _round(1, 1, 0.001)), (a, _round(2, 2, 0.001))])
    late = _open(store, node="late")
    store.apply([(a, _round(3, 5, 0.001)), (late, _round(1, 5, 0.002)), (late, _round(2, 9, 0.002))])

    rounds = {r["round"]: r for r in store.rounds(a.run_id)}
    clients = {c["node_id"]: c for c in store.clients(a.run_id)}

    assert sorted(rounds) == [1, 2, 5, 9]
    assert rounds[5]["clients"] == 2
    assert rounds[9]["clients"] == 1
    assert clients["late"]["rounds"] == 2
    assert store.get_run(a.run_id)["rounds"] == 4  # type: ignore[index]


def test_run_accuracy_is_the_latest_rounds_of_the_clients_without_an_fl_server(store: SqlStore) -> None:
    a = _open(store)
    store.apply([(a, _round(1, 1, 0.001, accuracy=0.4)), (a, _round(2, 2, 0.001, accuracy=0.7))])

    assert store.get_run(a.run_id)["accuracy"] == pytest.approx(0.7)  # type: ignore[index]


def test_server_role_energy_counts_but_its_accuracy_is_reported_apart(store: SqlStore) -> None:
    client = _open(store, node="c")
    fl_server = _open(store, node="fl-server", role="server")
    store.apply([(client, _round(1, 1, 0.001, accuracy=0.6)), (fl_server, _round(1, 1, 0.0005, accuracy=0.9))])

    (row,) = store.rounds(client.run_id)

    assert row["clients"] == 1
    assert row["energy_kwh"] == pytest.approx(0.0015)
    assert row["accuracy"] == pytest.approx(0.6)
    assert row["server_accuracy"] == pytest.approx(0.9)
    assert store.get_run(client.run_id)["clients"] == 1  # type: ignore[index]


def test_run_finishes_when_every_client_says_bye(store: SqlStore) -> None:
    a = _open(store, node="a")
    b = _open(store, node="b")

    store.apply([(a, Bye(seq=9))])
    assert store.get_run(a.run_id)["status"] == "running"  # type: ignore[index]
    events = store.apply([(b, Bye(seq=9))])

    assert store.get_run(a.run_id)["status"] == "finished"  # type: ignore[index]
    assert any(e.kind == "run" and e.data["status"] == "finished" for e in events)
    assert _open(store, node="a").run_id != a.run_id  # a new hello starts a new run


def test_with_an_fl_server_only_its_final_bye_ends_the_run(store: SqlStore) -> None:
    c = _open(store, node="c")
    s = _open(store, node="srv", role="server")

    store.apply([(c, Bye(seq=5))])
    assert store.get_run(c.run_id)["status"] == "running"  # type: ignore[index]
    store.apply([(s, Bye(seq=5, final=True))])

    assert store.get_run(c.run_id)["status"] == "finished"  # type: ignore[index]


def test_disconnect_marks_a_client_offline(store: SqlStore) -> None:
    a = _open(store)

    events = store.disconnect(a)

    assert [c["status"] for c in store.clients(a.run_id)] == ["offline"]
    assert events[0].data["status"] == "offline"
    assert store.get_run(a.run_id)["clients_online"] == 0  # type: ignore[index]


def test_samples_filter_by_time_and_node(store: SqlStore) -> None:
    a = _open(store, node="a")
    b = _open(store, node="b")
    store.apply([(a, Sample(seq=1, t=100.0, cpu_w=1)), (a, Sample(seq=2, t=200.0, cpu_w=2)), (b, Sample(seq=1, t=150.0, ram_w=3))])

    assert [s["power_w"] for s in store.samples(a.run_id)] == [1, 3, 2]
    assert [s["power_w"] for s in store.samples(a.run_id, since=120.0)] == [3, 2]
    assert [s["node_id"] for s in store.samples(a.run_id, node_id="b")] == ["b"]
    assert len(store.samples(a.run_id, limit=2)) == 2


def test_a_batch_is_all_or_nothing(store: SqlStore) -> None:
    a = _open(store)
    ghost = Session(run_id=a.run_id, client_id=987654, node_id="ghost", role="client", session="g" * 32)

    with pytest.raises(Exception):
        store.apply([(a, _round(1, 1, 0.001)), (ghost, _round(1, 1, 0.001))])

    assert store.rounds(a.run_id) == []


def test_migrations_match_the_models(store: SqlStore) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)

    assert diff == []


def test_reopening_a_database_keeps_its_data(database_url: str) -> None:
    first = SqlStore(database_url)
    run_id = first.open(_hello(run="kept"))[0].run_id
    first.close()

    second = SqlStore(database_url)  # runs the migrations again: must be a no-op

    assert second.get_run(run_id)["name"] == "kept"  # type: ignore[index]
    second.close()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h:5432/db", "postgresql+psycopg://u@h:5432/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x/traice.db", "sqlite:///x/traice.db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_database_urls_people_write(given: str, expected: str) -> None:
    assert normalize_database_url(given) == expected


def test_a_bare_path_is_an_sqlite_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert normalize_database_url(str(tmp_path / "t.db")) == f"sqlite:///{tmp_path / 't.db'}"


def test_upgrading_an_old_database_keeps_every_report(database_url: str) -> None:
    from traice.store.migrate import upgrade

    old = SqlStore(database_url, migrate=False)
    upgrade(old.engine, "0001")
    with old.engine.begin() as conn:  # a database as the first release wrote it
        conn.execute(text("INSERT INTO runs (id, name, status, started_at) VALUES (1, 'old', 'finished', '2026-01-01')"))
        conn.execute(text(
            "INSERT INTO clients (id, run_id, node_id, role, status, session, intensity_g_per_kwh, hardware, "
            "first_seen, last_seen) VALUES (1, 1, 'w1', 'client', 'finished', 's', 56.0, '{}', '2026-01-01', '2026-01-01')"
        ))
        conn.execute(text(
            "INSERT INTO reports (run_id, client_id, session, seq, round, phase, reported_at, duration_s, "
            "cpu_energy_kwh, gpu_energy_kwh, ram_energy_kwh, energy_kwh, emissions_kg, metrics) "
            "VALUES (1, 1, 's', 1, 1, 'round', '2026-01-01', 1.0, 0.002, 0, 0, 0.002, 0.000112, '{}')"
        ))
    old.close()

    upgraded = SqlStore(database_url)  # migrates to head

    run = upgraded.get_run(1)
    assert run is not None and run["rounds"] == 1
    assert run["energy_kwh"] == pytest.approx(0.002)
    assert run["emissions_kg"] == pytest.approx(0.002 * 56.0 / 1000)
    upgraded.close()


def test_a_run_whose_fl_server_failed_is_recorded_as_failed(store: SqlStore) -> None:
    c = _open(store, node="c")
    s = _open(store, node="srv", role="server")

    store.apply([(s, Bye(seq=3, final=True, reason="failed: RuntimeError"))])

    assert store.get_run(c.run_id)["status"] == "failed"  # type: ignore[index]


def test_run_accuracy_prefers_the_global_models(store: SqlStore) -> None:
    c = _open(store, node="c")
    s = _open(store, node="srv", role="server")
    store.apply([(c, _round(1, 1, 0.001, accuracy=0.75)), (s, _round(1, 1, 0.0001, accuracy=0.71))])

    assert store.get_run(c.run_id)["accuracy"] == pytest.approx(0.71)  # type: ignore[index]


def test_standing_commands_tell_a_joiner_its_own_exclusion_and_the_fl_server_every_one(store: SqlStore) -> None:
    a, b, c = (_open(store, node=n) for n in ("a", "b", "c"))
    run_id = a.run_id
    store.request_command(run_id, "exclude", "a")
    store.request_command(run_id, "exclude", "b")
    store.request_command(run_id, "include", "b")
    store.request_command(run_id, "exclude", "b")  # the latest exclude of b is the one in force
    store.request_command(run_id, "pause")

    for_a = store.standing_commands(run_id, "a")
    for_c = store.standing_commands(run_id, "c")
    for_server = store.standing_commands(run_id)

    assert [(x["action"], x["node_id"]) for x in for_a] == [("pause", None), ("exclude", "a")]
    assert [(x["action"], x["node_id"]) for x in for_c] == [("pause", None)]
    assert [(x["action"], x["node_id"], x["id"]) for x in for_server] == [
        ("pause", None, 5), ("exclude", "a", 1), ("exclude", "b", 4),
    ]
    assert store.standing_commands(run_id + 1, "a") == []
    assert b.run_id == c.run_id == run_id


@pytest.mark.parametrize("size", [3, 40])  # PostgreSQL takes the bigger batch as arrays (ARRAYS_FROM)
def test_a_sample_twice_in_one_batch_is_stored_once(store: SqlStore, size: int) -> None:
    s = _open(store)
    store.apply([(s, Sample(seq=1, t=1e9, cpu_w=1))])
    batch = [(s, Sample(seq=n, t=1e9 + n, cpu_w=n)) for n in range(1, size)]

    events = store.apply([*batch, batch[-1]])

    assert [e.data["cpu_w"] for e in events] == list(range(2, size))
    assert [x["cpu_w"] for x in store.samples(s.run_id)] == list(range(1, size))
