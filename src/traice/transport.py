"""The worker's link to the server: a background thread, a bounded outbox, acks and resends.

Training never waits on the network: :meth:`Transport.send` only appends to the outbox.
The thread connects, says ``hello``, sends what is pending and drops what the server
acknowledges. After a reconnect every unacknowledged message is sent again; the server
stores each ``(session, seq)`` once, so nothing is lost or doubled.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from . import protocol
from .outbox import DiskOutbox
from .protocol import Ack, Command, Error, Hello

log = logging.getLogger("traice")

DEFAULT_PORT = 3000
WORKER_PATH = "/ws/worker"


def worker_socket_url(server_url: str) -> str:
    """Turn what users write (``http://h:3000``, ``wss://h``, ``localhost``, ``10.0.0.5:3000``)
    into the worker socket URL (``ws://h:3000/ws/worker``)."""
    raw = server_url.strip()
    if not raw:
        raise ValueError("server_url is empty")
    bare = "://" not in raw
    parts = urlsplit("ws://" + raw if bare else raw)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"unsupported scheme in server_url {server_url!r}: use http(s):// or ws(s)://")
    if not parts.hostname:
        raise ValueError(f"no host in server_url {server_url!r}")
    # A bare host means a TRAICE server on its default port; an explicit scheme keeps its own.
    netloc = f"{parts.netloc}:{DEFAULT_PORT}" if bare and parts.port is None else parts.netloc
    path = parts.path.rstrip("/")
    if not path.endswith(WORKER_PATH):
        path = path + WORKER_PATH
    return urlunsplit((scheme, netloc, path, parts.query, ""))


#: Refusals after which the server closes the socket; the worker waits out its backoff before retrying.
CLOSING_REFUSALS = frozenset({"rate_limited", "too_many_connections", "unauthorized", "forbidden"})


class _Refused(OSError):
    """The server turned this connection away; retry after a backoff."""


class Transport:
    """Delivers worker messages at least once; the server makes it exactly once."""

    def __init__(
        self,
        url: str,
        hello: Callable[[], Hello],
        *,
        token: str | None = None,
        outbox_max: int = 10_000,
        on_command: Callable[[Command], None] | None = None,
        on_run_id: Callable[[int], None] | None = None,
        connect_timeout_s: float = 5.0,
        max_backoff_s: float = 10.0,
        outbox_path: str | Path | None = None,
        _disk: DiskOutbox | None = None,
    ) -> None:
        self.url = url
        self._hello = hello
        self._token = token
        self._outbox_max = outbox_max
        self._on_command = on_command
        self._on_run_id = on_run_id
        self._connect_timeout_s = connect_timeout_s
        self._max_backoff_s = max_backoff_s

        lock = threading.RLock()
        # Two conditions on one lock, so that an ack wakes only who waits for acks (flush), not the
        # writer, which waits for a report to send, close, or its reader's failure.
        self._cond = threading.Condition(lock)
        self._acked = threading.Condition(lock)
        self._pending: OrderedDict[int, dict[str, Any]] = OrderedDict()  # seq -> message, unacked
        self._next_seq = 1
        self._send_from = 1  # lowest seq not yet written on the current connection
        self._closing = False
        self._thread: threading.Thread | None = None
        self._warned_down = False
        self._dropped = 0
        self.connected = False
        self.errors: list[Error] = []  # refusals by the server, most recent last (bounded)
        # With an outbox on disk every unacked message is also written there, and an earlier
        # process's leftovers are delivered (under their own session) before this one's messages.
        self._owns_disk = _disk is None and outbox_path is not None
        self._disk = _disk if _disk is not None else (DiskOutbox(outbox_path) if outbox_path is not None else None)
        self._session: str | None = None
        self._last_logged: str | None = None

    # ---------------------------------------------------------------- training-thread API

    def start(self) -> None:
        if self._disk is not None:
            with self._cond:
                self._remember_hello()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="traice-transport", daemon=True)
            self._thread.start()

    def send(self, message: dict[str, Any]) -> int:
        """Queue a message (without ``seq``); returns its sequence number. Never blocks on I/O."""
        with self._cond:
            seq = self._next_seq
            self._next_seq += 1
            message["seq"] = seq
            self._pending[seq] = message
            if self._disk is not None:
                if self._session is None:
                    self._remember_hello()
                self._disk.add(self._session, seq, message)  # type: ignore[arg-type]
            if len(self._pending) > self._outbox_max:
                self._drop_one()
                self._acked.notify_all()  # a dropped report counts as done for flush()
            self._cond.notify_all()
            return seq

    @property
    def unreachable(self) -> bool:
        """True after a failed connection attempt, until a connection succeeds."""
        return self._warned_down

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def flush(self, timeout_s: float) -> bool:
        """Wait until the server has acknowledged everything queued so far."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            last = self._next_seq - 1
            while any(seq <= last for seq in self._pending):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._acked.wait(remaining)
            return True

    def close(self, timeout_s: float = 10.0) -> bool:
        """Flush (bounded by ``timeout_s``), then stop the thread. Returns True if all was delivered."""
        delivered = self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if not delivered:
            kept = f"; they are kept in {self._disk.path} for the next start" if self._disk is not None else ""
            log.warning(
                "TRAICE: %d report(s) could not be delivered to %s before stop%s", self.pending(), self.url, kept
            )
        if self._owns_disk and self._disk is not None:
            self._disk.close()
        return delivered

    # ---------------------------------------------------------------- the thread

    def _drop_one(self) -> None:
        # Live samples are the cheapest loss; round reports go only when nothing else is left.
        victim = next((s for s, m in self._pending.items() if m.get("type") == "sample"), None)
        if victim is None:
            victim = next(iter(self._pending))
        del self._pending[victim]
        if self._disk is not None and self._session is not None:
            self._disk.remove(self._session, victim)
        self._dropped += 1
        if self._dropped == 1 or self._dropped % 1000 == 0:
            log.warning(
                "TRAICE: outbox full (%d messages); dropped %d so far, oldest live samples first",
                self._outbox_max,
                self._dropped,
            )

    def _remember_hello(self) -> None:
        hello = self._hello()
        self._session = hello.session
        assert self._disk is not None
        self._disk.save_hello(hello.session, protocol.dumps(hello))

    def _deliver_leftovers(self) -> None:
        """Send what an earlier process left in the disk outbox, one old session at a time."""
        assert self._disk is not None and self._session is not None
        for hello_json, messages in self._disk.leftovers(self._session):
            old = Hello.model_validate_json(hello_json)
            log.warning("TRAICE: sending %d report(s) left in %s by an earlier run of this worker",
                        len(messages), self._disk.path)
            courier = Transport(self.url, lambda old=old: old, token=self._token, outbox_max=len(messages) + 1,
                                connect_timeout_s=self._connect_timeout_s, max_backoff_s=self._max_backoff_s,
                                _disk=self._disk)
            courier._session = old.session
            courier._pending.update((m["seq"], m) for m in messages)
            courier._next_seq = messages[-1]["seq"] + 1
            courier._thread = threading.Thread(target=courier._run, name="traice-outbox", daemon=True)
            courier._thread.start()
            while courier.pending() and not self._closing:
                courier.flush(0.5)
            courier.close(timeout_s=0)
            if courier.pending() == 0:
                self._disk.forget(old.session)
            if self._closing:
                return

    def _run(self) -> None:
        if self._disk is not None and self._owns_disk:
            self._deliver_leftovers()
        backoff = 0.25
        while True:
            with self._cond:
                if self._closing:
                    return
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
            try:
                with connect(
                    self.url,
                    open_timeout=self._connect_timeout_s,
                    additional_headers=headers,
                    max_size=protocol.MAX_FRAME_BYTES,
                    close_timeout=1.0,
                ) as ws:
                    self._greet(ws)
                    backoff = 0.25
                    if self._warned_down:
                        log.warning("TRAICE: connected to %s; sending %d pending report(s)", self.url, self.pending())
                        self._warned_down = False
                    self._serve(ws)
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError, ConnectionClosed, protocol.ProtocolError) as exc:
                closed_for = exc.rcvd.reason if isinstance(exc, ConnectionClosed) and exc.rcvd is not None else None
                if closed_for in CLOSING_REFUSALS:
                    # The close names the refusal too: its error frame may not have been read.
                    self._record_error(Error(code=str(closed_for), message=f"closed by the server: {closed_for}"))
                    exc = _Refused(closed_for)
                if isinstance(exc, _Refused):
                    pass  # logged when the refusal arrived
                elif self.connected:
                    log.debug("TRAICE: connection to %s lost: %s", self.url, exc)
                elif not self._warned_down:
                    log.warning(
                        "TRAICE: server %s unreachable (%s); training goes on, reports are kept "
                        "(up to %d) and sent when it is back",
                        self.url,
                        exc,
                        self._outbox_max,
                    )
                    self._warned_down = True
                was_connected, self.connected = self.connected, False
                if not was_connected or isinstance(exc, _Refused):
                    self._sleep(backoff * (0.5 + random.random()))  # jitter spreads a fleet's retries
                    backoff = min(backoff * 2, self._max_backoff_s)

    def _sleep(self, seconds: float) -> None:
        """Back off for ``seconds``: a new report (which notifies) must not cut it short, only close()."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._closing and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    def _greet(self, ws: ClientConnection) -> None:
        ws.send(protocol.dumps(self._hello()))
        reply = protocol.parse_server_message(ws.recv(timeout=self._connect_timeout_s))
        if isinstance(reply, Error):
            self._record_error(reply)
            raise _Refused(f"server refused hello: {reply.code}")
        if isinstance(reply, Ack) and reply.run_id is not None and self._on_run_id:
            self._on_run_id(reply.run_id)
        with self._cond:
            if self._disk is not None and self._owns_disk:
                self._remember_hello()  # now with the run id, so a restart rejoins this very run
            self._send_from = next(iter(self._pending), self._next_seq)
        self.connected = True
        self._last_logged = None

    def _serve(self, ws: ClientConnection) -> None:
        """Write what is pending as soon as it is queued; a reader thread handles the server's frames.

        Nothing polls: the writer sleeps on the outbox's condition until ``send``, ``close`` or the
        reader wakes it, so a report leaves at once and an idle worker costs no wakeups.
        """
        failed: list[BaseException] = []

        def read() -> None:
            try:
                while True:
                    self._handle(ws.recv())
            except BaseException as exc:  # noqa: BLE001 - handed to the writer, which reconnects or stops
                with self._cond:
                    failed.append(exc)
                    self._cond.notify_all()

        reader = threading.Thread(target=read, name="traice-transport-reader", daemon=True)
        reader.start()
        try:
            while True:
                with self._cond:
                    while not (self._closing or failed or self._unsent()):
                        self._cond.wait()
                    if failed:
                        raise failed[0]
                    if self._closing:
                        return
                    batch: list[dict[str, Any]] = []
                    for seq, message in self._pending.items():
                        if seq >= self._send_from:
                            batch.append(message)
                            if len(batch) >= 200:
                                break
                    self._send_from = batch[-1]["seq"] + 1
                for message in batch:
                    ws.send(protocol.json_dumps(message))
        finally:
            ws.close()
            reader.join(timeout=2.0)

    def _unsent(self) -> bool:
        """True if a pending message has not been written on this connection (call under the lock)."""
        return bool(self._pending) and next(reversed(self._pending)) >= self._send_from

    def _handle(self, frame: str | bytes) -> None:
        try:
            message = protocol.parse_server_message(frame)
        except protocol.ProtocolError as exc:
            log.debug("TRAICE: unreadable server frame: %s", exc)
            return
        if isinstance(message, Ack):
            with self._cond:
                for seq in [s for s in self._pending if s <= message.seq]:
                    del self._pending[seq]
                if self._disk is not None and self._session is not None:
                    self._disk.remove_upto(self._session, message.seq)
                self._acked.notify_all()
        elif isinstance(message, Error):
            self._record_error(message)
            if message.code in CLOSING_REFUSALS:
                # Nothing after the refused frame was read: everything unacked is resent later.
                raise _Refused(message.code)
            if message.seq is not None:
                with self._cond:
                    self._pending.pop(message.seq, None)  # resending a refused message cannot help
                    if self._disk is not None and self._session is not None:
                        self._disk.remove(self._session, message.seq)
                    self._acked.notify_all()
        elif isinstance(message, Command) and self._on_command is not None:
            self._on_command(message)

    def _record_error(self, error: Error) -> None:
        if error.code not in CLOSING_REFUSALS or error.code != self._last_logged:  # one warning per spell
            log.warning("TRAICE: server refused a message: %s: %s", error.code, error.message)
        self._last_logged = error.code
        self.errors.append(error)
        del self.errors[:-100]
