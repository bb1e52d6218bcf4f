"""Alembic environment: the engine comes from ``traice.store.migrate``, never from an ini file."""

from __future__ import annotations

from alembic import context

from traice.store.models import metadata

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    if connection.dialect.name == "sqlite":
        # SQLite rebuilds a table to alter it; with foreign keys on, dropping the old table would
        # cascade-delete every row that refers to it. The pragma only works outside a transaction.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
