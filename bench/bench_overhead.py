"""How much slower the demo's training is with TRAICE tracking it: alternated runs, one table.

Two ways of running the same training (the demo's task: scikit-learn digits, the demo's MLP,
FedAvg, the same seeds, data split and rounds), each with and without TRAICE:

* ``flower`` -- the demo itself: a Flower simulation (``run_simulation``) of --clients clients.
  Tracked (T) is exactly the demo's apps (``traice.demo.apps``: ``ClientApp(mods=[traice_mod])``
  and ``TraiceStrategy(FedAvg(...))``, machine-share measurement, live samples every second);
  untracked (U) is the same ClientApp functions without the mod and the same FedAvg unwrapped.
* ``loop`` -- the same local training without Flower, in one process: every round each client
  trains on its share and the models are averaged; tracked, each client's round runs inside
  ``TraiceClient.round`` and is reported (one TraiceClient per client, as the mod does).

Every run is a fresh process; T and U alternate (T U, U T, T U, ...) so drift on a shared machine
hits both alike. A TRAICE server (SQLite, a separate process on this machine) receives the
tracked runs, so its CPU competes with the training as it would in the demo. Reported: the wall
time of the whole run and of the rounds after the first (steady state), and T/U per pair.

    python bench/bench_overhead.py                      # flower and loop, 3 pairs each
    python bench/bench_overhead.py --mode flower --pairs 6 --rounds 30 --json overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _procs import kill_group, traice_server

HERE = Path(__file__).resolve()


def _emit(**data: Any) -> None:
    sys.stdout.write("@@" + json.dumps(data) + "\n")
    sys.stdout.flush()


# =============================================================================== one run (child)


def _flower_run(args: argparse.Namespace) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from traice.demo import _backend_config, apps, task

    times: dict[int, float] = {}
    accuracy: dict[int, float] = {}

    def on_round(server_round: int, acc: float) -> None:
        times[server_round] = time.perf_counter()
        accuracy[server_round] = acc

    fed = {"partition": args.partition, "alpha": 1.0, "seed": args.seed}
    if args.tracked:
        server_app = apps.make_server_app(
            rounds=args.rounds, clients=args.clients, server_url=args.server_url, run=args.run,
            country_iso_code="FRA", partition=args.partition, seed=args.seed, on_round=on_round,
            tracking_mode="machine-share",
        )
        client_app = apps.client_app
    else:
        # make_server_app without TraiceStrategy, the demo's ClientApp functions without traice_mod
        server_app = ServerApp()
        x_test, y_test = task.server_test_data(args.seed)

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = task.make_model()
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = task.evaluate(model, x_test, y_test)
            if server_round > 0:
                on_round(server_round, acc)
            return MetricRecord({"loss": loss, "accuracy": acc})

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            n = args.clients
            FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                   min_available_nodes=n).start(
                grid=grid, initial_arrays=ArrayRecord(task.make_model(args.seed).state_dict()),
                num_rounds=args.rounds,
                train_config=ConfigRecord({"lr": 0.05, "local-epochs": 1, **fed}),
                evaluate_config=ConfigRecord(fed), evaluate_fn=central_evaluate,
            )

        client_app = ClientApp()
        client_app.train()(apps.train)
        client_app.evaluate()(apps.evaluate)

    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config=_backend_config(args.clients))
    ended = time.perf_counter()
    first, last = min(times), max(times)
    _emit(total_s=ended - started, steady_s=times[last] - times[first], rounds=len(times),
          final_accuracy=accuracy[last])


def _loop_run(args: argparse.Namespace) -> None:
    import torch

    from traice import TraiceClient
    from traice.demo import task

    started = time.perf_counter()
    shares = [task.client_data(i, args.clients, kind=args.partition, seed=args.seed) for i in range(args.clients)]
    x_test, y_test = task.server_test_data(args.seed)
    global_state = task.make_model(args.seed).state_dict()
    clients = []
    if args.tracked:
        clients = [TraiceClient(args.server_url, run=args.run, node_id=f"client-{i}", country_iso_code="FRA",
                                sample_interval_s=1.0, tracking_mode="machine-share").start()
                   for i in range(args.clients)]
    round_start: dict[int, float] = {}
    cpu_start = 0.0
    acc = 0.0
    for number in range(1, args.rounds + 1):
        round_start[number] = time.perf_counter()
        if number == min(2, args.rounds):
            cpu_start = time.process_time()
        states, sizes = [], []
        for i, (x_train, y_train, x_val, y_val) in enumerate(shares):
            model = task.make_model()
            model.load_state_dict(global_state)
            context = clients[i].round(number, phase="train") if clients else contextlib.nullcontext()
            with context as handle:
                task.train(model, x_train, y_train, epochs=args.local_epochs, lr=0.05, seed=number)
                val_loss, val_acc = task.evaluate(model, x_val, y_val)
                if handle is not None:
                    handle.report(accuracy=val_acc, loss=val_loss, num_examples=len(y_train))
            states.append(model.state_dict())
            sizes.append(len(y_train))
        total = sum(sizes)
        global_state = {k: sum(s[k] * (n / total) for s, n in zip(states, sizes)) for k in states[0]}
        model = task.make_model()
        model.load_state_dict(global_state)
        _, acc = task.evaluate(model, x_test, y_test)
    ended_rounds = time.perf_counter()
    cpu_s = time.process_time() - cpu_start
    for client in clients:
        client.stop()
    ended = time.perf_counter()
    del torch
    _emit(total_s=ended - started, steady_s=ended_rounds - round_start[min(2, args.rounds)], rounds=args.rounds,
          final_accuracy=acc, stop_s=ended - ended_rounds, steady_cpu_s=cpu_s)


# =============================================================================== orchestrator


def _child(mode: str, tracked: bool, args: argparse.Namespace, server_url: str, env: dict[str, str],
           run: str) -> dict[str, Any]:
    rounds = args.loop_rounds if mode == "loop" else args.rounds
    argv = [sys.executable, str(HERE), "--role", mode, "--rounds", str(rounds), "--clients", str(args.clients),
            "--seed", str(args.seed), "--partition", args.partition, "--server-url", server_url, "--run", run,
            "--local-epochs", str(args.local_epochs)]
    if tracked:
        argv.append("--tracked")
    machine0 = _machine_cpu()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
        raise RuntimeError(f"{mode} run exceeded {args.run_timeout:.0f} s") from None
    finally:
        kill_group(proc)  # Ray's helpers, if any outlived the run
    machine1 = _machine_cpu()
    lines = [line for line in out.splitlines() if line.startswith("@@")]
    if proc.returncode != 0 or not lines:
        causes = [line for line in err.splitlines() if "Error" in line or "error" in line][:5]
        raise RuntimeError(f"{mode} run failed ({proc.returncode}): {' | '.join(causes)}\n{err[-20000:]}")
    figures: dict[str, Any] = json.loads(lines[-1][2:])
    # the whole machine's busy cores over the run: others' work on a shared machine shows here
    figures["machine_busy_cores"] = round((machine1[0] - machine0[0]) / (machine1[1] - machine0[1]), 2)
    return figures


def _machine_cpu() -> tuple[float, float]:
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["flower", "loop", "both"], default="both")
    parser.add_argument("--pairs", type=int, default=3, help="tracked/untracked pairs per mode")
    parser.add_argument("--rounds", type=int, default=20, help="flower mode: rounds (the demo trains 60)")
    parser.add_argument("--loop-rounds", type=int, default=100,
                        help="loop mode: rounds (a round is ~0.2 s here, so more of them to time)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1, help="loop mode: local epochs per round")
    parser.add_argument("--partition", choices=["iid", "dirichlet"], default="dirichlet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds one run may take")
    parser.add_argument("--attempts", type=int, default=3, help="tries per run (Ray can fail to start)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--role", choices=["flower", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--tracked", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--server-url", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        # Exit as soon as the figures are out: a Flower simulation whose engine failed can leave
        # its ServerApp thread waiting for replies that never come.
        try:
            (_flower_run if args.role == "flower" else _loop_run)(args)
        except BaseException:  # noqa: BLE001 -- report any failure, then exit at once
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        sys.stdout.flush()
        os._exit(0)

    workdir = Path(tempfile.mkdtemp(prefix="traice-bench-overhead-"))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "TRAICE_LEDGER_DIR": str(workdir / "ledger"), "RAY_DEDUP_LOGS": "0"}
    for name in ("TRAICE_SERVER_URL", "TRAICE_RUN", "TRAICE_TOKEN", "TRAICE_TRACKING_MODE"):
        env.pop(name, None)
    started = datetime.now(timezone.utc)
    print(f"bench_overhead {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load average before "
          f"{os.getloadavg()[0]:.2f}; {args.clients} clients, {args.rounds} rounds, {args.pairs} pairs per mode")
    results: dict[str, Any] = {"started": started.isoformat(), "args": {k: v for k, v in vars(args).items()
                                                                       if v is not None and k != "json"}}
    with traice_server(f"sqlite:///{workdir / 'overhead.db'}", workdir / "server.log", env) as server_url:
        modes = ["flower", "loop"] if args.mode == "both" else [args.mode]
        failures: list[str] = []
        results["failures"] = failures
        for mode in modes:
            runs: list[dict[str, Any]] = []
            print(f"\n== {mode}")
            for pair in range(args.pairs):
                order = [True, False] if pair % 2 == 0 else [False, True]
                for tracked in order:
                    for attempt in range(1, args.attempts + 1):
                        try:
                            r = _child(mode, tracked, args, server_url, env, f"overhead-{mode}-{pair}-{attempt}")
                            break
                        except RuntimeError as exc:  # Ray fails to start now and then on a busy machine
                            failures.append(f"{mode} pair {pair} tracked={tracked} attempt {attempt}: {exc}")
                            print(f"   run failed (attempt {attempt}): {str(exc).splitlines()[0][:200]}", flush=True)
                            (workdir / f"failure-{len(failures)}.txt").write_text(str(exc))
                    else:
                        raise RuntimeError(f"{mode} run failed {args.attempts} times; see {workdir}")
                    r.update(pair=pair, tracked=tracked)
                    runs.append(r)
                    label = "tracked" if tracked else "untracked"
                    cpu = f"  training process CPU {r['steady_cpu_s']:6.2f} s" if "steady_cpu_s" in r else ""
                    print(f"   pair {pair} {label:<17} total {r['total_s']:7.2f} s  "
                          f"rounds 2-{r['rounds']} {r['steady_s']:7.2f} s{cpu}  machine busy "
                          f"{r['machine_busy_cores']:.2f} cores  final accuracy {r['final_accuracy']:.4f}",
                          flush=True)
            results[mode] = {"runs": runs, **_ratios(runs)}
        print()
        print(f"{'mode':<7} {'measure':<18} {'untracked s (median)':>21} {'tracked s (median)':>19} "
              f"{'T/U per pair':<40} {'median T/U':>10}")
        for mode in modes:
            last = args.loop_rounds if mode == "loop" else args.rounds
            for key, label in (("total_s", "whole run"), ("steady_s", f"rounds 2-{last}")):
                s = results[mode][key]
                pairs = " ".join(f"{x:.3f}" for x in s["ratios"])
                print(f"{mode:<7} {label:<18} {s['untracked_median']:>21.2f} {s['tracked_median']:>19.2f} "
                      f"{pairs:<40} {s['median_ratio']:>10.3f}")
        print(f"\nload average after: {os.getloadavg()[0]:.2f} (other work on the machine adds noise to every run)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


def _ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("total_s", "steady_s"):
        pairs: dict[int, dict[bool, float]] = {}
        for r in runs:
            pairs.setdefault(r["pair"], {})[r["tracked"]] = r[key]
        ratios = [p[True] / p[False] for p in pairs.values() if True in p and False in p]
        out[key] = {
            "ratios": [round(x, 4) for x in ratios],
            "median_ratio": round(statistics.median(ratios), 4),
            "tracked_median": statistics.median(r[key] for r in runs if r["tracked"] is True),
            "untracked_median": statistics.median(r[key] for r in runs if r["tracked"] is False),
        }
    return out


if __name__ == "__main__":
    main()
