"""The hub's single writer, on a real store: group commit under a trickle, acks only once stored."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from traice.protocol import Hello, Location, Sample
from traice.server.hub import LINGER_S, DashboardFeed, Hub
from traice.store import SqlStore
from wire import events_of

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run in a thread of its own: the session's Playwright keeps an event loop in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def test_a_trickle_is_written_in_few_transactions_and_acknowledged_only_once_stored(sqlite_url: str) -> None:
    store = SqlStore(sqlite_url)
    location = Location(country_iso_code="FRA", intensity_g_per_kwh=56.0)
    session, _ = store.open(Hello(run="r", node_id="n1", session=uuid.uuid4().hex, location=location))
    stored_at_ack: list[int] = []

    async def trickle() -> tuple[int, float]:
        hub = Hub(store)
        await hub.start()
        futures = []
        began = time.monotonic()
        for seq in range(1, 31):  # a sample every 0.5 ms or more: without lingering, ~one transaction each
            future = hub.submit(session, Sample(seq=seq, t=time.time(), cpu_w=10.0))
            future.add_done_callback(lambda _: stored_at_ack.append(len(store.samples(session.run_id))))
            futures.append(future)
            await asyncio.sleep(0.0005)
        spread_s = time.monotonic() - began
        await asyncio.gather(*futures)
        await hub.stop()
        return hub.batches_written, spread_s

    batches, spread_s = run(trickle())

    # Each transaction gathers at least LINGER_S of arrivals, however slowly this machine ran the loop.
    assert batches <= spread_s / LINGER_S + 2
    assert batches < 30
    assert len(store.samples(session.run_id)) == 30
    assert all(stored >= i for i, stored in enumerate(stored_at_ack, start=1))  # each ack after its commit
    store.close()


def test_a_dashboard_gets_a_committed_batch_in_one_frame_and_a_stalled_one_is_bounded_in_events(
    sqlite_url: str,
) -> None:
    store = SqlStore(sqlite_url)
    location = Location(country_iso_code="FRA", intensity_g_per_kwh=56.0)
    session, _ = store.open(Hello(run="r", node_id="n1", session=uuid.uuid4().hex, location=location))

    async def burst() -> list[dict[str, Any]]:
        hub = Hub(store)
        await hub.start()
        feed = hub.listen()
        # cpu_w tells the samples apart in the events (which carry no seq)
        await asyncio.gather(*[hub.submit(session, Sample(seq=n, t=time.time(), cpu_w=float(n))) for n in range(1, 51)])
        await hub.stop()
        frames = []
        while not feed._frames.empty():
            frames.append(json.loads(await feed.next()))
        return frames

    frames = run(burst())
    events = [e for f in frames for e in events_of(f)]
    assert sorted(e["data"]["cpu_w"] for e in events if e["type"] == "sample") == list(range(1, 51))
    assert len(frames) < 50 and any(f["type"] == "batch" for f in frames)

    async def stalled() -> list[str]:
        feed = DashboardFeed(max_events=5)
        for name, events in (("a", 3), ("b", 3), ("c", 2), ("d", 1)):
            feed.offer(name, events)  # b would make 6 events waiting: dropped; d makes 6 too: dropped
        sent = [await feed.next()]
        feed.offer("e", 3)  # a is sent: 2 waiting, room for 3
        while not feed._frames.empty():
            sent.append(await feed.next())
        return sent

    assert run(stalled()) == ["a", "c", "e"]
