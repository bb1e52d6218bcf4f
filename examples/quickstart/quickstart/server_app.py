"""The FL server's side: a Flower ServerApp running FedAvg, wrapped by TRAICE.

Runs on the SuperLink's machine (``server.py`` submits it). ``TraiceStrategy`` reports the
server's energy and each round's global accuracy, and tells every worker's ``traice_mod``
which TRAICE server and run to report to: the workers need no TRAICE settings of their own.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from traice.demo import task
from traice.flower import TraiceStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds = int(cfg["num-server-rounds"])  # type: ignore[arg-type]
    nodes = int(cfg["min-nodes"])  # type: ignore[arg-type]
    seed = int(cfg["seed"])  # type: ignore[arg-type]
    country = str(cfg["country"]) or None
    x_test, y_test = task.server_test_data(seed)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """The global model on the server's held-out digits: the run's accuracy on the dashboard."""
        model = task.make_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = task.evaluate(model, x_test, y_test)
        if server_round > 0:
            print(f"[quickstart] round {server_round}/{rounds}: global accuracy {accuracy:.3f}", flush=True)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    # TRAICE: wrap the strategy; server_url and run are passed on to the workers.
    strategy = TraiceStrategy(
        FedAvg(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=nodes,
            min_evaluate_nodes=nodes,
            min_available_nodes=nodes,
        ),
        server_url=str(cfg["traice-server"]),
        run=str(cfg["traice-run"]) or None,
        country_iso_code=country,
        client_country_iso_code=country,  # a worker's --country (node config traice-country) wins
        sample_interval_s=1.0,
    )
    print(f"[quickstart] TRAICE run {strategy.run!r} on {strategy.server_url}", flush=True)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(task.make_model(seed).state_dict()),
        num_rounds=rounds,
        timeout=float(cfg["round-timeout"]),  # type: ignore[arg-type]
        train_config=ConfigRecord({"lr": cfg["lr"], "local-epochs": cfg["local-epochs"]}),
        evaluate_fn=central_evaluate,
    )
    print(f"[quickstart] done: {rounds} rounds; see {strategy.server_url}", flush=True)
