"""The tables. Alembic migrations in ``migrations/`` create them; a test checks the two agree."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    false,
)

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, index=True),
    Column("status", String(20), nullable=False),  # running | paused | stopping | stopped | finished
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    Column("rounds_planned", Integer),
    Column("network_kwh_per_gb", Float, nullable=False, server_default="0.01"),
    Column("carbon_model", JSON),  # the assumptions this run was accounted with
)

clients = Table(
    "clients",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("node_id", String(200), nullable=False),
    Column("role", String(20), nullable=False),  # client | server
    Column("status", String(20), nullable=False),  # online | offline | finished
    Column("session", String(64), nullable=False),
    Column("country_iso_code", String(3)),
    Column("region", String(100)),
    Column("intensity_g_per_kwh", Float, nullable=False),
    Column("intensity_source", String(200)),
    Column("pue", Float, nullable=False, server_default="1.0"),
    Column("hardware", JSON, nullable=False),
    Column("sdk_version", String(50)),
    Column("excluded", Boolean, nullable=False, server_default=false()),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    UniqueConstraint("run_id", "node_id", name="uq_clients_run_node"),
)

reports = Table(
    "reports",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("client_id", Integer, ForeignKey("clients.id", ondelete="CASCADE"), nullable=False),
    Column("session", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("round", Integer, nullable=False),
    Column("phase", String(20), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("reported_at", DateTime(timezone=True), nullable=False),
    Column("duration_s", Float, nullable=False),
    Column("cpu_energy_kwh", Float, nullable=False),
    Column("gpu_energy_kwh", Float, nullable=False),
    Column("ram_energy_kwh", Float, nullable=False),
    Column("energy_kwh", Float, nullable=False),  # measured, before PUE
    Column("emissions_kg", Float, nullable=False),  # of the measured energy, PUE and intensity applied
    Column("intensity_g_per_kwh", Float, nullable=False, server_default="0"),  # charged for this interval
    Column("accuracy", Float),
    Column("loss", Float),
    Column("num_examples", Integer),
    Column("bytes_up", BigInteger),
    Column("bytes_down", BigInteger),
    Column("metrics", JSON, nullable=False),
    UniqueConstraint("session", "seq", name="uq_reports_session_seq"),
    Index("ix_reports_run_round", "run_id", "round"),
)

samples = Table(
    "samples",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("client_id", Integer, ForeignKey("clients.id", ondelete="CASCADE"), nullable=False),
    Column("session", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("t", DateTime(timezone=True), nullable=False),
    Column("cpu_w", Float, nullable=False),
    Column("gpu_w", Float, nullable=False),
    Column("ram_w", Float, nullable=False),
    UniqueConstraint("session", "seq", name="uq_samples_session_seq"),
    Index("ix_samples_run_t", "run_id", "t"),
)

commands = Table(
    "commands",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("node_id", String(200)),  # None: the whole run
    Column("action", String(20), nullable=False),  # pause | resume | stop | exclude | include
    Column("status", String(20), nullable=False),  # requested | acknowledged | done | failed
    Column("source", String(100), nullable=False),  # "user" or "rule:<id>"
    Column("detail", String(500)),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

rules = Table(
    "rules",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("kind", String(50), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("window_rounds", Integer),
    Column("level", String(20), nullable=False),  # info | warning | critical
    Column("action", String(20), nullable=False),  # none | pause | stop
    Column("fired_at", DateTime(timezone=True)),
    Column("fired_value", Float),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Running totals, kept up to date as reports arrive (store/totals.py), so that reading a run of
# 1,000 clients and 500 rounds sums hundreds of rows, not a million reports.
_SUMS = (
    "duration_s", "cpu_energy_kwh", "gpu_energy_kwh", "ram_energy_kwh",
    "bytes_up", "bytes_up_g", "bytes_down", "bytes_down_g",  # *_g: bytes x g/kWh, for network emissions
    "acc_num", "acc_den", "loss_num", "loss_den",  # accuracy and loss weighted by num_examples
)

round_clients = Table(
    "round_clients",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("client_id", Integer, ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True),
    Column("role", String(20), nullable=False),
    *[Column(name, Float, nullable=False, server_default="0") for name in _SUMS],
    Column("energy_kwh", Float, nullable=False, server_default="0"),  # measured x PUE
    Column("emissions_kg", Float, nullable=False, server_default="0"),
    Column("num_examples", Integer),
    Column("started_at", DateTime(timezone=True)),
    Column("ended_at", DateTime(timezone=True)),
    Index("ix_round_clients_client", "client_id", "round"),
)

round_totals = Table(
    "round_totals",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("clients", Integer, nullable=False, server_default="0"),
    *[Column(name, Float, nullable=False, server_default="0") for name in _SUMS],
    Column("compute_energy_kwh", Float, nullable=False, server_default="0"),
    Column("compute_emissions_kg", Float, nullable=False, server_default="0"),
    Column("server_energy_kwh", Float, nullable=False, server_default="0"),
    Column("server_emissions_kg", Float, nullable=False, server_default="0"),
    Column("server_acc_num", Float, nullable=False, server_default="0"),
    Column("server_acc_den", Float, nullable=False, server_default="0"),
    Column("server_loss_num", Float, nullable=False, server_default="0"),
    Column("server_loss_den", Float, nullable=False, server_default="0"),
    Column("num_examples", Integer, nullable=False, server_default="0"),
    Column("started_at", DateTime(timezone=True)),
    Column("ended_at", DateTime(timezone=True)),
)
