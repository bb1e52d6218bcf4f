"""TRAICE: real-time energy and carbon tracking for federated learning."""

from __future__ import annotations

__version__ = "0.1.0"

from .client import RoundReport, TraiceClient  # noqa: E402  (client reads __version__)

__all__ = ["RoundReport", "TraiceClient", "__version__"]
