"""The hub's single writer, on a real store: group commit under a trickle, acks only once stored."""

from __future__ import annotations

import asyncio
import time
import uuid

from traice.protocol import Hello, Location, Sample
from traice.server.hub import Hub
from traice.store import SqlStore


def test_a_trickle_is_written_in_few_transactions_and_acknowledged_only_once_stored(sqlite_url: str) -> None:
    store = SqlStore(sqlite_url)
    location = Location(country_iso_code="FRA", intensity_g_per_kwh=56.0)
    session, _ = store.open(Hello(run="r", node_id="n1", session=uuid.uuid4().hex, location=location))
    stored_at_ack: list[int] = []

    async def trickle() -> int:
        hub = Hub(store)
        await hub.start()
        futures = []
        for seq in range(1, 31):  # a sample every 0.5 ms: without lingering, ~one transaction each
            future = hub.submit(session, Sample(seq=seq, t=time.time(), cpu_w=10.0))
            future.add_done_callback(lambda _: stored_at_ack.append(len(store.samples(session.run_id))))
            futures.append(future)
            await asyncio.sleep(0.0005)
        await asyncio.gather(*futures)
        await hub.stop()
        return hub.batches_written

    batches = asyncio.run(trickle())

    assert batches <= 6
    assert len(store.samples(session.run_id)) == 30
    assert all(stored >= i for i, stored in enumerate(stored_at_ack, start=1))  # each ack after its commit
    store.close()
