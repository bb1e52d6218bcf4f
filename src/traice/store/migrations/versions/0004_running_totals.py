"""Running totals per (round, client) and per round, filled from the reports already stored.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SUMS = ("duration_s", "cpu_energy_kwh", "gpu_energy_kwh", "ram_energy_kwh", "bytes_up", "bytes_up_g", "bytes_down",
        "bytes_down_g", "acc_num", "acc_den", "loss_num", "loss_den")


def _sums() -> list[sa.Column]:
    return [sa.Column(name, sa.Float, nullable=False, server_default="0") for name in SUMS]


def upgrade() -> None:
    op.create_table(
        "round_clients",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("round", sa.Integer, primary_key=True),
        sa.Column("client_id", sa.Integer, sa.ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("role", sa.String(20), nullable=False),
        *_sums(),
        sa.Column("energy_kwh", sa.Float, nullable=False, server_default="0"),
        sa.Column("emissions_kg", sa.Float, nullable=False, server_default="0"),
        sa.Column("num_examples", sa.Integer),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_round_clients_client", "round_clients", ["client_id", "round"])
    op.create_table(
        "round_totals",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("round", sa.Integer, primary_key=True),
        sa.Column("clients", sa.Integer, nullable=False, server_default="0"),
        *_sums(),
        *[sa.Column(name, sa.Float, nullable=False, server_default="0") for name in (
            "compute_energy_kwh", "compute_emissions_kg", "server_energy_kwh", "server_emissions_kg",
            "server_acc_num", "server_acc_den", "server_loss_num", "server_loss_den")],
        sa.Column("num_examples", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
    )
    weight = "COALESCE(r.num_examples, 1)"
    op.execute(f"""
        INSERT INTO round_clients (run_id, round, client_id, role, duration_s, cpu_energy_kwh, gpu_energy_kwh,
            ram_energy_kwh, bytes_up, bytes_up_g, bytes_down, bytes_down_g, acc_num, acc_den, loss_num, loss_den,
            energy_kwh, emissions_kg, num_examples, started_at, ended_at)
        SELECT r.run_id, r.round, r.client_id, MIN(c.role), SUM(r.duration_s), SUM(r.cpu_energy_kwh),
            SUM(r.gpu_energy_kwh), SUM(r.ram_energy_kwh), SUM(COALESCE(r.bytes_up, 0)),
            SUM(COALESCE(r.bytes_up, 0) * r.intensity_g_per_kwh), SUM(COALESCE(r.bytes_down, 0)),
            SUM(COALESCE(r.bytes_down, 0) * r.intensity_g_per_kwh),
            COALESCE(SUM(CASE WHEN r.accuracy IS NOT NULL THEN r.accuracy * {weight} END), 0),
            COALESCE(SUM(CASE WHEN r.accuracy IS NOT NULL THEN {weight} END), 0),
            COALESCE(SUM(CASE WHEN r.loss IS NOT NULL THEN r.loss * {weight} END), 0),
            COALESCE(SUM(CASE WHEN r.loss IS NOT NULL THEN {weight} END), 0),
            SUM(r.energy_kwh * c.pue), SUM(r.emissions_kg), MAX(r.num_examples),
            MIN(COALESCE(r.started_at, r.reported_at)), MAX(r.reported_at)
        FROM reports r JOIN clients c ON c.id = r.client_id
        GROUP BY r.run_id, r.round, r.client_id
    """)
    client = "rc.role = 'client'"
    op.execute(f"""
        INSERT INTO round_totals (run_id, round, clients, duration_s, cpu_energy_kwh, gpu_energy_kwh, ram_energy_kwh,
            bytes_up, bytes_up_g, bytes_down, bytes_down_g, acc_num, acc_den, loss_num, loss_den,
            compute_energy_kwh, compute_emissions_kg, server_energy_kwh, server_emissions_kg,
            server_acc_num, server_acc_den, server_loss_num, server_loss_den, num_examples, started_at, ended_at)
        SELECT rc.run_id, rc.round, SUM(CASE WHEN {client} THEN 1 ELSE 0 END),
            COALESCE(MAX(CASE WHEN {client} THEN rc.duration_s END), 0),
            SUM(rc.cpu_energy_kwh), SUM(rc.gpu_energy_kwh), SUM(rc.ram_energy_kwh),
            SUM(CASE WHEN {client} THEN rc.bytes_up ELSE 0 END), SUM(CASE WHEN {client} THEN rc.bytes_up_g ELSE 0 END),
            SUM(CASE WHEN {client} THEN rc.bytes_down ELSE 0 END),
            SUM(CASE WHEN {client} THEN rc.bytes_down_g ELSE 0 END),
            SUM(CASE WHEN {client} THEN rc.acc_num ELSE 0 END), SUM(CASE WHEN {client} THEN rc.acc_den ELSE 0 END),
            SUM(CASE WHEN {client} THEN rc.loss_num ELSE 0 END), SUM(CASE WHEN {client} THEN rc.loss_den ELSE 0 END),
            SUM(CASE WHEN {client} THEN rc.energy_kwh ELSE 0 END),
            SUM(CASE WHEN {client} THEN rc.emissions_kg ELSE 0 END),
            SUM(CASE WHEN {client} THEN 0 ELSE rc.energy_kwh END),
            SUM(CASE WHEN {client} THEN 0 ELSE rc.emissions_kg END),
            SUM(CASE WHEN {client} THEN 0 ELSE rc.acc_num END), SUM(CASE WHEN {client} THEN 0 ELSE rc.acc_den END),
            SUM(CASE WHEN {client} THEN 0 ELSE rc.loss_num END), SUM(CASE WHEN {client} THEN 0 ELSE rc.loss_den END),
            SUM(CASE WHEN {client} THEN COALESCE(rc.num_examples, 0) ELSE 0 END),
            MIN(rc.started_at), MAX(rc.ended_at)
        FROM round_clients rc
        GROUP BY rc.run_id, rc.round
    """)


def downgrade() -> None:
    op.drop_table("round_totals")
    op.drop_table("round_clients")
