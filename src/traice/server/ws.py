"""The two sockets: ``/ws/worker`` (reports in, acks and commands out) and ``/ws/dashboard``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from .. import protocol
from ..protocol import Ack, CommandAck, Hello, ProtocolError
from ..store.base import Session, StoreError
from .hub import Hub

log = logging.getLogger("traice.server")
router = APIRouter()

HELLO_TIMEOUT_S = 30.0
POLICY_VIOLATION = 1008


class _WorkerConnection:
    """One worker socket: ordered acks for stored messages, one sender at a time."""

    def __init__(self, ws: WebSocket, hub: Hub) -> None:
        self.ws = ws
        self.hub = hub
        self.session: Session | None = None
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
                await self.ws.close(POLICY_VIOLATION, error.code)

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

    def stored_later(self, seq: int, future: asyncio.Future[None]) -> None:
        self._stored.append((seq, future))
        self._wake.set()

    def close_acks(self) -> None:
        self._closed = True
        self._wake.set()


@router.websocket("/ws/worker")
async def worker_socket(ws: WebSocket) -> None:
    hub: Hub = ws.app.state.hub
    await ws.accept()
    conn = _WorkerConnection(ws, hub)
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


@router.websocket("/ws/dashboard")
async def dashboard_socket(ws: WebSocket) -> None:
    """Streams every stored change as ``{"type": run|client|round|sample, "run_id", "data"}``."""
    hub: Hub = ws.app.state.hub
    await ws.accept()
    queue = hub.listen()

    async def pump() -> None:
        while True:
            await ws.send_text(await queue.get())

    sender = asyncio.create_task(pump())
    try:
        while True:  # dashboards only listen; reading detects when they leave
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
    finally:
        hub.unlisten(queue)
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
