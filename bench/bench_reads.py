"""How long the dashboard's reads take on a big run, and how fast reports are stored.

Fills a store with CLIENTS clients x ROUNDS rounds (a train and an evaluate report each), in
batches as the server's writer would, then times the reads the run view makes.

    python bench/bench_reads.py --clients 1000 --rounds 500 [--database-url URL]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from traice.protocol import Hello, Location, Round
from traice.store import SqlStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file in a temp folder")
    args = parser.parse_args()
    url = args.database_url or f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}"
    store = SqlStore(url)
    location = Location(country_iso_code="FRA", intensity_g_per_kwh=56.0)
    sessions = [
        store.open(Hello(run="bench", node_id=f"c{i}", session=uuid.uuid4().hex, location=location))[0]
        for i in range(args.clients)
    ]
    started = time.perf_counter()
    reports = 0
    for number in range(1, args.rounds + 1):
        batch = []
        for s in sessions:
            for seq, phase, accuracy in ((2 * number, "train", None), (2 * number + 1, "evaluate", 0.5)):
                batch.append((s, Round(seq=seq, round=number, phase=phase, duration_s=1.0, cpu_energy_kwh=1e-5,
                                       energy_kwh=1e-5, emissions_kg=0.0, accuracy=accuracy, num_examples=100,
                                       bytes_up=10_000, bytes_down=10_000)))
        for i in range(0, len(batch), 1000):
            store.apply(batch[i : i + 1000])
        reports += len(batch)
    ingest_s = time.perf_counter() - started
    run_id = sessions[0].run_id
    print(f"{args.clients} clients x {args.rounds} rounds = {reports} reports on {store.dialect}")
    print(f"  stored in {ingest_s:.1f} s ({reports / ingest_s:,.0f} reports/s, batches of 1000)")
    for name, read in [
        ("get_run", lambda: store.get_run(run_id)),
        ("list_runs", store.list_runs),
        ("rounds", lambda: store.rounds(run_id)),
        ("clients", lambda: store.clients(run_id)),
        ("client_rounds(one node)", lambda: store.client_rounds(run_id, "c7")),
    ]:
        t = time.perf_counter()
        read()
        print(f"  {name:<24} {1000 * (time.perf_counter() - t):8.1f} ms")
    store.close()


if __name__ == "__main__":
    main()
