"""codecarbon adapter: one tracker per process, cumulative energy readings, live power.

Every ``TraiceClient`` in a process shares one :class:`Meter`: two machine-mode trackers in
one process would count the same energy twice, and codecarbon's first ``start()`` costs
about a second of hardware detection.

Why ``flush()`` rather than ``start_task``/``stop_task`` for per-round deltas: a task pauses
codecarbon's periodic scheduler, and with it the live power samples a dashboard shows
during a round. ``flush()`` measures at the boundary and keeps the scheduler running; the
delta between two readings is the same energy a task would return.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .protocol import Hardware

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    """Cumulative energy of this process's tracker at ``t`` (unix seconds)."""

    t: float
    cpu_kwh: float = 0.0
    gpu_kwh: float = 0.0
    ram_kwh: float = 0.0

    def __sub__(self, earlier: Reading) -> Reading:
        return Reading(
            t=self.t - earlier.t,
            cpu_kwh=max(0.0, self.cpu_kwh - earlier.cpu_kwh),
            gpu_kwh=max(0.0, self.gpu_kwh - earlier.gpu_kwh),
            ram_kwh=max(0.0, self.ram_kwh - earlier.ram_kwh),
        )

    @property
    def energy_kwh(self) -> float:
        return self.cpu_kwh + self.gpu_kwh + self.ram_kwh


@dataclass(frozen=True)
class PowerSample:
    """Instantaneous power at ``t`` (unix seconds), in watts."""

    t: float
    cpu_w: float
    gpu_w: float
    ram_w: float


SampleListener = Callable[[PowerSample], None]


def _make_output_handler(meter: Meter) -> Any:
    from codecarbon.output_methods.base_output import BaseOutput

    class _Handler(BaseOutput):  # type: ignore[misc]
        def out(self, total: Any, delta: Any) -> None:
            meter._on_total(total, live=False)

        def live_out(self, total: Any, delta: Any) -> None:
            meter._on_total(total, live=True)

    return _Handler()


class SampleFeed:
    """Listeners of live power samples, kept under the owner's ``_lock``."""

    _lock: threading.Lock
    _listeners: list[SampleListener]

    def subscribe(self, listener: SampleListener) -> None:
        with self._lock:
            if listener not in self._listeners:
                self._listeners.append(listener)

    def unsubscribe(self, listener: SampleListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)


class Meter(SampleFeed):
    """The process's codecarbon tracker: cumulative readings and live power samples."""

    def __init__(
        self,
        *,
        country_iso_code: str = "USA",
        tracking_mode: str = "process",
        sample_interval_s: float = 5.0,
    ) -> None:
        self.country_iso_code = country_iso_code
        self.tracking_mode = tracking_mode
        self.sample_interval_s = sample_interval_s
        self._lock = threading.Lock()  # guards readings and listeners
        self._lifecycle = threading.Lock()  # guards start/stop; codecarbon calls back into _on_total
        self._listeners: list[SampleListener] = []
        self._latest = Reading(t=time.time())
        self._tracker: Any = None
        self.hardware = Hardware()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start codecarbon (offline: it never looks up the location by IP)."""
        with self._lifecycle:
            if self._tracker is not None:
                return
            # codecarbon logs at INFO on its own logger before it applies log_level.
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            from codecarbon import OfflineEmissionsTracker

            self._tracker = OfflineEmissionsTracker(
                country_iso_code=self.country_iso_code,
                measure_power_secs=self.sample_interval_s,
                api_call_interval=1,
                output_methods=[],
                output_handlers=[_make_output_handler(self)],
                tracking_mode=self.tracking_mode,
                log_level="error",
                allow_multiple_runs=True,
            )
            if self.tracking_mode == "process":
                _count_own_process_only(self._tracker)
            self._tracker.start()
            self.hardware = describe_hardware(self._tracker)
        if self.hardware.cpu_power_method == "cpu_load":
            log.warning(
                "TRAICE: no RAPL energy counters here; codecarbon estimates CPU power from load "
                "(TDP x load). Energy figures are estimates."
            )

    def stop(self) -> None:
        with self._lifecycle:
            tracker, self._tracker = self._tracker, None
        if tracker is not None:
            _quiesce(tracker)
            tracker.stop()

    @property
    def running(self) -> bool:
        return self._tracker is not None

    # ---------------------------------------------------------------- readings

    def read(self) -> Reading:
        """Measure now and return the cumulative energy since the tracker started."""
        tracker = self._tracker
        if tracker is not None:
            tracker.flush()  # calls our handler's out() with fresh totals
        with self._lock:
            return self._latest

    def _on_total(self, total: Any, *, live: bool) -> None:
        now = time.time()
        reading = Reading(
            t=now,
            cpu_kwh=float(total.cpu_energy or 0.0),
            gpu_kwh=float(total.gpu_energy or 0.0),
            ram_kwh=float(total.ram_energy or 0.0),
        )
        with self._lock:
            self._latest = reading
            listeners = list(self._listeners) if live else []
        if listeners:
            sample = PowerSample(
                t=now,
                cpu_w=max(0.0, float(total.cpu_power or 0.0)),
                gpu_w=max(0.0, float(total.gpu_power or 0.0)),
                ram_w=max(0.0, float(total.ram_power or 0.0)),
            )
            for listener in listeners:
                try:
                    listener(sample)
                except Exception:  # a listener must never break measurement
                    log.exception("TRAICE sample listener failed")


def describe_hardware(tracker: Any) -> Hardware:
    """What codecarbon detected (call after its hardware detection), for ``hello``."""
    import platform

    conf = getattr(tracker, "_conf", {}) or {}
    method = None
    for hw in getattr(tracker, "_hardware", []):
        if type(hw).__name__ == "CPU":
            method = getattr(hw, "_mode", None)
    try:
        ram_gb = float(conf.get("ram_total_size")) if conf.get("ram_total_size") else None
    except (TypeError, ValueError):
        ram_gb = None
    return Hardware(
        os=conf.get("os") or platform.platform(),
        python=conf.get("python_version") or platform.python_version(),
        cpu_model=conf.get("cpu_model") or None,
        cpu_count=conf.get("cpu_count") or None,
        gpu_model=conf.get("gpu_model") or None,
        gpu_count=conf.get("gpu_count") or None,
        ram_gb=ram_gb,
        cpu_power_method=method,
    )


def _quiesce(tracker: Any) -> None:
    """Stop codecarbon's periodic measurements and wait for one in flight.

    codecarbon's scheduler cancels only the next timer: a measurement already running can reach
    its end after ``stop()`` has cleared the tracker's start time, and fails in its thread.
    """
    runs = []
    for name in ("_scheduler", "_scheduler_monitor_power"):
        scheduler = getattr(tracker, name, None)
        if scheduler is not None:
            scheduler.stop()
            runs.append(scheduler._run)
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer) and thread is not threading.current_thread():
            if getattr(thread, "function", None) in runs:
                thread.join(timeout=5.0)


def _count_own_process_only(tracker: Any) -> None:
    """Make codecarbon's process mode count this process, not its descendants.

    codecarbon adds the CPU time and memory of every child process. An FL server that starts
    Flower's simulation has the Ray actors, where the clients run, among its children: each
    client would be counted by its own meter and again by the server's. One meter per process,
    each counting its own process, counts every process once.
    """
    import psutil

    if hasattr(tracker, "_ensure_hardware_ready"):  # codecarbon 3.x detects hardware lazily, at start()
        tracker._ensure_hardware_ready()
    for hardware in getattr(tracker, "_hardware", []):
        kind = type(hardware).__name__
        if kind == "CPU" and hasattr(hardware, "_get_process_cpu_times"):
            process = psutil.Process()

            def own_cpu_times(process: Any = process) -> dict[int, float]:
                times = process.cpu_times()
                return {process.pid: times.user + times.system}

            hardware._get_process_cpu_times = own_cpu_times
        elif kind == "RAM" and hasattr(hardware, "_children"):
            hardware._children = False


class MeterLike(Protocol):
    """What a worker needs of a meter: :class:`Meter` or the ledger's ``MachineShareMeter``."""

    @property
    def hardware(self) -> Hardware: ...
    @property
    def running(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def read(self) -> Reading: ...
    def subscribe(self, listener: SampleListener) -> None: ...
    def unsubscribe(self, listener: SampleListener) -> None: ...


TRACKING_MODES = ("process", "machine", "machine-share")
_meter: MeterLike | None = None
_meter_lock = threading.Lock()


def process_meter(
    *, country_iso_code: str | None = None, tracking_mode: str = "process", sample_interval_s: float = 5.0
) -> MeterLike:
    """The process's shared meter, created on first use (the first caller's settings win).

    ``process`` and ``machine`` are codecarbon's modes; ``machine-share`` measures the machine once
    and shares its energy among the processes on it by CPU time (ledger.py), so that the parties
    on one machine add up to what it used.
    """
    if tracking_mode not in TRACKING_MODES:
        raise ValueError(f"tracking_mode must be one of {', '.join(TRACKING_MODES)}, not {tracking_mode!r}")
    global _meter
    with _meter_lock:
        if _meter is None:
            # codecarbon needs some country; TRAICE computes emissions itself (carbon.py)
            country = country_iso_code or "USA"
            if tracking_mode == "machine-share":
                from .ledger import MachineShareMeter  # ledger imports this module

                _meter = MachineShareMeter(country_iso_code=country, sample_interval_s=sample_interval_s)
            else:
                _meter = Meter(country_iso_code=country, tracking_mode=tracking_mode,
                               sample_interval_s=sample_interval_s)
        return _meter
