"""Runs, clients, round reports and live samples.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("rounds_planned", sa.Integer),
    )
    op.create_index("ix_runs_name", "runs", ["name"])
    op.create_table(
        "clients",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("node_id", sa.String(200), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("session", sa.String(64), nullable=False),
        sa.Column("country_iso_code", sa.String(3)),
        sa.Column("region", sa.String(100)),
        sa.Column("intensity_g_per_kwh", sa.Float, nullable=False),
        sa.Column("hardware", sa.JSON, nullable=False),
        sa.Column("sdk_version", sa.String(50)),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("run_id", "node_id", name="uq_clients_run_node"),
    )
    op.create_table(
        "reports",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("client_id", sa.Integer, sa.ForeignKey("clients.id", ondelete="CASCADE"), nullable=False),
        sa.Column("session", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("phase", sa.String(20), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_s", sa.Float, nullable=False),
        sa.Column("cpu_energy_kwh", sa.Float, nullable=False),
        sa.Column("gpu_energy_kwh", sa.Float, nullable=False),
        sa.Column("ram_energy_kwh", sa.Float, nullable=False),
        sa.Column("energy_kwh", sa.Float, nullable=False),
        sa.Column("emissions_kg", sa.Float, nullable=False),
        sa.Column("accuracy", sa.Float),
        sa.Column("loss", sa.Float),
        sa.Column("num_examples", sa.Integer),
        sa.Column("bytes_up", sa.BigInteger),
        sa.Column("bytes_down", sa.BigInteger),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.UniqueConstraint("session", "seq", name="uq_reports_session_seq"),
    )
    op.create_index("ix_reports_run_round", "reports", ["run_id", "round"])
    op.create_table(
        "samples",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("client_id", sa.Integer, sa.ForeignKey("clients.id", ondelete="CASCADE"), nullable=False),
        sa.Column("session", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("t", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cpu_w", sa.Float, nullable=False),
        sa.Column("gpu_w", sa.Float, nullable=False),
        sa.Column("ram_w", sa.Float, nullable=False),
        sa.UniqueConstraint("session", "seq", name="uq_samples_session_seq"),
    )
    op.create_index("ix_samples_run_t", "samples", ["run_id", "t"])


def downgrade() -> None:
    op.drop_table("samples")
    op.drop_table("reports")
    op.drop_table("clients")
    op.drop_table("runs")
