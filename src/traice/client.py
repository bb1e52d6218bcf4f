"""The worker library: measure each round's energy, report it with the model's quality, obey commands."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .carbon import Intensity, emissions_kg, intensity_for
from .measure import MeterLike, PowerSample, Reading, process_meter
from .protocol import Command, Hello, Location, Round
from .transport import Transport, worker_socket_url

log = logging.getLogger("traice")


@dataclass
class RoundReport:
    """What was reported for one measured interval (also returned to the caller)."""

    round: int
    phase: str
    duration_s: float
    cpu_energy_kwh: float
    gpu_energy_kwh: float
    ram_energy_kwh: float
    energy_kwh: float
    emissions_kg: float
    accuracy: float | None = None
    loss: float | None = None
    num_examples: int | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class RoundHandle:
    """Yielded by :meth:`TraiceClient.round`; call :meth:`report` with the round's results."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.results: dict[str, Any] = {}
        self.report_sent: RoundReport | None = None

    def report(
        self,
        *,
        accuracy: float | None = None,
        loss: float | None = None,
        num_examples: int | None = None,
        bytes_up: int | None = None,
        bytes_down: int | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        self.results = {
            "accuracy": accuracy,
            "loss": loss,
            "num_examples": num_examples,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "metrics": dict(metrics or {}),
        }


class TraiceClient:
    """Tracks one FL worker (or the FL server, with ``role="server"``) and streams it to TRAICE.

    ``start()``, ``update(epoch, accuracy, loss)`` and ``stop()`` work as in the original TRAICE;
    ``with client.round(n) as r: ...; r.report(...)`` and ``with TraiceClient(...) as client:``
    are the newer forms. Sending happens on a background thread: if the server is down,
    training goes on and reports wait in a bounded outbox; with ``outbox_path`` (or
    ``TRAICE_OUTBOX_PATH``) the outbox is also kept on disk, and what a crashed or stopped worker
    could not deliver is sent when it starts again with the same path.
    """

    def __init__(
        self,
        server_url: str = "http://localhost:3000",
        *,
        run: str | None = None,
        node_id: str | None = None,
        country_iso_code: str | None = None,
        region: str | None = None,
        pue: float = 1.0,
        token: str | None = None,
        role: str = "client",
        rounds_planned: int | None = None,
        sample_interval_s: float = 5.0,
        live_samples: bool = True,
        tracking_mode: str | None = None,
        outbox_max: int = 10_000,
        outbox_path: str | os.PathLike[str] | None = None,
        flush_timeout_s: float = 10.0,
        on_command: Callable[[Command], None] | None = None,
        obey_commands: bool = True,
        ack_commands: bool = True,
        meter: MeterLike | None = None,
    ) -> None:
        self.server_url = server_url
        self.url = worker_socket_url(server_url)
        self.run = run or os.environ.get("TRAICE_RUN") or "default"
        self.node_id = str(node_id) if node_id is not None else f"{socket.gethostname()}-{os.getpid()}"
        self.role = role
        self.rounds_planned = rounds_planned
        self.session = uuid.uuid4().hex
        self.region = region or os.environ.get("TRAICE_REGION")
        self.intensity: Intensity = intensity_for(country_iso_code or os.environ.get("TRAICE_COUNTRY"), self.region)
        self.pue = pue
        self.run_id: int | None = None
        self.live_samples = live_samples
        self.flush_timeout_s = flush_timeout_s
        self._on_command_cb = on_command
        self._obey_commands = obey_commands
        self._ack_commands = ack_commands
        self._meter = meter or process_meter(
            country_iso_code=self.intensity.country_iso_code,
            tracking_mode=tracking_mode or os.environ.get("TRAICE_TRACKING_MODE") or "process",
            sample_interval_s=sample_interval_s,
        )
        self._transport = Transport(
            self.url,
            self._hello,
            token=token or os.environ.get("TRAICE_TOKEN"),
            outbox_max=outbox_max,
            outbox_path=outbox_path or os.environ.get("TRAICE_OUTBOX_PATH") or None,
            on_command=self._on_command,
            on_run_id=self._set_run_id,
        )
        self._mark: Reading | None = None
        self._last_round: int | None = None
        self._started = False
        self._paused = False
        self._excluded = False
        self._go = threading.Event()  # set while neither paused nor excluded
        self._go.set()
        self._stop_requested = threading.Event()
        self._warned_nan = False

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> TraiceClient:
        """Start measuring and connect (in the background). Returns ``self``."""
        if self._started:
            return self
        self._meter.start()
        self._transport.start()
        self._mark = self._meter.read()
        if self.live_samples:
            self._meter.subscribe(self._on_sample)
        self._started = True
        return self

    def stop(self, reason: str | None = None, *, report_tail: bool = True) -> bool:
        """Report the energy since the last update, say bye, and deliver what is pending.

        Waits at most ``flush_timeout_s``; returns True if the server has everything.
        ``report_tail=False`` leaves the energy since the last report out (someone else's).
        """
        if not self._started:
            return True
        self._meter.unsubscribe(self._on_sample)
        tail = self._close_interval() if report_tail else Reading(0.0)
        if tail.energy_kwh > 0:
            self._send_round(self._last_round if self._last_round is not None else 0, "tail", tail, {})
        bye: dict[str, Any] = {"type": "bye", "final": self.role == "server"}
        if reason:
            bye["reason"] = reason[:500]
        self._transport.send(bye)
        self._started = False
        return self._transport.close(self.flush_timeout_s)

    def __enter__(self) -> TraiceClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- reporting

    def update(
        self,
        epoch: int,
        accuracy: float | None = None,
        loss: float | None = None,
        *,
        num_examples: int | None = None,
        bytes_up: int | None = None,
        bytes_down: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        phase: str = "round",
    ) -> RoundReport:
        """Close the interval since the previous call (or ``start``) and report it as round ``epoch``."""
        if not self._started:
            self.start()
        interval = self._close_interval()
        handle = RoundHandle(int(epoch))
        handle.report(accuracy=accuracy, loss=loss, num_examples=num_examples, bytes_up=bytes_up,
                      bytes_down=bytes_down, metrics=metrics)
        results = handle.results
        return self._send_round(int(epoch), phase, interval, results)

    @contextmanager
    def round(self, number: int, phase: str = "round") -> Iterator[RoundHandle]:
        """Measure the block as round ``number``; call ``handle.report(...)`` inside it."""
        if not self._started:
            self.start()
        self._mark = self._meter.read()  # the round starts here, not at the previous report
        if not self.live_samples:
            self._meter.subscribe(self._on_sample)
        handle = RoundHandle(number)
        try:
            yield handle
        finally:
            if not self.live_samples:
                self._meter.unsubscribe(self._on_sample)
            interval = self._close_interval()
            handle.report_sent = self._send_round(number, phase, interval, handle.results)

    @property
    def last_reading(self) -> Reading | None:
        """The meter reading at the end of the last reported interval (or the start of the current round)."""
        return self._mark

    def report_interval(self, number: int, phase: str, interval: Reading, *, working: bool = True) -> RoundReport:
        """Report energy measured elsewhere as part of round ``number`` (``working=False``: with
        duration 0, so that it does not count as the client's working time)."""
        if not working:
            interval = Reading(0.0, interval.cpu_kwh, interval.gpu_kwh, interval.ram_kwh)
        return self._send_round(number, phase, interval, {})

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the server has acknowledged every report so far."""
        return self._transport.flush(self.flush_timeout_s if timeout_s is None else timeout_s)

    @property
    def connected(self) -> bool:
        return self._transport.connected

    @property
    def unreachable(self) -> bool:
        """True while the server cannot be reached (reports wait in the outbox)."""
        return self._transport.unreachable

    # ---------------------------------------------------------------- commands

    @property
    def paused(self) -> bool:
        """True while the dashboard has paused this run."""
        return self._paused

    @property
    def excluded(self) -> bool:
        """True while the dashboard has taken this worker out of the next rounds."""
        return self._excluded

    @property
    def should_stop(self) -> bool:
        """True once the dashboard has asked the run to stop."""
        return self._stop_requested.is_set()

    def wait_if_paused(self, timeout_s: float | None = None) -> bool:
        """Block while paused or excluded (a stop ends the wait). Returns False on timeout."""
        return self._go.wait(timeout_s)

    def acknowledge(self, command_id: int, status: str = "done", detail: str | None = None) -> None:
        """Tell the server where a command stands: "acknowledged", "done" or "failed"."""
        message: dict[str, Any] = {"type": "command_ack", "command_id": command_id, "status": status}
        if detail:
            message["detail"] = detail[:500]
        self._transport.send(message)

    def _on_command(self, command: Command) -> None:
        for_someone_else = command.node_id not in (None, self.node_id) and self.role != "server"
        if not self._obey_commands or for_someone_else:
            return
        if command.action == "pause":
            self._paused = True
        elif command.action == "resume":
            self._paused = False
        elif command.action == "stop":
            self._stop_requested.set()
        elif command.node_id == self.node_id:
            self._excluded = command.action == "exclude"
        if self._stop_requested.is_set() or not (self._paused or self._excluded):
            self._go.set()
        else:
            self._go.clear()
        if self._on_command_cb is not None:
            try:
                self._on_command_cb(command)
            except Exception:
                log.exception("TRAICE on_command callback failed")
        if self._ack_commands:
            self.acknowledge(command.command_id, "done")

    # ---------------------------------------------------------------- internals

    def _hello(self) -> Hello:
        return Hello(
            run=self.run,
            run_id=self.run_id,
            node_id=self.node_id,
            session=self.session,
            role=self.role,  # type: ignore[arg-type]
            rounds_planned=self.rounds_planned,
            hardware=self._meter.hardware,
            location=Location(
                country_iso_code=self.intensity.country_iso_code,
                region=self.region,
                intensity_g_per_kwh=self.intensity.g_per_kwh,
                intensity_source=self.intensity.source,
                pue=self.pue,
            ),
            sdk_version=__version__,
        )

    def _set_run_id(self, run_id: int) -> None:
        self.run_id = run_id

    def _close_interval(self) -> Reading:
        now = self._meter.read()
        start = self._mark or now
        self._mark = now
        return now - start

    def _finite(self, name: str, value: float | None) -> float | None:
        if value is None:
            return None
        value = float(value)
        if math.isfinite(value):
            return value
        if not self._warned_nan:
            log.warning("TRAICE: %s is %s; reported as missing", name, value)
            self._warned_nan = True
        return None

    def _send_round(self, number: int, phase: str, interval: Reading, results: Mapping[str, Any]) -> RoundReport:
        energy = interval.energy_kwh
        metrics = {
            k: v
            for k, v in (results.get("metrics") or {}).items()
            if isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))
        }
        report = RoundReport(
            round=number,
            phase=phase,
            duration_s=interval.t,
            cpu_energy_kwh=interval.cpu_kwh,
            gpu_energy_kwh=interval.gpu_kwh,
            ram_energy_kwh=interval.ram_kwh,
            energy_kwh=energy,
            emissions_kg=emissions_kg(energy * self.pue, self.intensity.g_per_kwh),
            accuracy=self._finite("accuracy", results.get("accuracy")),
            loss=self._finite("loss", results.get("loss")),
            num_examples=results.get("num_examples"),
            bytes_up=results.get("bytes_up"),
            bytes_down=results.get("bytes_down"),
            metrics=metrics,
        )
        message = Round(
            seq=0,
            started_at=time.time() - interval.t,
            **report.__dict__,  # validated here, so a bad value fails in the caller, not the thread
        ).model_dump(exclude_none=True)
        del message["seq"]
        self._last_round = number
        self._transport.send(message)
        return report

    def _on_sample(self, sample: PowerSample) -> None:
        self._transport.send(
            {"type": "sample", "t": sample.t, "cpu_w": sample.cpu_w, "gpu_w": sample.gpu_w, "ram_w": sample.ram_w}
        )
