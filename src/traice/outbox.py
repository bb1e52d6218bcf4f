"""An outbox on disk, so a worker's unacknowledged reports survive a crash and a restart.

One SQLite file (the standard library's ``sqlite3``) holds, per worker session, its ``hello`` and
every message not yet acknowledged by the server. A restarted worker finds the previous sessions'
messages and delivers them under their own session before its new ones; the server stores each
``(session, seq)`` once, so what was sent just before the crash is not doubled either.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (session TEXT PRIMARY KEY, hello TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    session TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (session, seq)
);
"""


class OutboxInUse(RuntimeError):
    """Another live process uses this outbox file: sharing it would mix two workers' reports."""


class DiskOutbox:
    """Unacknowledged messages by session. Thread-safe; one process per file (enforced by a lock)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(f"{self.path}.lock", "a")  # noqa: SIM115 - held for the outbox's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise OutboxInUse(f"outbox {self.path} is in use by another process; give each worker its own") from None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # WAL + NORMAL: a committed report survives the process being killed (not a power cut mid-fsync).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def save_hello(self, session: str, hello_json: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?)", (session, hello_json))

    def add(self, session: str, seq: int, message: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO messages VALUES (?, ?, ?)", (session, seq, json.dumps(message, allow_nan=False))
            )

    def remove_upto(self, session: str, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM messages WHERE session = ? AND seq <= ?", (session, seq))

    def remove(self, session: str, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM messages WHERE session = ? AND seq = ?", (session, seq))

    def leftovers(self, current: str) -> list[tuple[str, list[dict[str, Any]]]]:
        """Earlier sessions with undelivered messages: ``(hello_json, messages in seq order)``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.session, s.hello, m.body FROM sessions s JOIN messages m ON m.session = s.session "
                "WHERE s.session != ? ORDER BY s.rowid, m.seq",
                (current,),
            ).fetchall()
            # Sessions with nothing left are done with.
            self._db.execute(
                "DELETE FROM sessions WHERE session != ? AND session NOT IN (SELECT session FROM messages)", (current,)
            )
        found: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        for session, hello, body in rows:
            found.setdefault(session, (hello, []))[1].append(json.loads(body))
        return list(found.values())

    def forget(self, session: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM messages WHERE session = ?", (session,))
            self._db.execute("DELETE FROM sessions WHERE session = ?", (session,))

    def pending(self, session: str) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM messages WHERE session = ?", (session,)).fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._lock_file.close()  # releases the flock
