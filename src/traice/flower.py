"""Flower integration: a client mod and a strategy wrapper. Two lines make a Flower app tracked::

    app = ClientApp(mods=[traice_mod])
    strategy = TraiceStrategy(FedAvg(...), server_url="http://traice-host:3000", run="my-exp")

The wrapper tells the clients where TRAICE is (a ``traice`` ConfigRecord on every message),
so workers need no configuration of their own; ``TRAICE_SERVER_URL`` / ``TRAICE_RUN`` /
``TRAICE_COUNTRY`` in a worker's environment, or ``traice-server`` / ``traice-node-id`` /
``traice-country`` in a SuperNode's ``--node-config``, override it.

Clients are kept in this module, one per (server, run, node) and one meter per process: in
simulation one Ray actor serves many virtual nodes in turn (the most recently used
``MAX_OPEN_CLIENTS`` stay connected); with the deployment engine each message runs in a fresh
process, which waits for the server's ack before it returns its reply.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .client import TraiceClient
from .measure import Reading
from .protocol import Command

log = logging.getLogger("traice")

RECORD = "traice"  # name of TRAICE's ConfigRecord; FedAvg would reject a second MetricRecord
ACCURACY_KEYS = ("accuracy", "acc", "eval_acc", "eval_accuracy", "val_accuracy", "test_accuracy")
LOSS_KEYS = ("loss", "eval_loss", "val_loss", "test_loss")
DELIVERY_WAIT_S = 5.0
#: Clients kept connected in one process (``TRAICE_MAX_OPEN_CLIENTS``); in a simulation of thousands
#: of virtual nodes the least recently used are closed (each holds a socket and threads) and
#: reconnect, as a new session, when sampled again.
MAX_OPEN_CLIENTS = int(os.environ.get("TRAICE_MAX_OPEN_CLIENTS") or 64)

_clients: OrderedDict[tuple[str, str, str], TraiceClient] = OrderedDict()
_clients_lock = threading.Lock()
# The meter reading at the end of this process's last message. In simulation one process serves
# many virtual clients in turn; its energy between two messages is charged to the next message's
# client (phase "idle"), so that the parties on a machine add up to what it used.
_process_mark: Reading | None = None


def _first(metrics: Any, keys: Iterable[str]) -> float | None:
    for key in keys:
        if key in metrics:
            value = metrics[key]
            if isinstance(value, (int, float)):
                return float(value)
    return None


def _bytes(content: RecordDict) -> int:
    # count_bytes is what Flower's own message_size_mod uses: O(records), no copy of the arrays.
    return sum(record.count_bytes() for name, record in content.items() if name != RECORD)


def _client_for(msg: Message, context: Context) -> TraiceClient:
    settings = msg.content.config_records.get(RECORD) or ConfigRecord()
    node_config = context.node_config
    server_url = str(
        node_config.get("traice-server") or os.environ.get("TRAICE_SERVER_URL") or settings.get("server-url")
        or "http://localhost:3000"
    )
    run = str(os.environ.get("TRAICE_RUN") or settings.get("run") or f"flower-{context.run_id}")
    if "traice-node-id" in node_config:
        node_id = str(node_config["traice-node-id"])
    elif "partition-id" in node_config:
        node_id = f"client-{node_config['partition-id']}"
    else:
        node_id = str(context.node_id)
    key = (server_url, run, node_id)
    with _clients_lock:
        client = _clients.get(key)
        if client is not None:
            _clients.move_to_end(key)
        else:
            country = node_config.get("traice-country") or os.environ.get("TRAICE_COUNTRY") or settings.get("country")
            region = node_config.get("traice-region") or os.environ.get("TRAICE_REGION")
            client = TraiceClient(
                server_url,
                run=run,
                node_id=node_id,
                country_iso_code=str(country) if country else None,
                region=str(region) if region else None,
                pue=float(node_config.get("traice-pue", 1.0)),  # type: ignore[arg-type]
                rounds_planned=int(settings["rounds"]) if "rounds" in settings else None,  # type: ignore[arg-type]
                sample_interval_s=float(settings.get("sample-interval-s", 5.0)),  # type: ignore[arg-type]
                tracking_mode=str(node_config.get("traice-tracking-mode") or os.environ.get("TRAICE_TRACKING_MODE")
                                  or settings.get("tracking-mode") or "process"),
                live_samples=False,  # a node's samples are sent only while its message runs
                obey_commands=False,  # the strategy (TraiceStrategy) carries out pause, stop, exclude
            )
            client.start()
            _clients[key] = client
            while len(_clients) > MAX_OPEN_CLIENTS:
                _, evicted = _clients.popitem(last=False)
                # Off the training thread: stop() waits for the server's acks. No tail: this
                # process's energy since that node's last message belongs to the nodes served since.
                threading.Thread(target=evicted.stop, kwargs={"report_tail": False},
                                 name="traice-evict", daemon=True).start()
    return client


_in_ray_actor: bool | None = None


def _long_lived() -> bool:
    """True in a Ray actor of Flower's simulation, which serves message after message.

    The deployment engine runs each message in a fresh ``flwr-clientapp`` process that exits right
    after its reply: there the mod must wait for the server's ack before it returns.
    """
    global _in_ray_actor
    if _in_ray_actor is None:
        ray = sys.modules.get("ray")
        try:
            _in_ray_actor = bool(ray is not None and ray.is_initialized()
                                 and ray.get_runtime_context().get_actor_id() is not None)
        except Exception:  # noqa: BLE001 - an unexpected Ray: wait for acks, as a short-lived process must
            _in_ray_actor = False
        if _in_ray_actor:
            atexit.register(_deliver_all)
    return _in_ray_actor


def _deliver_all(timeout_s: float = 3.0) -> None:
    """At exit of a long-lived process: give every client's reports a last chance to reach the server."""
    with _clients_lock:
        clients = list(_clients.values())
    for client in clients:
        if not client.unreachable:
            client.flush(timeout_s)


def traice_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower client mod: measure each train/evaluate message and report it to TRAICE.

    Reports the round's energy, bytes in and out, and the reply's metrics (accuracy and loss
    of evaluate messages; train metrics under ``metrics``). Adds a ``traice`` ConfigRecord
    with the energy to the reply, so a strategy can use it.
    """
    message_type = msg.metadata.message_type.split(".", 1)[0]
    if message_type not in ("train", "evaluate"):
        return call_next(msg, context)
    try:
        client = _client_for(msg, context)
        config = msg.content.config_records.get("config") or ConfigRecord()
        server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
    except Exception:  # tracking must never break training
        log.exception("TRAICE: could not set up tracking for this message")
        return call_next(msg, context)

    global _process_mark
    bytes_down = _bytes(msg.content)
    with client.round(server_round, phase=message_type) as measured:
        began = client.last_reading
        with _clients_lock:
            idle_since, _process_mark = _process_mark, None
        if idle_since is not None and began is not None:
            client.report_interval(server_round, "idle", began - idle_since, working=False)
        reply = call_next(msg, context)
        if reply.has_content():
            metrics = reply.content.metric_records.get("metrics")
            if metrics is None and reply.content.metric_records:
                metrics = next(iter(reply.content.metric_records.values()))
            metrics = metrics or MetricRecord()
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            examples = metrics.get("num-examples", metrics.get("num_examples"))
            evaluating = message_type == "evaluate"
            measured.report(
                accuracy=_first(metrics, ACCURACY_KEYS) if evaluating else None,
                loss=_first(metrics, LOSS_KEYS) if evaluating else None,
                num_examples=int(examples) if isinstance(examples, (int, float)) else None,
                bytes_up=_bytes(reply.content),
                bytes_down=bytes_down,
                metrics=numbers,
            )
    with _clients_lock:
        _process_mark = client.last_reading
    sent = measured.report_sent
    if reply.has_content() and sent is not None:
        reply.content[RECORD] = ConfigRecord(
            {
                "node-id": client.node_id,
                "flower-node-id": context.node_id,
                "energy-kwh": sent.energy_kwh,
                "emissions-kg": sent.emissions_kg,
                "duration-s": sent.duration_s,
            }
        )
    # Deliver before a short-lived ClientApp process exits (the deployment engine starts one per
    # message, so the link may still be opening). A simulation's actor lives on and delivers in the
    # background, training meanwhile; it waits only after the last planned round, whose reports would
    # otherwise race the simulation's shutdown. Never wait on a server known to be down.
    last_round = client.rounds_planned is not None and server_round >= client.rounds_planned
    if not client.unreachable and (last_round or not _long_lived()):
        client.flush(DELIVERY_WAIT_S)
    return reply


class _FilteredGrid:
    """The grid as the wrapped strategy sees it: excluded nodes are not there to be sampled."""

    def __init__(self, grid: Grid, hidden: set[int]) -> None:
        self._grid = grid
        self._hidden = hidden

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self._grid.get_node_ids() if node not in self._hidden]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class TraiceStrategy(Strategy):
    """Wrap any Flower strategy: report each round, and carry out the dashboard's commands.

    Delegates every decision to ``strategy``. Adds the ``traice`` ConfigRecord to the
    messages it sends so that clients with :func:`traice_mod` report to the same server and run.
    Pause holds before the next round starts (no client trains meanwhile); stop ends the run
    after the current round; an excluded client is not sampled from the next round on.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        server_url: str = "http://localhost:3000",
        run: str | None = None,
        country_iso_code: str | None = None,
        client_country_iso_code: str | None = None,
        region: str | None = None,
        pue: float = 1.0,
        node_id: str = "fl-server",
        sample_interval_s: float = 5.0,
        tracking_mode: str = "process",
        token: str | None = None,
    ) -> None:
        self.strategy = strategy
        self.tracking_mode = tracking_mode
        self.server_url = server_url
        self.run = run or f"flower-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        self.client_country_iso_code = client_country_iso_code
        self.sample_interval_s = sample_interval_s
        self.num_rounds: int | None = None
        self.client = TraiceClient(
            server_url,
            run=self.run,
            node_id=node_id,
            role="server",
            country_iso_code=country_iso_code,
            region=region,
            pue=pue,
            sample_interval_s=sample_interval_s,
            tracking_mode=tracking_mode,
            token=token,  # None: TRAICE_TOKEN; the clients' traice_mod reads TRAICE_TOKEN (never sent in messages)
            on_command=self._on_command,
            ack_commands=False,  # acknowledged here, when each command has really taken effect
        )
        self._federated: dict[int, MetricRecord | None] = {}
        self._lock = threading.Lock()
        self._excluded: set[str] = set()  # TRAICE node ids
        self._flower_ids: dict[str, int] = {}  # TRAICE node id -> Flower node id, learnt from replies
        self._hidden: set[int] = set()  # Flower node ids not sampled in the current round
        self._pending: dict[str, int] = {}  # action (or "exclude:<node>") -> command id, not yet done
        self.stopped_after: int | None = None  # last round trained when a stop took effect

    # ---------------------------------------------------------------- commands

    def _on_command(self, command: Command) -> None:
        with self._lock:
            if command.action in ("exclude", "include") and command.node_id:
                if command.action == "exclude":
                    self._excluded.add(command.node_id)
                else:
                    self._excluded.discard(command.node_id)
                self._pending[f"node:{command.node_id}"] = command.command_id
                self.client.acknowledge(command.command_id, "acknowledged", "applies from the next round")
            elif command.action == "resume":
                self._pending.pop("pause", None)
                self.client.acknowledge(command.command_id, "done", "training continues")
            elif command.action == "pause":
                self._pending["pause"] = command.command_id
                self.client.acknowledge(command.command_id, "acknowledged", "holds before the next round")
            elif command.action == "stop":
                self._pending["stop"] = command.command_id
                self.client.acknowledge(command.command_id, "acknowledged", "stops after the current round")

    def _done(self, key: str, detail: str) -> None:
        with self._lock:
            command_id = self._pending.pop(key, None)
        if command_id is not None:
            self.client.acknowledge(command_id, "done", detail)

    def _hold_if_paused(self, server_round: int) -> None:
        if self.client.paused and not self.client.should_stop:
            self._done("pause", f"holding before round {server_round}")
            log.warning("TRAICE: run paused before round %d; waiting for resume or stop", server_round)
            while self.client.paused and not self.client.should_stop:
                self.client.wait_if_paused(0.5)

    def _apply_exclusions(self, server_round: int) -> None:
        """At the start of a round: fix who is hidden from sampling for the whole round."""
        with self._lock:
            self._hidden = {self._flower_ids[n] for n in self._excluded if n in self._flower_ids}
            applied = [key for key in self._pending if key.startswith("node:")]
        for key in applied:
            self._done(key, f"from round {server_round}")

    def _delegate_sampling(self, method: Callable[..., Iterable[Message]], server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> list[Message]:
        hidden = len(self._hidden)
        # Flower strategies wait until min_*_nodes are connected: excluded ones never will be.
        saved = {}
        for attr in ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes"):
            value = getattr(self.strategy, attr, None)
            if isinstance(value, int) and hidden:
                saved[attr] = value
                setattr(self.strategy, attr, max(1, value - hidden))
        try:
            return self._tag(method(server_round, arrays, config, _FilteredGrid(grid, self._hidden)))
        finally:
            for attr, value in saved.items():
                setattr(self.strategy, attr, value)

    # ---------------------------------------------------------------- what the clients hear

    def _settings(self) -> ConfigRecord:
        settings: dict[str, Any] = {
            "server-url": self.server_url,
            "run": self.run,
            "sample-interval-s": self.sample_interval_s,
            "tracking-mode": self.tracking_mode,
        }
        if self.num_rounds is not None:
            settings["rounds"] = self.num_rounds
        if self.client_country_iso_code:
            settings["country"] = self.client_country_iso_code
        return ConfigRecord(settings)

    def _tag(self, messages: Iterable[Message]) -> list[Message]:
        tagged = list(messages)
        for message in tagged:
            message.content[RECORD] = self._settings()
        return tagged

    # ---------------------------------------------------------------- Strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._hold_if_paused(server_round)
        if self.client.should_stop or self.stopped_after is not None:
            if self.stopped_after is None:
                self.stopped_after = server_round - 1
                log.warning("TRAICE: run stopped after round %d", self.stopped_after)
            return []  # the remaining rounds pass without training
        self._apply_exclusions(server_round)
        return self._delegate_sampling(self.strategy.configure_train, server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.stopped_after is not None:
            return None, None
        replies = list(replies)
        for reply in replies:
            if reply.has_content() and RECORD in reply.content.config_records:
                record = reply.content.config_records[RECORD]
                with self._lock:
                    self._flower_ids[str(record["node-id"])] = reply.metadata.src_node_id
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stopped_after is not None:
            return []
        return self._delegate_sampling(self.strategy.configure_evaluate, server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.stopped_after is not None:
            return None
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        self._federated[server_round] = metrics
        return metrics

    def summary(self) -> None:
        self.strategy.summary()

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Any:
        """Run ``strategy`` as Flower's ``Strategy.start`` does, reported to TRAICE round by round."""
        self.num_rounds = num_rounds
        self.client.rounds_planned = num_rounds
        self.client.start()

        def evaluate_and_report(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if self.stopped_after is not None:
                return None
            central = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
            if server_round > 0:  # round 0 evaluates the initial model, before any training
                self._report(server_round, central)
            return central

        reason = "finished"
        try:
            return super().start(
                grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_and_report
            )
        except BaseException as exc:
            reason = f"failed: {type(exc).__name__}"
            raise
        finally:
            if self.stopped_after is not None:
                reason = f"stopped after round {self.stopped_after}"
                self._done("stop", reason)
            self.client.stop(reason=reason)

    def _report(self, server_round: int, central: MetricRecord | None) -> None:
        federated = self._federated.pop(server_round, None)
        # The global model's quality: the server's own evaluation if there is one, else the clients'.
        source = central if central else federated
        metrics: dict[str, Any] = {}
        for prefix, record in (("central", central), ("federated", federated)):
            for key, value in (record or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[f"{prefix}.{key}"] = value
        self.client.update(
            server_round,
            accuracy=_first(source, ACCURACY_KEYS) if source else None,
            loss=_first(source, LOSS_KEYS) if source else None,
            metrics=metrics,
        )
