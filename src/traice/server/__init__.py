"""The TRAICE server: FastAPI app, worker and dashboard sockets, REST."""

from __future__ import annotations

from .app import create_app
from .runner import ServerThread, serve

__all__ = ["ServerThread", "create_app", "serve"]
