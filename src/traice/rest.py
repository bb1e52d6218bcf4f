"""Client side of the REST API, shared by the CLI commands that read from or control a server."""

from __future__ import annotations

import os


def admin_headers() -> dict[str, str]:
    """``Authorization`` for a server started with an admin token, from ``TRAICE_ADMIN_TOKEN``."""
    token = os.environ.get("TRAICE_ADMIN_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}
