"""Storage of runs, clients, round reports and live samples (SQLAlchemy: SQLite or PostgreSQL)."""

from __future__ import annotations

from .base import Store, StoreError
from .sql import SqlStore, normalize_database_url

__all__ = ["SqlStore", "Store", "StoreError", "normalize_database_url"]
