"""A tracked Flower simulation of 1,000 virtual clients, 10 sampled per round, then a check that
TRAICE's record of it is complete.

The FL side is the demo's (the digits MLP, FedAvg, ``traice_mod`` on the ClientApp,
``TraiceStrategy`` around FedAvg, machine-share measurement) with two changes that 1,000 clients
need: FedAvg samples --per-round of the --clients virtual clients each round (train and evaluate
sample independently), and each virtual client trains on --examples digits drawn for it (seeded by
its partition id) from the demo's pool, since 1,437 digits cannot be split 1,000 ways.

Flower's own view is recorded by the strategy: which nodes it sampled in every round and which
replied. Afterwards the TRAICE server's record is checked against it, through the REST API
(``/api/runs``, ``/rounds``, ``/rounds/clients``) and the database (every report's phase):
every round has the FL server's report, and every sampled client has its ``train`` report in the
rounds it was sampled to train and its ``evaluate`` report in those it was sampled to evaluate.

    python bench/bench_simulation.py                     # 1,000 clients, 10 per round, 10 rounds
    python bench/bench_simulation.py --rounds 20 --json simulation.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _procs import kill_group, traice_server

HERE = Path(__file__).resolve()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


# =============================================================================== the simulation (child)


def _simulate(args: argparse.Namespace) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from traice.demo import _backend_config, task
    from traice.flower import RECORD, TraiceStrategy, traice_mod

    examples, seed = args.examples, args.seed

    def data(context: Context) -> tuple[Any, ...]:
        x, y, _, _ = task._dataset(seed)
        pick = np.random.default_rng(seed * 100_003 + int(context.node_config["partition-id"])).choice(
            len(y), size=examples, replace=False)
        cut = int(0.8 * examples)
        return x[pick[:cut]], y[pick[:cut]], x[pick[cut:]], y[pick[cut:]]

    client_app = ClientApp(mods=[traice_mod])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        x_train, y_train, _, _ = data(context)
        model = task.make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss = task.train(model, x_train, y_train, epochs=1, lr=0.05,
                          seed=int(msg.content["config"].get("server-round", 0)))
        metrics = MetricRecord({"train_loss": loss, "num-examples": len(y_train)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _, _, x_val, y_val = data(context)
        model = task.make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss, accuracy = task.evaluate(model, x_val, y_val)
        metrics = MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": len(y_val)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    flower: dict[str, Any] = {"train": defaultdict(list), "evaluate": defaultdict(list),
                              "replied": {"train": defaultdict(list), "evaluate": defaultdict(list)}}

    class RecordingFedAvg(FedAvg):
        """FedAvg that notes whom it sampled and who replied (Flower node id -> TRAICE node id)."""

        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Grid) -> Any:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            flower["train"][server_round] = [m.metadata.dst_node_id for m in messages]
            return messages

        def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Grid) -> Any:
            messages = list(super().configure_evaluate(server_round, arrays, config, grid))
            flower["evaluate"][server_round] = [m.metadata.dst_node_id for m in messages]
            return messages

        def _note(self, phase: str, server_round: int, replies: list[Message]) -> None:
            for reply in replies:
                if reply.has_content() and RECORD in reply.content.config_records:
                    record = reply.content.config_records[RECORD]
                    flower["replied"][phase][server_round].append(
                        [int(record["flower-node-id"]), str(record["node-id"])])

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            self._note("train", server_round, replies)
            return super().aggregate_train(server_round, replies)

        def aggregate_evaluate(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            self._note("evaluate", server_round, replies)
            return super().aggregate_evaluate(server_round, replies)

    server_app = ServerApp()
    x_test, y_test = task.server_test_data(seed)
    round_times: dict[int, float] = {}
    started = time.perf_counter()

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = task.make_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = task.evaluate(model, x_test, y_test)
        if server_round > 0:
            round_times[server_round] = time.perf_counter() - started
            print(f"round {server_round}/{args.rounds}  global accuracy {accuracy:.3f}  "
                  f"({round_times[server_round]:.0f} s)", file=sys.stderr, flush=True)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        fraction = args.per_round / args.clients
        strategy = TraiceStrategy(
            RecordingFedAvg(fraction_train=fraction, fraction_evaluate=fraction, min_train_nodes=args.per_round,
                            min_evaluate_nodes=args.per_round, min_available_nodes=args.clients),
            server_url=args.server_url, run=args.run, country_iso_code="FRA", client_country_iso_code="FRA",
            sample_interval_s=1.0, tracking_mode="machine-share",
        )
        strategy.start(grid=grid, initial_arrays=ArrayRecord(task.make_model(seed).state_dict()),
                       num_rounds=args.rounds, train_config=ConfigRecord({"lr": 0.05, "local-epochs": 1}),
                       evaluate_fn=central_evaluate)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config=_backend_config(args.clients))
    ended = time.perf_counter()
    sys.stdout.write("@@" + json.dumps({
        "seconds": ended - started, "round_times": round_times,
        "train": flower["train"], "evaluate": flower["evaluate"], "replied": flower["replied"],
    }) + "\n")
    sys.stdout.flush()


# =============================================================================== orchestrator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000, help="virtual clients (Flower SuperNodes)")
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled per round (train and evaluate)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--examples", type=int, default=64, help="digits drawn for each virtual client")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds the simulation may take")
    parser.add_argument("--show-rows", type=int, default=40, help="per-client rows to print (0: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the record and the check here")
    parser.add_argument("--role", choices=["simulate"], help=argparse.SUPPRESS)
    parser.add_argument("--server-url", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "simulate":
        try:
            _simulate(args)
        except BaseException:  # noqa: BLE001 -- report any failure, then exit at once
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)  # never wait on a stuck ServerApp thread
    if not 0 < args.per_round <= args.clients:
        parser.error("--per-round must be between 1 and --clients")

    workdir = Path(tempfile.mkdtemp(prefix="traice-bench-simulation-"))
    db_path = workdir / "simulation.db"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "TRAICE_LEDGER_DIR": str(workdir / "ledger"), "RAY_DEDUP_LOGS": "0"}
    for name in ("TRAICE_SERVER_URL", "TRAICE_RUN", "TRAICE_TOKEN", "TRAICE_TRACKING_MODE"):
        env.pop(name, None)
    run_name = f"sim-{args.clients}x{args.per_round}-{datetime.now(timezone.utc):%H%M%S}"
    started = datetime.now(timezone.utc)
    print(f"bench_simulation {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}: {args.clients} virtual clients, {args.per_round} per round, "
          f"{args.rounds} rounds, run {run_name}", flush=True)
    sim: subprocess.Popen[str] | None = None
    with traice_server(f"sqlite:///{db_path}", workdir / "server.log", env) as server_url:
        try:
            sim = subprocess.Popen(
                [sys.executable, str(HERE), "--role", "simulate", "--clients", str(args.clients), "--per-round",
                 str(args.per_round), "--rounds", str(args.rounds), "--examples", str(args.examples), "--seed",
                 str(args.seed), "--server-url", server_url, "--run", run_name],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
            )
            progress: list[str] = []

            def relay() -> None:  # round lines as they come, the rest kept for a failure report
                assert sim is not None and sim.stderr is not None
                for line in sim.stderr:
                    progress.append(line)
                    del progress[:-200]
                    if line.startswith("round "):
                        print("   " + line.rstrip(), flush=True)

            relay_thread = threading.Thread(target=relay, daemon=True)
            relay_thread.start()
            def watchdog() -> None:
                assert sim is not None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(sim.pid, signal.SIGKILL)
                print(f"   the simulation exceeded --timeout {args.timeout:.0f} s and was killed", flush=True)

            timer = threading.Timer(args.timeout, watchdog)
            timer.start()
            try:
                out = sim.stdout.read() if sim.stdout else ""
                sim.wait(timeout=30)
            finally:
                timer.cancel()
            relay_thread.join(5)
            lines = [line for line in out.splitlines() if line.startswith("@@")]
            if sim.returncode != 0 or not lines:
                raise RuntimeError(f"simulation failed ({sim.returncode}):\n{''.join(progress[-40:])}")
            flower = json.loads(lines[-1][2:])
            time.sleep(1.0)  # the last reports are flushed before the simulation exits; let the writer commit
            check = verify(server_url, db_path, run_name, flower, args)
        finally:
            if sim is not None:
                kill_group(sim)  # Ray's helpers
    if args.json:
        args.json.write_text(json.dumps({"started": started.isoformat(), "args": {
            k: v for k, v in vars(args).items() if v is not None and k != "json"}, "flower": flower,
            "check": check}, indent=2, default=str))
        print(f"wrote {args.json}")
    sys.exit(0 if check["complete"] else 1)


def verify(server_url: str, db_path: Path, run_name: str, flower: dict[str, Any],
           args: argparse.Namespace) -> dict[str, Any]:
    run = next((r for r in _get(server_url + "/api/runs") if r["name"] == run_name), None)
    if run is None:
        raise RuntimeError(f"run {run_name} is not on the server")
    rid = run["id"]
    detail = _get(f"{server_url}/api/runs/{rid}")
    rounds = _get(f"{server_url}/api/runs/{rid}/rounds")
    per_client = _get(f"{server_url}/api/runs/{rid}/rounds/clients")
    clients = _get(f"{server_url}/api/runs/{rid}/clients")
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        stored = conn.execute(
            "SELECT r.round, r.phase, c.node_id FROM reports r JOIN clients c ON c.id = r.client_id "
            "WHERE r.run_id = ?", (rid,)).fetchall()
    have = {(rnd, phase, node) for rnd, phase, node in stored}

    problems: list[str] = []
    expected = 0
    flower_ids: dict[int, str] = {}
    for phase in ("train", "evaluate"):
        for rnd, pairs in flower["replied"][phase].items():
            for fid, node in pairs:
                flower_ids[fid] = node
    for phase in ("train", "evaluate"):
        for rnd_s, sampled in sorted(flower[phase].items(), key=lambda kv: int(kv[0])):
            rnd = int(rnd_s)
            if len(sampled) != args.per_round:
                problems.append(f"round {rnd}: Flower sampled {len(sampled)} nodes to {phase}, not {args.per_round}")
            replied = {fid for fid, _ in flower["replied"][phase].get(rnd_s, [])}
            for fid in sampled:
                expected += 1
                if fid not in replied:
                    problems.append(f"round {rnd}: Flower node {fid} sampled to {phase} did not reply")
                    continue
                node = flower_ids[fid]
                if (rnd, phase, node) not in have:
                    problems.append(f"round {rnd}: no {phase} report from {node} (Flower node {fid})")
    server_rounds = {rnd for rnd, phase, node in stored if node == "fl-server"}
    for rnd in range(1, args.rounds + 1):
        if rnd not in server_rounds:
            problems.append(f"round {rnd}: no report from the FL server")
    stored_rounds = {r["round"] for r in rounds}
    missing_rounds = sorted(set(range(1, args.rounds + 1)) - stored_rounds)
    if missing_rounds:
        problems.append(f"rounds missing from /rounds: {missing_rounds}")
    if run["status"] != "finished":
        problems.append(f"run status is {run['status']!r}, not 'finished'")
    sampled_nodes = {flower_ids.get(fid) for phase in ("train", "evaluate") for s in flower[phase].values() for fid in s}
    client_rows = [c for c in clients if c["role"] == "client"]
    if {c["node_id"] for c in client_rows} != sampled_nodes:
        problems.append(f"clients on the server ({len(client_rows)}) differ from the nodes Flower sampled "
                        f"({len(sampled_nodes)})")

    # ---------------------------------------------------------------- print the record
    print(f"\nRun {run['name']} (#{rid}): {run['status']}, {run['rounds']} rounds, {len(client_rows)} clients "
          f"and the FL server, {run['energy_kwh'] * 1000:.3f} Wh, "
          f"{run['emissions_kg'] * 1e6:.1f} mg CO2e, final accuracy "
          + ("–" if run["accuracy"] is None else f"{run['accuracy']:.3f}"))
    print(f"Simulation wall time {flower['seconds']:.0f} s; energy by component: "
          + ", ".join(f"{k} {v['energy_kwh'] * 1000:.4f} Wh" for k, v in (detail.get("by_component") or {}).items()))
    print(f"\n{'round':>5} {'clients':>7} {'duration s':>10} {'energy Wh':>10} {'mg CO2e':>9} {'accuracy':>8} "
          f"{'global acc':>10}")
    for r in rounds:
        acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        gacc = "–" if r["server_accuracy"] is None else f"{r['server_accuracy']:.3f}"
        print(f"{r['round']:>5} {r['clients']:>7} {r['duration_s']:>10.2f} {r['energy_kwh'] * 1000:>10.4f} "
              f"{r['emissions_kg'] * 1e6:>9.3f} {acc:>8} {gacc:>10}")
    shown = per_client if args.show_rows == 0 else per_client[: args.show_rows]
    print(f"\nPer round and client ({len(per_client)} rows" + ("" if shown is per_client else
                                                               f", first {len(shown)}") + "):")
    print(f"{'round':>5} {'node':<12} {'role':<7} {'duration s':>10} {'energy Wh':>10} {'accuracy':>8} "
          f"{'examples':>8}")
    for r in shown:
        acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"{r['round']:>5} {r['node_id']:<12} {r['role']:<7} {r['duration_s']:>10.2f} "
              f"{r['energy_kwh'] * 1000:>10.4f} {acc:>8} {r['num_examples'] or 0:>8}")
    complete = not problems
    print(f"\nCheck: {expected} sampled (round, client, phase) triples from Flower, "
          f"{len([1 for s in stored if s[2] != 'fl-server' and s[1] in ('train', 'evaluate')])} train/evaluate "
          f"reports stored, {len(server_rounds)} rounds reported by the FL server -> "
          + ("COMPLETE" if complete else f"{len(problems)} PROBLEM(S)"))
    for p in problems[:30]:
        print("   " + p)
    return {"complete": complete, "problems": problems, "expected_reports": expected, "run": run,
            "rounds": rounds, "clients_stored": len(client_rows), "reports_stored": len(stored)}


if __name__ == "__main__":
    main()
