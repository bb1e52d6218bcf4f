"""The two sockets: ``/ws/worker`` (reports in, acks and commands out) and ``/ws/dashboard``.

Both check their peer before anything else: connections per address, then the token (see
:mod:`.auth`); a worker's hello must also be within its token's run and node. Every refusal is
an ``error`` frame with a code, then a close, so a person reading the worker's log knows why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from .. import protocol
from ..protocol import Ack, CommandAck, Hello, ProtocolError
from ..store.base import Session, StoreError
from .auth import Auth, bearer
from .hub import Hub
from .limits import ConnectionCounter, Limits, TokenBucket

log = logging.getLogger("traice.server")
router = APIRouter()

HELLO_TIMEOUT_S = 30.0
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013


async def _refuse_socket(ws: WebSocket, code: str, message: str, close_code: int = POLICY_VIOLATION) -> None:
    """Tell a peer why it is turned away, then close (the socket must be accepted already)."""
    with contextlib.suppress(Exception):
        await ws.send_text(protocol.dumps(protocol.Error(code=code, message=message)))
        await ws.close(close_code, code)
        await _drain(ws)


async def _drain(ws: WebSocket, timeout_s: float = 5.0) -> None:
    """Read (and drop) what the peer still sends until it answers our close: a socket closed with
    unread data is reset, and a reset can destroy our error frame before the peer reads it."""

    async def until_closed() -> None:
        while (await ws._receive())["type"] != "websocket.disconnect":
            pass

    with contextlib.suppress(Exception):
        await asyncio.wait_for(until_closed(), timeout_s)


@contextlib.asynccontextmanager
async def _admitted(ws: WebSocket) -> AsyncIterator[bool]:
    """Accept the socket and hold a slot for its address; yields False (after refusing) if full."""
    counter: ConnectionCounter = ws.app.state.connections
    address = ws.client.host if ws.client else "unknown"
    await ws.accept()
    if not counter.acquire(address):
        await _refuse_socket(
            ws, "too_many_connections",
            f"more than {counter.limit} open sockets from {address}; close some or raise --max-connections-per-address",
            TRY_AGAIN_LATER,
        )
        yield False
        return
    try:
        yield True
    finally:
        counter.release(address)


class _WorkerConnection:
    """One worker socket: ordered acks for stored messages, one sender at a time."""

    def __init__(self, ws: WebSocket, hub: Hub, auth: Auth, limits: Limits) -> None:
        self.ws = ws
        self.hub = hub
        self.session: Session | None = None
        self.grant = auth.worker_grant(bearer(ws.headers, ws.cookies))
        self.limits = limits
        self.bucket = TokenBucket(limits.max_messages_per_s, limits.burst_messages)
        self._send_lock = asyncio.Lock()
        self._stored: deque[tuple[int, asyncio.Future[None]]] = deque()  # submitted, not yet acked
        self._wake = asyncio.Event()
        self._closed = False

    async def send(self, message: Any) -> None:
        async with self._send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                await self.ws.send_text(protocol.dumps(message))

    async def refuse(self, error: ProtocolError, close: bool = False) -> None:
        with contextlib.suppress(Exception):
            await self.send(error.to_message())
            if close:
                async with self._send_lock:
                    await self.ws.close(POLICY_VIOLATION, error.code)
                await _drain(self.ws)

    async def receive_frame(self, timeout: float | None = None) -> str | bytes | None:
        """Next frame, or None when the peer has gone."""
        message = await asyncio.wait_for(self.ws.receive(), timeout) if timeout else await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        return message.get("text") if message.get("text") is not None else message.get("bytes", b"")

    async def ack_loop(self) -> None:
        """Acknowledge in order; consecutive stored messages share one cumulative ack."""
        while True:
            if not self._stored:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            seq, future = self._stored[0]
            try:
                await future
            except StoreError as exc:
                self._stored.popleft()
                await self.send(protocol.Error(code=exc.code, message=exc.message, seq=seq))
                continue
            except Exception as exc:
                self._stored.popleft()
                await self.send(protocol.Error(code="store_rejected", message=f"could not store: {exc}", seq=seq))
                continue
            self._stored.popleft()
            while self._stored and self._stored[0][1].done() and self._stored[0][1].exception() is None:
                seq = self._stored.popleft()[0]
            await self.send(Ack(seq=seq))

    async def settle(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until everything read so far is stored and acknowledged: a worker turned
        away must learn what got in, or it resends the same messages forever."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._stored and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    def stored_later(self, seq: int, future: asyncio.Future[None]) -> None:
        self._stored.append((seq, future))
        self._wake.set()

    def close_acks(self) -> None:
        self._closed = True
        self._wake.set()


@router.websocket("/ws/worker")
async def worker_socket(ws: WebSocket) -> None:
    async with _admitted(ws) as admitted:
        if admitted:
            await _worker(ws)


async def _worker(ws: WebSocket) -> None:
    hub: Hub = ws.app.state.hub
    conn = _WorkerConnection(ws, hub, ws.app.state.auth, ws.app.state.limits)
    if conn.grant is None:
        await conn.refuse(
            ProtocolError("unauthorized", "a valid worker token is required (TraiceClient(token=...) or TRAICE_TOKEN)"),
            close=True,
        )
        return
    try:
        await _greet(conn)
    except WebSocketDisconnect:
        return
    except asyncio.TimeoutError:
        await conn.refuse(ProtocolError("hello_required", f"no hello within {HELLO_TIMEOUT_S:.0f} s"), close=True)
        return
    if conn.session is None:
        return
    acker = asyncio.create_task(conn.ack_loop())
    hub.attach(conn.session, conn.send)
    try:
        for command in await hub.standing_commands(conn.session):  # a pause in force holds joiners too
            await conn.send(command)
        await _serve_worker(conn, conn.session)
    except WebSocketDisconnect:
        pass
    finally:
        hub.detach(conn.session, conn.send)
        conn.close_acks()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(acker, timeout=10)
        await hub.disconnect(conn.session)


async def _greet(conn: _WorkerConnection) -> None:
    frame = await conn.receive_frame(HELLO_TIMEOUT_S)
    if frame is None:
        return
    try:
        hello = protocol.parse_worker_message(frame)
        if not isinstance(hello, Hello):
            raise ProtocolError("hello_required", "the first message must be a hello", hello.seq)
        if hello.protocol != protocol.PROTOCOL_VERSION:
            raise ProtocolError(
                "unsupported_protocol",
                f"protocol {hello.protocol} is not supported; this server speaks {protocol.PROTOCOL_VERSION}",
            )
        assert conn.grant is not None
        refusal = conn.grant.refusal(hello.run, hello.node_id)
        if refusal is not None:
            raise ProtocolError("forbidden", refusal, hello.seq)
        conn.session = await conn.hub.open(hello)
    except ProtocolError as exc:
        await conn.refuse(exc, close=True)
        return
    except StoreError as exc:
        await conn.refuse(ProtocolError(exc.code, exc.message), close=True)
        return
    await conn.send(Ack(seq=hello.seq, run_id=conn.session.run_id))


async def _serve_worker(conn: _WorkerConnection, session: Session) -> None:
    while True:
        frame = await conn.receive_frame()
        if frame is None:
            return
        if not conn.bucket.take():
            # Nothing after this frame is read, so no later ack can cover it: the worker resends it.
            await conn.settle()
            await conn.refuse(_rate_limited(conn.limits), close=True)
            return
        try:
            message = protocol.parse_worker_message(frame)
            if isinstance(message, Hello):
                raise ProtocolError("duplicate_hello", "hello was already received on this socket", message.seq)
        except ProtocolError as exc:
            await conn.refuse(exc)  # the worker hears why; the socket and everyone else go on
            continue
        if isinstance(message, CommandAck):
            conn.stored_later(message.seq, asyncio.ensure_future(conn.hub.command_ack(session, message)))
        else:
            conn.stored_later(message.seq, conn.hub.submit(session, message))


def _rate_limited(limits: Limits) -> ProtocolError:
    return ProtocolError(
        "rate_limited",
        f"more than {limits.max_messages_per_s:g} messages/s (bursts of {limits.burst_messages}) on this socket; "
        "reconnect and resend more slowly",
    )


@router.websocket("/ws/dashboard")
async def dashboard_socket(ws: WebSocket) -> None:
    """Streams every stored change as ``{"type": run|client|round|sample, "run_id", "data"}``."""
    async with _admitted(ws) as admitted:
        if not admitted:
            return
        if not ws.app.state.auth.is_admin(bearer(ws.headers, ws.cookies)):
            await _refuse_socket(ws, "unauthorized", "the dashboard needs the admin token: sign in at /login")
            return
        await _dashboard(ws)


async def _dashboard(ws: WebSocket) -> None:
    hub: Hub = ws.app.state.hub
    limits: Limits = ws.app.state.limits
    bucket = TokenBucket(limits.max_messages_per_s, limits.burst_messages)
    feed = hub.listen()

    async def pump() -> None:
        while True:
            await ws.send_text(await feed.next())

    sender = asyncio.create_task(pump())
    try:
        while True:  # dashboards only listen; reading detects when they leave
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if not bucket.take():
                await _refuse_socket(ws, "rate_limited", _rate_limited(limits).message)
                return
    finally:
        hub.unlisten(feed)
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
