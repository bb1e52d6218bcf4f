"""A worker process for tests/test_reliability.py: reports ``--rounds`` rounds with TraiceClient, then stops.

    python tests/reliability_worker.py --url http://127.0.0.1:PORT --run RUN --node NODE --rounds N --out FILE
                                       [--interval S] [--flush-timeout S] [--start-when FILE]

Measures with the real meter (codecarbon). Each ``update`` sends one ``round`` report; ``stop()``
sends a ``tail`` report when energy was measured since the last update, says bye and waits (at
most ``--flush-timeout`` s) until the server has acknowledged everything. What it produced is
written to ``--out`` as JSON once it has stopped, so the test can check the store against it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between reports")
    parser.add_argument("--flush-timeout", type=float, default=90.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--start-when", type=Path, help="connect only once this file exists (at most 120 s)")
    args = parser.parse_args()
    # The transport's warnings (server unreachable, refusals, reconnects) go to stderr, i.e. the log.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from traice import TraiceClient

    client = TraiceClient(args.url, run=args.run, node_id=args.node, country_iso_code="FRA",
                          live_samples=False, flush_timeout_s=args.flush_timeout)
    if args.start_when is not None:  # imports done, ready: the test decides when the worker joins
        deadline = time.monotonic() + 120
        while not args.start_when.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    client.start()
    produced_at: list[float] = []
    for epoch in range(1, args.rounds + 1):
        time.sleep(args.interval)
        client.update(epoch, accuracy=epoch / args.rounds, loss=1.0 / epoch)
        produced_at.append(time.time())
    # stop() reports what was measured since this reading as a "tail" if it is more than nothing.
    before = client.last_reading
    delivered = client.stop()
    after = client.last_reading
    tail = before is not None and after is not None and (after - before).energy_kwh > 0
    result = {
        "node_id": args.node,
        "session": client.session,
        "run_id": client.run_id,
        "rounds": args.rounds,
        "tail": tail,
        "delivered": delivered,
        "produced_at": produced_at,
    }
    partial = args.out.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    os.replace(partial, args.out)
    return 0 if delivered else 3


if __name__ == "__main__":
    sys.exit(main())
