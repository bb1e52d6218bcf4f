"""Carbon model: PUE and intensity source per party, the intensity charged per report,
and each run's accounting assumptions.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs: a batch rebuild of a parent table would cascade-delete its children on SQLite.
    op.add_column("runs", sa.Column("network_kwh_per_gb", sa.Float, nullable=False, server_default="0.01"))
    op.add_column("runs", sa.Column("carbon_model", sa.JSON))
    op.add_column("clients", sa.Column("intensity_source", sa.String(200)))
    op.add_column("clients", sa.Column("pue", sa.Float, nullable=False, server_default="1.0"))
    op.add_column("reports", sa.Column("intensity_g_per_kwh", sa.Float, nullable=False, server_default="0"))
    # Reports stored before this revision were charged their client's annual intensity.
    op.execute(
        "UPDATE reports SET intensity_g_per_kwh = "
        "(SELECT clients.intensity_g_per_kwh FROM clients WHERE clients.id = reports.client_id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("intensity_g_per_kwh")
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("pue")
        batch.drop_column("intensity_source")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("carbon_model")
        batch.drop_column("network_kwh_per_gb")
