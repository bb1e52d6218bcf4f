"""The workers' side: a Flower ClientApp training a small MLP on its share of the digits.

Runs on every SuperNode (``worker.py``), one short-lived process per message. The model and
the data come from ``traice.demo.task`` (scikit-learn's bundled digits: nothing to download).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from traice.demo import task
from traice.flower import traice_mod

# The one line that adds TRAICE: the mod measures each train/evaluate message and reports its
# energy, emissions and metrics to the TRAICE server and run the ServerApp names.
app = ClientApp(mods=[traice_mod])


def _data(context: Context) -> tuple[Any, ...]:
    """This worker's share: partition ``partition-id`` of ``num-partitions`` (SuperNode --node-config)."""
    node, run = context.node_config, context.run_config
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no partition-id in its --node-config; start it with worker.py --node-id N")
    partition_id = int(node["partition-id"])  # type: ignore[arg-type]
    # num-partitions defaults to the number of workers the server trains with.
    num_partitions = int(node.get("num-partitions", run["min-nodes"]))  # type: ignore[arg-type]
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1}; give every worker.py the same "
            "--num-workers, larger than every --node-id"
        )
    return task.client_data(
        partition_id,
        num_partitions,
        kind=str(run["partition"]),
        alpha=float(run["alpha"]),  # type: ignore[arg-type]
        seed=int(run["seed"]),  # type: ignore[arg-type]
    )


def _model(msg: Message) -> Any:
    model = task.make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    x_train, y_train, _, _ = _data(context)
    model = _model(msg)
    config = msg.content["config"]
    loss = task.train(
        model,
        x_train,
        y_train,
        epochs=int(config["local-epochs"]),  # type: ignore[arg-type]
        lr=float(config["lr"]),  # type: ignore[arg-type]
        seed=int(config["server-round"]),  # type: ignore[arg-type]
    )
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(y_train)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, _, x_val, y_val = _data(context)
    loss, accuracy = task.evaluate(_model(msg), x_val, y_val)
    metrics = MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": len(y_val)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
