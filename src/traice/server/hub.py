"""The server's core: one writer that batches reports into the store, and the dashboard stream.

All writes go through one thread, in batches: a burst of samples from many workers becomes
one transaction, SQLite never sees two writers, and a dashboard hears of a change only once
it is stored.

When the database is away, the writer keeps the batch and retries it; workers keep their
sockets and their unacknowledged reports, and dashboards are told once that the database is
unreachable (``{"type": "health", "run_id": null, "data": {"database": "unreachable", "since"}}``)
and once that it is back (``{"database": "ok"}``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from ..protocol import Bye, Command, CommandAck, Hello, Round, Sample
from ..store.base import Event, Op, Session, Store, StoreError

log = logging.getLogger("traice.server")

MAX_BATCH = 1000
# Group commit: a batch smaller than LINGER_BELOW waits LINGER_S for more before it is written.
# Under a trickle (a sample every few ms from many sockets) this turns many one-sample
# transactions into a few bigger ones, for a few ms of latency; under load batches are big and
# never wait. Nothing is acknowledged before its batch is committed.
LINGER_S = 0.005
LINGER_BELOW = 100
DASHBOARD_QUEUE = 10_000  # events waiting for one dashboard socket, at most


class DashboardFeed:
    """The frames waiting for one dashboard socket, bounded by the events they carry."""

    def __init__(self, max_events: int = DASHBOARD_QUEUE) -> None:
        self._frames: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self._events = 0
        self._max_events = max_events

    def offer(self, frame: str, events: int = 1) -> None:
        if self._events + events > self._max_events:
            return  # a stalled dashboard misses events; it reloads from REST
        self._events += events
        self._frames.put_nowait((frame, events))

    async def next(self) -> str:
        frame, events = await self._frames.get()
        self._events -= events
        return frame


class Hub:
    """Owns the store's writer and the set of dashboard listeners."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: asyncio.Queue[tuple[Op, asyncio.Future[None]]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="traice-writer")
        self._task: asyncio.Task[None] | None = None
        self._dashboards: set[DashboardFeed] = set()
        # run_id -> node_id -> (role, send): the live worker sockets, to deliver commands
        self._peers: dict[int, dict[str, tuple[str, Callable[[Command], Awaitable[None]]]]] = {}
        self._armed_runs: set[int] = set()  # runs with rules that have not fired yet
        self.batches_written = 0
        self.database_down_since: datetime | None = None  # set while writes fail for an outage

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._armed_runs = await self._in_writer(self.store.runs_with_armed_rules)
        self._task = asyncio.create_task(self._write_loop(), name="traice-writer")

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        if self._queue is not None and self._task is not None:
            await self._queue.join()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    # ---------------------------------------------------------------- workers

    async def _in_writer(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self, hello: Hello) -> Session:
        """Open the worker's session; a database outage is refused (``database_unavailable``), and
        the worker tries again after its backoff."""
        try:
            session, events = await self._in_writer(self.store.open, hello)
        except (OperationalError, DBAPIError) as exc:
            if not is_outage(exc):
                raise
            self._database_unreachable(exc)
            raise StoreError(
                "database_unavailable",
                "the server's database is unreachable; reports are kept by the worker, try again shortly",
            ) from None
        self._database_ok()
        self.publish(events)
        return session

    async def disconnect(self, session: Session) -> None:
        try:
            self.publish(await self._in_writer(self.store.disconnect, session))
        except (OperationalError, DBAPIError) as exc:
            if not is_outage(exc):
                log.exception("could not mark %s offline", session.node_id)
            else:  # the client stays "online" in the store until its next hello or bye
                log.warning("could not mark %s offline: the database is unreachable", session.node_id)
        except Exception:
            log.exception("could not mark %s offline", session.node_id)

    def submit(self, session: Session, message: Sample | Round | Bye) -> asyncio.Future[None]:
        """Queue a validated message; the future resolves once it is stored (or refused)."""
        assert self._queue is not None, "hub not started"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(((session, message), future))
        return future

    async def _write_loop(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            self._take_queued(batch)
            if len(batch) < LINGER_BELOW:
                await asyncio.sleep(LINGER_S)
                self._take_queued(batch)
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _take_queued(self, batch: list[tuple[Op, asyncio.Future[None]]]) -> None:
        assert self._queue is not None
        while len(batch) < MAX_BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _write(self, batch: list[tuple[Op, asyncio.Future[None]]]) -> None:
        ops = [op for op, _ in batch]
        try:
            events = await self._apply(ops)
        except Exception:
            await self._write_one_by_one(batch)
            return
        self.batches_written += 1
        self.publish(events)
        for _, future in batch:
            if not future.done():
                future.set_result(None)
        await self._check_rules({session.run_id for session, _ in ops})

    async def _apply(self, ops: Sequence[Op]) -> list[Event]:
        """Store ``ops`` in one transaction; while the database is away, keep them and retry
        (workers have no ack for them yet). Any other failure is raised."""
        events: list[Event] = await self._despite_outages(self.store.apply, ops)
        return events

    async def _despite_outages(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the writer, retried for as long as the database is away."""
        delay = 0.1
        while True:
            try:
                result = await self._in_writer(fn, *args)
            except (OperationalError, DBAPIError) as exc:
                if not is_outage(exc):
                    raise
                self._database_unreachable(exc)
                log.debug("database unavailable (%s); retrying in %.1f s", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._database_ok()
            return result

    async def _write_one_by_one(self, batch: list[tuple[Op, asyncio.Future[None]]]) -> None:
        # One bad op must not sink the others: store each alone, refuse only the bad one.
        # An outage meanwhile is waited out, never taken for a bad op.
        for op, future in batch:
            try:
                self.publish(await self._apply([op]))
            except Exception as exc:
                log.warning("store refused a %s from %s: %s", op[1].type, op[0].node_id, exc)
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                future.set_result(None)

    # ---------------------------------------------------------------- database health

    @property
    def database_ok(self) -> bool:
        return self.database_down_since is None

    def health_event(self) -> dict[str, Any]:
        """The dashboard event that tells the database's state, as last seen by the writer."""
        if self.database_down_since is None:
            data: dict[str, Any] = {"database": "ok"}
        else:
            data = {"database": "unreachable", "since": self.database_down_since.isoformat()}
        return {"type": "health", "run_id": None, "data": data}

    def _database_unreachable(self, exc: Exception) -> None:
        if self.database_down_since is not None:
            return
        self.database_down_since = datetime.now(timezone.utc)
        log.error("database unreachable (%s); reports are held and stored when it is back",
                  str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        self._broadcast(json.dumps(self.health_event()))

    def _database_ok(self) -> None:
        if self.database_down_since is None:
            return
        down_s = (datetime.now(timezone.utc) - self.database_down_since).total_seconds()
        self.database_down_since = None
        log.warning("database reachable again after %.1f s; storing the held reports", down_s)
        self._broadcast(json.dumps(self.health_event()))

    # ---------------------------------------------------------------- run control

    def attach(self, session: Session, send: Callable[[Command], Awaitable[None]]) -> None:
        self._peers.setdefault(session.run_id, {})[session.node_id] = (session.role, send)

    def detach(self, session: Session, send: Callable[[Command], Awaitable[None]]) -> None:
        peers = self._peers.get(session.run_id, {})
        if peers.get(session.node_id, (None, None))[1] == send:  # not a newer socket of the same node
            del peers[session.node_id]
        if not peers:
            self._peers.pop(session.run_id, None)

    async def command(
        self, run_id: int, action: str, node_id: str | None = None, source: str = "user"
    ) -> dict[str, Any]:
        """Record a command (or raise StoreError) and deliver it to whoever must carry it out."""
        command, events = await self._in_writer(self.store.request_command, run_id, action, node_id, source)
        self.publish(events)
        await self.deliver(run_id, command)
        return command  # type: ignore[no-any-return]

    def _targets(self, run_id: int, command: dict[str, Any]) -> list[Callable[[Command], Awaitable[None]]]:
        peers = self._peers.get(run_id, {})
        # The FL server (Flower strategy) controls rounds and sampling; without one, workers obey.
        servers = [send for role, send in peers.values() if role == "server"]
        if servers:
            return servers
        if command["node_id"] is not None:
            peer = peers.get(command["node_id"])
            return [peer[1]] if peer else []
        return [send for _, send in peers.values()]

    async def deliver(self, run_id: int, command: dict[str, Any]) -> None:
        message = Command(command_id=command["id"], action=command["action"], node_id=command["node_id"])
        for send in self._targets(run_id, command):
            try:
                await send(message)
            except Exception:  # a socket closing now gets the command again at its next hello
                log.debug("could not deliver command %s", command["id"], exc_info=True)

    async def standing_commands(self, session: Session) -> list[Command]:
        """Commands in force that a worker joining now must obey (pause, stop, exclusions)."""
        # A client needs only its own exclusion (one indexed lookup); the FL server, every one.
        node_id = None if session.role == "server" else session.node_id
        standing = await self._in_writer(self.store.standing_commands, session.run_id, node_id)
        return [
            Command(command_id=c["id"], action=c["action"], node_id=c["node_id"])
            for c in standing
            if session.role == "server" or c["node_id"] in (None, session.node_id)
        ]

    async def command_ack(self, session: Session, ack: CommandAck) -> None:
        # Held through an outage like a report: refused, the worker would drop it for good.
        events = await self._despite_outages(
            self.store.update_command, session.run_id, ack.command_id, ack.status, ack.detail
        )
        self.publish(events)

    async def add_rule(self, run_id: int, **rule: Any) -> dict[str, Any]:
        created, events = await self._in_writer(lambda: self.store.add_rule(run_id, **rule))
        self._armed_runs.add(run_id)
        self.publish(events)
        await self._check_rules({run_id})  # a rule may hold already
        return created  # type: ignore[no-any-return]

    async def delete_rule(self, run_id: int, rule_id: int) -> None:
        await self._in_writer(self.store.delete_rule, run_id, rule_id)
        self._armed_runs = await self._in_writer(self.store.runs_with_armed_rules)
        self.publish([Event("rule", run_id, {"id": rule_id, "deleted": True})])

    async def _check_rules(self, run_ids: set[int]) -> None:
        for run_id in run_ids & self._armed_runs:
            try:
                fired = await self._in_writer(self.store.evaluate_rules, run_id)
            except Exception:
                log.exception("could not evaluate the rules of run %s", run_id)
                continue
            for rule in fired:
                self.publish([Event("alert", run_id, rule)])
                if rule["action"] in ("pause", "stop"):
                    try:
                        await self.command(run_id, rule["action"], source=f"rule:{rule['id']}")
                    except StoreError as exc:  # e.g. already paused: the rule's wish holds already
                        log.info("rule %s: %s", rule["id"], exc.message)
            self._armed_runs = await self._in_writer(self.store.runs_with_armed_rules)

    # ---------------------------------------------------------------- dashboards

    def listen(self) -> DashboardFeed:
        feed = DashboardFeed()
        if not self.database_ok:  # a dashboard that joins during an outage hears of it at once
            feed.offer(json.dumps(self.health_event()))
        self._dashboards.add(feed)
        return feed

    def unlisten(self, feed: DashboardFeed) -> None:
        self._dashboards.discard(feed)

    def publish(self, events: list[Event]) -> None:
        if not events or not self._dashboards:
            return
        frames = [{"type": event.kind, "run_id": event.run_id, "data": event.data} for event in events]
        # One frame per committed batch: under load a dashboard gets one frame for hundreds of
        # samples, instead of a frame (and a deflate and a write) each.
        frame = json.dumps(frames[0] if len(frames) == 1 else {"type": "batch", "events": frames}, default=str)
        self._broadcast(frame, len(frames))

    def _broadcast(self, frame: str, events: int = 1) -> None:
        for feed in list(self._dashboards):
            feed.offer(frame, events)


def is_outage(exc: DBAPIError) -> bool:
    """True when ``exc`` means the database is away (worth waiting for), not that an op is bad."""
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError)
