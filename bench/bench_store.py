"""What the server's writer pays per batch and per hello, timed on the store alone (no sockets).

- **apply**: ``SqlStore.apply`` of batches of live samples (each sample from a different worker,
  as from many sockets) and of round reports, on a run of ``--workers`` workers.
- **hello**: ``SqlStore.open`` + ``standing_commands`` (what the hub does for every hello), for
  new workers of one run with a few of them excluded; the mean over the first 1,000 hellos and
  over the last 1,000 of each ``--hellos`` count shows whether a hello gets dearer as a run grows.
- **trickle**: the hub's writer (``Hub.submit``, no sockets) fed a steady ``--trickle-rates``
  samples/s from the ``--workers`` workers: transactions, this process's CPU per sample (writer,
  event loop and the feeding loop, which alone costs ~100 µs a sample in its sleeps), the writer
  thread's CPU per sample, and submit → ack latency.

CPU is this process's (``time.process_time``); on PostgreSQL the backend's own CPU is not in it.

    python bench/bench_store.py                      # SQLite file and PostgreSQL
    python bench/bench_store.py --targets sqlite --hellos 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from traice.protocol import Hello, Location, Round, Sample
from traice.server import hub as hub_module
from traice.store import SqlStore, normalize_database_url, sql
from traice.store.base import Session

LOCATION = Location(country_iso_code="FRA", intensity_g_per_kwh=56.0)
EXCLUDED = 10  # workers excluded early in the hello run: standing_commands must tell each joiner


def _hello(run: str, node: str) -> Hello:
    return Hello(run=run, node_id=node, session=uuid.uuid4().hex, location=LOCATION)


def _standing(store: SqlStore, session: Session) -> None:
    """As the hub asks for a client; stores older than the node_id argument are asked the old way,
    so that one script times both."""
    try:
        store.standing_commands(session.run_id, session.node_id)
    except TypeError:
        store.standing_commands(session.run_id)


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_apply(store: SqlStore, sizes: list[int], workers: int, budget_s: float) -> list[dict[str, Any]]:
    sessions = [store.open(_hello("apply", f"w{i}"))[0] for i in range(workers)]
    seq = {s.session: 0 for s in sessions}
    cursor = 0

    def next_op(kind: str, number: int) -> tuple[Session, Sample | Round]:
        nonlocal cursor
        s = sessions[cursor % len(sessions)]
        cursor += 1
        seq[s.session] += 1
        if kind == "sample":
            return s, Sample(seq=seq[s.session], t=time.time(), cpu_w=12.5, gpu_w=0.0, ram_w=1.5)
        return s, Round(seq=seq[s.session], round=number, phase="train", duration_s=1.0, cpu_energy_kwh=1e-5,
                        energy_kwh=1e-5, emissions_kg=5.6e-7, accuracy=0.5, num_examples=100,
                        bytes_up=10_000, bytes_down=10_000)

    rows = []
    for kind, size in [("sample", n) for n in sizes] + [("round", n) for n in sizes if 1 < n <= 100]:
        for _ in range(3):  # warm up: first compilations, caches
            store.apply([next_op(kind, 1) for _ in range(size)])
        walls, cpus = [], []
        started = time.perf_counter()
        number = 1
        while (time.perf_counter() - started < budget_s or len(walls) < 5) and len(walls) < 2000:
            number += 1
            batch = [next_op(kind, number) for _ in range(size)]
            wall, cpu = _timed(lambda batch=batch: store.apply(batch))
            walls.append(wall)
            cpus.append(cpu)
        rows.append({
            "what": f"apply {size} {kind}{'s' if size > 1 else ''}", "batches": len(walls),
            "wall_ms": 1000 * statistics.median(walls), "cpu_ms": 1000 * statistics.fmean(cpus),
            "cpu_us_per_row": 1e6 * statistics.fmean(cpus) / size,
        })
    return rows


def bench_hellos(store: SqlStore, counts: list[int], window: int = 1000) -> list[dict[str, Any]]:
    walls, cpus = [], []
    run = f"hellos-{uuid.uuid4().hex[:6]}"
    for i in range(max(counts)):
        def hello(i: int = i) -> None:
            session, _ = store.open(_hello(run, f"n{i}"))
            _standing(store, session)
            if i < EXCLUDED:
                store.request_command(session.run_id, "exclude", f"n{i}")
        wall, cpu = _timed(hello)
        walls.append(wall)
        cpus.append(cpu)
    rows = []
    for count in sorted(set(counts)):
        lo = max(0, count - window)
        what = f"hello {lo + 1:,}-{count:,}"
        rows.append({"what": what, "batches": count - lo, "wall_ms": 1000 * statistics.median(walls[lo:count]),
                     "cpu_ms": 1000 * statistics.fmean(cpus[lo:count]), "cpu_us_per_row": None})
    return rows


def bench_trickle(store: SqlStore, rates: list[int], workers: int, seconds: float) -> list[dict[str, Any]]:
    sessions = [store.open(_hello("trickle", f"t{i}"))[0] for i in range(workers)]
    seq = {s.session: 0 for s in sessions}

    async def feed(rate: int) -> dict[str, Any]:
        hub = hub_module.Hub(store)
        await hub.start()
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        futures = []
        count = int(rate * seconds)
        writer = time.pthread_getcpuclockid(next(iter(hub._executor._threads)).ident)  # type: ignore[arg-type]
        started, cpu, writer_cpu = loop.time(), time.process_time(), time.clock_gettime(writer)
        for i in range(count):
            delay = started + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            s = sessions[i % len(sessions)]
            seq[s.session] += 1
            sent = time.perf_counter()
            future = hub.submit(s, Sample(seq=seq[s.session], t=time.time(), cpu_w=12.5, ram_w=1.5))
            future.add_done_callback(lambda _, sent=sent: latencies.append(time.perf_counter() - sent))
            futures.append(future)
        await asyncio.gather(*futures)
        cpu, writer_cpu = time.process_time() - cpu, time.clock_gettime(writer) - writer_cpu
        batches = hub.batches_written
        await hub.stop()
        latencies.sort()
        return {"what": f"trickle {rate}/s", "samples": count, "transactions": batches,
                "cpu_us_per_sample": 1e6 * cpu / count, "writer_cpu_us_per_sample": 1e6 * writer_cpu / count,
                "ack_p50_ms": 1000 * latencies[len(latencies) // 2],
                "ack_p99_ms": 1000 * latencies[int(len(latencies) * 0.99)]}

    return [asyncio.run(feed(rate)) for rate in rates]


def _postgres_scratch(admin_url: str) -> tuple[str, Callable[[], None]]:
    admin = create_engine(normalize_database_url(admin_url), isolation_level="AUTOCOMMIT")
    name = f"traice_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return normalize_database_url(admin_url).rsplit("/", 1)[0] + f"/{name}", drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="a database to connect to; the bench creates and drops a scratch database beside it")
    parser.add_argument("--sizes", default="1,10,100,1000", help="samples per apply batch")
    parser.add_argument("--workers", type=int, default=1000, help="workers the apply batches come from")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of batches per size")
    parser.add_argument("--hellos", default="1000,5000", help="hello counts to report (the last 1,000 of each)")
    parser.add_argument("--last-seen-every-batch", action="store_true",
                        help="write every client's last_seen in every batch (the worst case of a slow trickle, "
                             "where no worker sends twice within the store's last_seen resolution)")
    parser.add_argument("--trickle-rates", default="200,1000", help="samples/s fed to the hub's writer")
    parser.add_argument("--trickle-seconds", type=float, default=5.0)
    parser.add_argument("--linger-ms", type=float, default=None,
                        help="the hub writer's group-commit linger (default: the hub's; 0: none)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.last_seen_every_batch:
        sql.LAST_SEEN_RESOLUTION_S = 0.0
    if args.linger_ms is not None:
        hub_module.LINGER_S = args.linger_ms / 1000
    sizes = [int(n) for n in args.sizes.split(",")]
    trickle = [int(n) for n in args.trickle_rates.split(",") if n]
    hellos = [int(n) for n in args.hellos.split(",") if n]
    results: dict[str, list[dict[str, Any]]] = {}
    for target in args.targets.split(","):
        drop: Callable[[], None] = lambda: None
        if target == "sqlite":
            url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}"
        elif target == "postgresql":
            url, drop = _postgres_scratch(args.postgres_url)
        else:
            parser.error(f"unknown target {target!r}")
        store = SqlStore(url)
        try:
            rows = bench_apply(store, sizes, args.workers, args.budget)
            rows += bench_hellos(store, hellos) if hellos else []
            flows = bench_trickle(store, trickle, args.workers, args.trickle_seconds)
        finally:
            store.close()
            drop()
        results[target] = rows
        print(f"\n{target}")
        print(f"| {'what':<24} | {'n':>5} | {'wall ms (median)':>16} | {'CPU ms (mean)':>13} | {'CPU µs/row':>10} |")
        print(f"| {'-' * 24} | {'-' * 4}: | {'-' * 15}: | {'-' * 12}: | {'-' * 9}: |")
        for r in rows:
            per_row = f"{r['cpu_us_per_row']:.0f}" if r["cpu_us_per_row"] is not None else ""
            print(f"| {r['what']:<24} | {r['batches']:>5} | {r['wall_ms']:>16.2f} | {r['cpu_ms']:>13.2f} "
                  f"| {per_row:>10} |")
        print(f"| {'hub writer':<16} | {'samples':>7} | {'transactions':>12} | {'CPU µs/sample':>13} "
              f"| {'writer thread':>13} | {'ack p50 ms':>10} | {'ack p99 ms':>10} |")
        print(f"| {'-' * 16} | {'-' * 6}: | {'-' * 11}: | {'-' * 12}: | {'-' * 12}: | {'-' * 9}: | {'-' * 9}: |")
        for f in flows:
            print(f"| {f['what']:<16} | {f['samples']:>7} | {f['transactions']:>12} | {f['cpu_us_per_sample']:>13.0f} "
                  f"| {f['writer_cpu_us_per_sample']:>13.0f} | {f['ack_p50_ms']:>10.1f} | {f['ack_p99_ms']:>10.1f} |")
        results[f"{target} trickle"] = flows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
