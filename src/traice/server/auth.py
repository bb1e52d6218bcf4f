"""Who may do what: an admin token for the dashboard, REST and control; worker tokens for reports.

Tokens are kept only as SHA-256 digests and compared in constant time (``hmac.compare_digest``
against every known digest, so neither timing nor the number of matches says how close a guess
was). They are never logged or echoed: errors name the rule that failed, not the token.

A server bound to loopback with no token configured is open, as a local tool should be; any
configured token turns its check on; a server on any other address must have both an admin and a
worker token (:func:`check_exposure`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Cookie the dashboard's sign-in page sets (HttpOnly, SameSite=Strict); REST and the dashboard socket accept it.
ADMIN_COOKIE = "traice_admin"


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class WorkerGrant:
    """What one worker token allows: a run name (None: any) and node ids (None: any)."""

    run: str | None = None
    nodes: frozenset[str] | None = None

    def refusal(self, run: str, node_id: str) -> str | None:
        """Why a worker may not report as ``node_id`` in ``run`` (None if it may)."""
        if self.run is not None and run != self.run:
            return f"this token may report for run {self.run!r} only, not {run!r}"
        if self.nodes is not None and node_id not in self.nodes:
            return f"this token may not report as node {node_id!r}"
        return None


ANY = WorkerGrant()


class Auth:
    """The server's tokens. ``Auth()`` (no tokens) lets everyone in: only for loopback."""

    def __init__(
        self,
        admin_token: str | None = None,
        worker_tokens: Iterable[str] = (),
        scoped: Iterable[tuple[bytes, WorkerGrant]] = (),
    ) -> None:
        self._admin = digest(admin_token) if admin_token else None
        self._workers: list[tuple[bytes, WorkerGrant]] = [(digest(t), ANY) for t in worker_tokens if t]
        self._workers += list(scoped)

    @property
    def admin_required(self) -> bool:
        return self._admin is not None

    @property
    def has_worker_tokens(self) -> bool:
        return bool(self._workers)

    @property
    def worker_required(self) -> bool:
        return bool(self._workers) or self._admin is not None

    def is_admin(self, token: str | None) -> bool:
        if self._admin is None:
            return True
        return token is not None and hmac.compare_digest(digest(token), self._admin)

    def worker_grant(self, token: str | None) -> WorkerGrant | None:
        """The grant ``token`` carries on the worker socket, or None if it carries none."""
        if not self.worker_required:
            return ANY
        if token is None:
            return None
        presented = digest(token)
        found: WorkerGrant | None = None
        for known, grant in self._workers:  # no early exit: every digest is compared
            if hmac.compare_digest(presented, known):
                found = grant
        if self._admin is not None and hmac.compare_digest(presented, self._admin):
            found = ANY  # the admin may report too (e.g. from a notebook)
        return found

    @classmethod
    def from_file(cls, path: Path, admin_token: str | None = None, worker_tokens: Iterable[str] = ()) -> Auth:
        """Read scoped worker tokens from a JSON list of ``{"token" | "sha256", "run"?, "nodes"?}``.

        ``sha256`` (hex of the token's SHA-256) keeps the secret itself out of the file.
        """
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the tokens file {path}: {exc}") from None
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of token entries")
        return cls(admin_token, worker_tokens, [_scoped_entry(path, i, e) for i, e in enumerate(entries)])


def _scoped_entry(path: Path, index: int, entry: Any) -> tuple[bytes, WorkerGrant]:
    where = f"{path}: entry {index}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected an object")
    unknown = set(entry) - {"token", "sha256", "run", "nodes"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    if ("token" in entry) == ("sha256" in entry):
        raise ValueError(f"{where}: give exactly one of 'token' or 'sha256'")
    if "token" in entry:
        if not isinstance(entry["token"], str) or len(entry["token"]) < 16:
            raise ValueError(f"{where}: a token must be a string of at least 16 characters")
        known = digest(entry["token"])
    else:
        try:
            known = bytes.fromhex(str(entry["sha256"]))
        except ValueError:
            known = b""
        if len(known) != 32:
            raise ValueError(f"{where}: 'sha256' must be 64 hex digits")
    run = entry.get("run")
    nodes = entry.get("nodes")
    if run is not None and not isinstance(run, str):
        raise ValueError(f"{where}: 'run' must be a string")
    if nodes is not None and not (isinstance(nodes, list) and all(isinstance(n, str) for n in nodes)):
        raise ValueError(f"{where}: 'nodes' must be a list of strings")
    return known, WorkerGrant(run, frozenset(nodes) if nodes is not None else None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, auth: Auth) -> None:
    """Refuse (ValueError, with the reason) to serve beyond loopback without tokens."""
    if is_loopback(host):
        return
    needed = (("--admin-token", auth.admin_required), ("--worker-token or --tokens-file", auth.has_worker_tokens))
    missing = [name for name, ok in needed if not ok]
    if missing:
        raise ValueError(
            f"refusing to listen on {host} without {' and '.join(missing)}: anyone who can reach this port "
            "could read every run, send reports and pause or stop the training. Set TRAICE_ADMIN_TOKEN and "
            "TRAICE_WORKER_TOKEN (or the flags), or listen on 127.0.0.1 only."
        )


def bearer(headers: Mapping[str, str], cookies: Mapping[str, str] | None = None) -> str | None:
    """The token a request carries: ``Authorization: Bearer ...``, else the dashboard's cookie."""
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if cookies:
        return cookies.get(ADMIN_COOKIE) or None
    return None
