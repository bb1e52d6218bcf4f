"""What one peer may cost the server: frame size, messages per second, connections per address."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from ..protocol import MAX_FRAME_BYTES


@dataclass(frozen=True)
class Limits:
    """Per-peer limits; each refusal is an ``error`` frame with its code, then a close."""

    #: Larger frames close the socket with 1009 (message too big).
    max_frame_bytes: int = MAX_FRAME_BYTES
    #: Sustained messages per second on one socket; ``burst_messages`` more may come at once
    #: (a worker resending its outbox after a reconnect). Over it: ``rate_limited``, close 1008.
    max_messages_per_s: float = 200.0
    burst_messages: int = 5000
    #: Open sockets (worker and dashboard) from one IP address. Over it: ``too_many_connections``,
    #: close 1013. A Flower simulation opens one per virtual client, all from one address.
    max_connections_per_address: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_messages_per_s", "burst_messages", "max_connections_per_address"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; one token per message."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class ConnectionCounter:
    """Open sockets per address (the event loop is single-threaded: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def acquire(self, address: str) -> bool:
        if self._open[address] >= self.limit:
            return False
        self._open[address] += 1
        return True

    def release(self, address: str) -> None:
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]
