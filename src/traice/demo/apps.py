"""The demo's Flower apps: a tracked ClientApp and a ServerApp running FedAvg wrapped by TRAICE.

``client_app`` lives at module level so Flower's simulation can import it in its Ray actors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ..flower import TraiceStrategy, traice_mod
from . import task

client_app = ClientApp(mods=[traice_mod])


def _data(msg: Message, context: Context) -> tuple[Any, ...]:
    config = msg.content["config"]
    return task.client_data(
        int(context.node_config["partition-id"]),  # type: ignore[arg-type]
        int(context.node_config["num-partitions"]),  # type: ignore[arg-type]
        kind=str(config.get("partition", "dirichlet")),
        alpha=float(config.get("alpha", 1.0)),  # type: ignore[arg-type]
        seed=int(config.get("seed", 0)),  # type: ignore[arg-type]
    )


def _model(msg: Message) -> Any:
    model = task.make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    x_train, y_train, _, _ = _data(msg, context)
    model = _model(msg)
    config = msg.content["config"]
    loss = task.train(
        model,
        x_train,
        y_train,
        epochs=int(config.get("local-epochs", 1)),  # type: ignore[arg-type]
        lr=float(config.get("lr", 0.05)),  # type: ignore[arg-type]
        seed=int(config.get("server-round", 0)),  # type: ignore[arg-type]
    )
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(y_train)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, _, x_val, y_val = _data(msg, context)
    loss, accuracy = task.evaluate(_model(msg), x_val, y_val)
    metrics = MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": len(y_val)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def make_server_app(
    *,
    rounds: int,
    clients: int,
    server_url: str,
    run: str,
    country_iso_code: str | None,
    partition: str = "dirichlet",
    alpha: float = 1.0,
    seed: int = 0,
    lr: float = 0.05,
    local_epochs: int = 1,
    on_round: Callable[[int, float], None] | None = None,
    tracking_mode: str = "machine-share",
) -> ServerApp:
    """A ServerApp that trains ``rounds`` rounds of FedAvg on all ``clients``, tracked by TRAICE."""
    app = ServerApp()
    x_test, y_test = task.server_test_data(seed)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = task.make_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = task.evaluate(model, x_test, y_test)
        if on_round is not None and server_round > 0:
            on_round(server_round, accuracy)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TraiceStrategy(
            FedAvg(
                fraction_train=1.0,
                fraction_evaluate=1.0,
                min_train_nodes=clients,
                min_evaluate_nodes=clients,
                min_available_nodes=clients,
            ),
            server_url=server_url,
            run=run,
            country_iso_code=country_iso_code,
            client_country_iso_code=country_iso_code,
            sample_interval_s=1.0,
            tracking_mode=tracking_mode,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(task.make_model(seed).state_dict()),
            num_rounds=rounds,
            train_config=ConfigRecord(
                {"lr": lr, "local-epochs": local_epochs, "partition": partition, "alpha": alpha, "seed": seed}
            ),
            evaluate_config=ConfigRecord({"partition": partition, "alpha": alpha, "seed": seed}),
            evaluate_fn=central_evaluate,
        )

    return app
