"""Per-machine energy ledger: one machine measurement, shared by the processes that run on it.

Many FL clients often run on one machine (Flower simulation's Ray actors, several workers on
one host). Their energies must add up to what the machine used. codecarbon cannot do that by
itself: two machine-mode trackers each count the whole machine, and process mode uses another
power model (TDP x CPU share, and a RAM power per process) whose sum over processes is not the
machine's energy. So:

* **One leader per machine (per user) measures the machine**, with codecarbon in machine mode.
  It is elected with an exclusive, non-blocking ``flock`` on ``<dir>/leader.lock``; the kernel
  releases the lock when the leader dies, and another participant (each tries every
  ``ELECTION_POLL_S`` in a background thread) takes over.
* **Every participating process registers** (``<dir>/procs/<pid>``, with its creation time so a
  reused pid is not mistaken for it).
* **Each interval** (``INTERVAL_S``, or at once when a reader asks) the leader takes the machine's
  energy since its previous interval and **apportions it among the registered, alive processes by
  their CPU time** in the interval (user + system of the process itself, children not included:
  an FL server's children are Ray actors that register themselves). If the participants together
  used (almost) no CPU (below ``IDLE_CPU_FRACTION`` of one core), the interval is split equally:
  idle power must be charged to someone, or the sum falls short of the machine. Everything the
  machine used is charged to participants, including what the OS or unregistered programs used,
  pro rata. CPU, GPU and RAM energy are split with the same CPU-time weights.
* **The ledger is files.** ``<dir>/state.json`` is the authoritative checkpoint: the interval
  counter, its end time, each process's cumulative energy and CPU time at that end. It is replaced
  atomically (write temp + ``os.replace``) once per interval, so an interval is either charged
  completely or not at all: a leader killed mid-write never double-charges. Then
  ``<dir>/energy/<pid>.json`` is written for each process (its own cumulative energy; what its
  meter reads). A new leader continues from these files, with a fresh codecarbon baseline.
* **Failover gap.** Between the old leader's last interval and the new leader's tracker start
  (at most about one interval plus one election poll) nobody measures the machine. The new leader
  charges that gap by extrapolating the average power of its first full interval back over it, and
  splits it by the CPU time the processes used since the checkpoint (exact: CPU times are
  cumulative counters); ``state.json`` keeps how much was extrapolated. A gap is not charged if
  it is longer than ``MAX_BACKFILL_S`` or if no process of the checkpoint is still registered (a
  new run after a finished one: nobody ran through the gap).

Reads are cheap and fresh. Between two intervals a process's share grows with its CPU time (that
is how the interval is apportioned), so :meth:`MachineShareMeter.read` estimates it from this
process's CPU seconds since the last interval at the last interval's energy per CPU second: a few
microseconds, no measurement, nothing to wait for, so a round boundary costs training nothing. The
next interval replaces the estimate with the charged figure; readings are cumulative and never go
back, so what the rounds report adds up to the ledger's total, give or take one interval's
estimation error at the very end. Until the first interval after this process registered is
charged (the first second of a run), when the last one held (almost) none of its CPU time, or while
the leader lags, a read asks for an interval instead:
it drops a request file in
``<dir>/requests/`` and waits (at most ``flush_timeout_s``, 1.5 s) for the leader to write an
interval that ends after the request; the leader looks for requests every ``REQUEST_POLL_S``, so
this usually takes a few milliseconds. A round's energy then ends at the round boundary, not up to
a second later, which matters for short rounds. If the leader does not answer in time (it was just
killed) the read returns the last value written: at most one interval late, never lost, since the
next read catches up. ``MachineShareMeter(estimate_reads=False)`` (or ``TRAICE_ESTIMATE_READS=0``) always asks. Request files rather than the mtime of one file: mtime is jiffy-granular on
tmpfs, two requests a few ms apart could look like one.

The leader's work per interval is O(registered processes): one ``listdir``, two ``/proc`` reads
and one small file per process (about 1 ms of CPU for a handful of processes). codecarbon's own
measuring timer is stopped in the leader: the leader measures (``flush()``) every interval itself,
and two threads measuring one tracker at the same moment would both charge the time since its last
measurement. Every participant builds (but does not start) its machine tracker when it starts:
codecarbon's hardware detection takes about a second, too long for a takeover; it also gives
``hardware``. The first participant does so before it starts measuring; the others in the
background, so that a worker joining a machine already measured does not wait for it.

Limits: one ledger per user (``/tmp/traice-ledger-<uid>``): two users' ledgers on one machine
each charge the whole machine. Processes in different PID namespaces or with different ``/tmp``
(containers) cannot share a ledger. A forked child does not inherit its parent's participation
(nor its leadership: the lock's descriptor is closed in the child); it may start its own meter.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .measure import PowerSample, Reading, SampleFeed, SampleListener, describe_hardware
from .protocol import Hardware

log = logging.getLogger(__name__)

#: Seconds between the leader's measurements of the machine.
INTERVAL_S = 1.0
#: Seconds between a standby participant's attempts to become leader.
ELECTION_POLL_S = 0.5
#: Seconds between the leader's looks at ``requests/``.
REQUEST_POLL_S = 0.02
#: A new leader's first interval lasts at least this long when it charges a failover gap with it.
MIN_FIRST_INTERVAL_S = 0.5
#: A failover gap longer than this is not charged (nobody was participating).
MAX_BACKFILL_S = 10.0
#: A read is estimated only from charged intervals with at least this much of our CPU time in them
#: (a nearly idle interval's energy per CPU second says little), and at most this old.
MIN_ESTIMATE_CPU_S = 0.02
MAX_ESTIMATE_AGE_S = 3.0
#: Participants together below this share of one core count as idle: the interval is split equally.
#: The leader's own bookkeeping (this module and codecarbon's sampling thread) is 1-2 % of a core:
#: it must not make the leader pay for an idle machine.
IDLE_CPU_FRACTION = 0.05
#: Energy files of processes gone for longer than this are removed.
STALE_FILE_S = 3600.0
#: Seconds between a participant's checks that its registration file still exists.
REGISTRATION_CHECK_S = 5.0
_CREATE_TIME_TOLERANCE_S = 0.05
_STATE_VERSION = 1


def default_dir() -> Path:
    """``$TRAICE_LEDGER_DIR`` or ``/tmp/traice-ledger-<uid>``: one ledger per machine and user.

    A fixed path, not ``tempfile.gettempdir()``: every process on the machine must find the same
    directory, whatever ``TMPDIR`` it was started with.
    """
    env = os.environ.get("TRAICE_LEDGER_DIR")
    return Path(env) if env else Path(f"/tmp/traice-ledger-{os.getuid()}")


# --------------------------------------------------------------------------- arithmetic


def _scaled(r: Reading, factor: float, t: float | None = None) -> Reading:
    return Reading(
        t=r.t if t is None else t, cpu_kwh=r.cpu_kwh * factor, gpu_kwh=r.gpu_kwh * factor, ram_kwh=r.ram_kwh * factor
    )


def _plus(a: Reading, b: Reading, t: float) -> Reading:
    return Reading(t=t, cpu_kwh=a.cpu_kwh + b.cpu_kwh, gpu_kwh=a.gpu_kwh + b.gpu_kwh, ram_kwh=a.ram_kwh + b.ram_kwh)


def apportion(delta: Reading, cpu_deltas: Mapping[int, float], *, idle_cpu_s: float = 0.0) -> dict[int, Reading]:
    """Split one interval's machine energy among processes by their CPU seconds in it.

    Every component (CPU, GPU, RAM) is split with the same weights; the shares add up to
    ``delta`` (up to float rounding) whenever there is at least one process. Negative or
    non-finite CPU deltas count as 0. If the processes together used at most ``idle_cpu_s``
    (or no) CPU, the interval is split equally. Each share keeps ``delta.t``.
    """
    if not cpu_deltas:
        return {}
    weights = {pid: (float(v) if math.isfinite(float(v)) and v > 0 else 0.0) for pid, v in cpu_deltas.items()}
    total = sum(weights.values())
    if total <= 0.0 or total <= idle_cpu_s:
        weights = dict.fromkeys(cpu_deltas, 1.0)
        total = float(len(weights))
    return {pid: _scaled(delta, w / total) for pid, w in weights.items()}


# --------------------------------------------------------------------------- files

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if it is missing, unreadable or corrupt (logged once)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        _warn_once(f"read:{path.parent.name}", "TRAICE ledger: cannot read %s (%s); counted as zero", path, exc)
        return None
    if not isinstance(data, dict):
        _warn_once(f"read:{path.parent.name}", "TRAICE ledger: %s is not a JSON object; counted as zero", path)
        return None
    return data


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _num(data: Mapping[str, Any], key: str) -> float:
    try:
        value = float(data.get(key) or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _cpu_baseline(entry: Mapping[str, Any]) -> float | None:
    value = entry.get("cpu_s")
    if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _reading_from(data: Mapping[str, Any]) -> Reading:
    return Reading(
        t=_num(data, "t"), cpu_kwh=_num(data, "cpu_kwh"), gpu_kwh=_num(data, "gpu_kwh"), ram_kwh=_num(data, "ram_kwh")
    )


def _same_process(a: float, b: float) -> bool:
    return abs(a - b) <= _CREATE_TIME_TOLERANCE_S


@dataclass(frozen=True)
class _Paths:
    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "leader.lock"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def procs(self) -> Path:
        return self.root / "procs"

    @property
    def energy(self) -> Path:
        return self.root / "energy"

    @property
    def requests(self) -> Path:
        return self.root / "requests"

    def energy_file(self, pid: int) -> Path:
        return self.energy / f"{pid}.json"

    def make(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.root.stat()
        if st.st_uid != os.getuid():
            # Someone else's directory in /tmp could feed us made-up energy figures.
            raise PermissionError(f"TRAICE ledger directory {self.root} belongs to uid {st.st_uid}, not to us")
        for sub in (self.procs, self.energy, self.requests):
            sub.mkdir(mode=0o700, exist_ok=True)


def read_ledger(dir: str | os.PathLike[str] | None = None) -> dict[int, Reading]:
    """Every process's cumulative energy in the ledger at ``dir``: the newer of its entry in
    ``state.json`` and its own file (readers and tests; gone processes are included)."""
    paths = _Paths(Path(dir) if dir is not None else default_dir())
    best: dict[int, tuple[int, float, Reading]] = {}  # pid -> (seq, create_time, reading)

    def offer(pid: int, entry: Mapping[str, Any]) -> None:
        seq = int(_num(entry, "seq"))
        if pid not in best or seq > best[pid][0]:
            best[pid] = (seq, _num(entry, "create_time"), _reading_from(entry))

    state = _read_json(paths.state) or {}
    procs = state.get("procs")
    if isinstance(procs, dict):
        for key, entry in procs.items():
            if isinstance(entry, dict) and str(key).isdigit():
                offer(int(key), {**entry, "seq": state.get("seq", 0), "t": state.get("t", 0)})
    with contextlib.suppress(OSError):
        for name in os.listdir(paths.energy):
            if name.endswith(".json") and name[:-5].isdigit():
                entry = _read_json(paths.energy / name)
                if entry is not None:
                    offer(int(name[:-5]), entry)
    return {pid: reading for pid, (_, _, reading) in best.items()}


def ledger_state(dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The leader's last checkpoint (``state.json``), or ``{}``."""
    return _read_json(_Paths(Path(dir) if dir is not None else default_dir()).state) or {}


def request_flush(dir: str | os.PathLike[str] | None = None, timeout_s: float = 1.5) -> bool:
    """Ask the leader for an interval now; True once one that ends after the request is written."""
    paths = _Paths(Path(dir) if dir is not None else default_dir())
    t_req = time.time()
    with contextlib.suppress(OSError):
        (paths.requests / f"{os.getpid()}").touch()
    deadline = time.monotonic() + timeout_s
    while True:
        if _num(ledger_state(paths.root), "t") >= t_req:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


# --------------------------------------------------------------------------- codecarbon


class _Totals:
    """Receives codecarbon's cumulative totals (``out`` at every ``flush``)."""

    def __init__(self) -> None:
        self.latest: Reading | None = None
        self.count = 0

    def set(self, total: Any) -> None:
        self.latest = Reading(
            t=time.time(),
            cpu_kwh=float(total.cpu_energy or 0.0),
            gpu_kwh=float(total.gpu_energy or 0.0),
            ram_kwh=float(total.ram_energy or 0.0),
        )
        self.count += 1


def _make_tracker(country_iso_code: str) -> tuple[Any, _Totals]:
    """A machine-mode tracker, hardware detected (about a second), not started."""
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    from codecarbon import OfflineEmissionsTracker
    from codecarbon.output_methods.base_output import BaseOutput

    totals = _Totals()

    class _Handler(BaseOutput):  # type: ignore[misc,unused-ignore]  # untyped base, depending on the version
        def out(self, total: Any, delta: Any) -> None:
            totals.set(total)

        def live_out(self, total: Any, delta: Any) -> None:
            pass  # the leader measures with flush(); out() gets the same totals

    tracker = OfflineEmissionsTracker(
        country_iso_code=country_iso_code,
        tracking_mode="machine",
        measure_power_secs=1,
        api_call_interval=1,
        output_methods=[],
        output_handlers=[_Handler()],
        log_level="error",
        allow_multiple_runs=True,
    )
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    if hasattr(tracker, "_ensure_hardware_ready"):  # codecarbon 3.x detects hardware lazily
        tracker._ensure_hardware_ready()
    return tracker, totals


# --------------------------------------------------------------------------- the leader


@dataclass
class _Registration:
    pid: int
    create_time: float
    registered_at: float
    cpu_at_registration: float
    process: Any  # psutil.Process


@dataclass
class _Account:
    create_time: float
    energy: Reading = field(default_factory=lambda: Reading(t=0.0))
    cpu_s: float | None = None  # CPU seconds at the last interval's end


def _cpu_seconds(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class _Leader:
    """The elected process's bookkeeping: one instance per term, driven by its participant."""

    def __init__(self, participant: _Participant, tracker: Any, totals: _Totals) -> None:
        self.p = participant
        self.paths = participant.paths
        self.tracker = tracker
        self.totals = totals
        self.regs: dict[int, _Registration] = {}
        self.accounts: dict[int, _Account] = {}
        self.seq = 0
        self.machine = Reading(t=0.0)  # cumulative machine energy charged by the ledger
        self.unattributed = Reading(t=0.0)
        self.extrapolated_s = 0.0  # failover gaps charged by extrapolation, seconds and kWh
        self.extrapolated_kwh = 0.0
        self.prev_total = Reading(t=0.0)
        self.t0 = 0.0
        self.interval_start = 0.0
        self.backfill_from: float | None = None
        self.last_cleanup = 0.0
        self.last_lock_check = 0.0

    # ------------------------------------------------------------ term

    def begin(self) -> None:
        import psutil

        state = _read_json(self.paths.state) or {}
        state_seq = self.seq = int(_num(state, "seq"))
        self.machine = _reading_from(_dict(state.get("machine")))
        self.unattributed = _reading_from(_dict(state.get("unattributed")))
        extrapolated = _dict(state.get("extrapolated"))
        self.extrapolated_s = _num(extrapolated, "s")
        self.extrapolated_kwh = _num(extrapolated, "kwh")
        self._scan_registrations()
        last_t = _num(state, "t")
        procs = _dict(state.get("procs"))
        for pid, reg in self.regs.items():
            entry = _dict(procs.get(str(pid)))
            account = _Account(create_time=reg.create_time)
            if entry and _same_process(_num(entry, "create_time"), reg.create_time):
                account.energy = _reading_from(entry)
                account.cpu_s = _cpu_baseline(entry)
            own = _read_json(self.paths.energy_file(pid))  # newer than the state only if the state was lost
            if own is not None and _same_process(_num(own, "create_time"), reg.create_time):
                if _num(own, "seq") > state_seq:
                    account.energy = _reading_from(own)
                    account.cpu_s = None
                self.seq = max(self.seq, int(_num(own, "seq")))
            self.accounts[pid] = account

        self.t0 = time.time()
        self.tracker.start()
        if getattr(self.tracker, "_start_time", 0) is None:  # codecarbon swallows its own errors
            raise RuntimeError("codecarbon's tracker did not start")
        scheduler = getattr(self.tracker, "_scheduler", None)
        if scheduler is not None:
            scheduler.stop()  # this leader measures (flush) itself; see the module docstring
        self.prev_total = Reading(t=self.t0)
        gap = self.t0 - last_t
        # Charge the gap only if processes of the last checkpoint are still here: they ran through
        # it. Processes of a new run after a finished one did not.
        continuing = any(account.cpu_s is not None for account in self.accounts.values())
        if last_t > 0 and 0 < gap <= MAX_BACKFILL_S and continuing:
            self.backfill_from = last_t
            self.interval_start = last_t
        else:
            self.backfill_from = None
            self.interval_start = self.t0
            for pid, account in self.accounts.items():  # CPU baselines from now, not from an old checkpoint
                try:
                    account.cpu_s = _cpu_seconds(self.regs[pid].process)
                except (psutil.Error, OSError):
                    account.cpu_s = None
        log.info("TRAICE ledger: pid %d leads %s (gap %.2f s)", os.getpid(), self.paths.root, gap if last_t else 0)

    def end(self) -> None:
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            with contextlib.suppress(Exception):
                tracker.stop()

    # ------------------------------------------------------------ polling

    def poll(self) -> None:
        """Called by the participant's thread every ``REQUEST_POLL_S``: run an interval if due."""
        now = time.time()
        if now - self.last_lock_check >= 5.0:
            self.last_lock_check = now
            if not self.p.lock_is_current():
                raise _LostLock()
        first = self.backfill_from is not None
        # A new leader's first tick is a full interval after its start: it extrapolates the gap from it.
        since = now - (self.t0 if first else self.interval_start)
        requested = self._take_requests(allowed=not first or now - self.t0 >= MIN_FIRST_INTERVAL_S)
        if requested or since >= INTERVAL_S:
            self.interval()
        if now - self.last_cleanup >= 60.0:
            self.last_cleanup = now
            self._cleanup()

    def _take_requests(self, *, allowed: bool) -> bool:
        try:
            names = os.listdir(self.paths.requests)
        except OSError:
            return False
        if not names or not allowed:
            return False
        # Remove before measuring: a request made after this point stays for the next poll, and
        # every request removed here is older than the interval's end.
        for name in names:
            with contextlib.suppress(OSError):
                (self.paths.requests / name).unlink()
        return True

    # ------------------------------------------------------------ one interval

    def interval(self) -> None:
        """Measure the machine since the last interval, apportion it, write the ledger."""
        tracker = self.tracker
        if tracker is None:
            return
        import psutil

        if self.backfill_from is not None:  # the first interval must be long enough to extrapolate from
            time.sleep(max(0.0, self.t0 + MIN_FIRST_INTERVAL_S - time.time()))
        count = self.totals.count
        # The interval's end: taken before measuring, so every request removed before is older.
        t_end = time.time()
        tracker.flush()  # calls the handler's out() with fresh cumulative totals
        if self.totals.count == count or self.totals.latest is None:
            _warn_once("flush", "TRAICE ledger: codecarbon returned no measurement; retrying next interval")
            return
        total = self.totals.latest
        delta = total - self.prev_total  # clamps each component at 0
        if self.backfill_from is not None:
            measured = t_end - self.t0
            if measured > 0:  # extrapolate the first interval's mean power over the failover gap
                gap = self.t0 - self.backfill_from
                self.extrapolated_s += gap
                self.extrapolated_kwh += delta.energy_kwh * gap / measured
                delta = _scaled(delta, (t_end - self.backfill_from) / measured)
            self.backfill_from = None
        duration = max(0.0, t_end - self.interval_start)
        delta = Reading(t=duration, cpu_kwh=delta.cpu_kwh, gpu_kwh=delta.gpu_kwh, ram_kwh=delta.ram_kwh)

        self._scan_registrations()
        cpu_now: dict[int, float] = {}
        cpu_deltas: dict[int, float] = {}
        for pid, reg in list(self.regs.items()):
            try:
                if not reg.process.is_running():  # gone, or its pid reused (psutil compares creation times)
                    raise ProcessLookupError(pid)
                cpu = _cpu_seconds(reg.process)
            except (psutil.Error, OSError):  # gone (NoSuchProcess, ZombieProcess) or not ours (AccessDenied)
                self._forget(pid, remove_file=True)
                continue
            cpu_now[pid] = cpu
            account = self.accounts.get(pid)
            if account is None:
                account = self.accounts[pid] = self._open_account(pid, reg)
            if account.cpu_s is not None:
                base = account.cpu_s
            elif reg.registered_at >= self.interval_start:
                base = reg.cpu_at_registration  # registered during this interval
            else:
                base = cpu  # first seen by this leader: no CPU baseline from before the interval
            cpu_deltas[pid] = cpu - base
        shares = apportion(delta, cpu_deltas, idle_cpu_s=IDLE_CPU_FRACTION * duration)
        if not shares:
            self.unattributed = _plus(self.unattributed, delta, 0.0)
        for pid, share in shares.items():
            account = self.accounts[pid]
            account.energy = _plus(account.energy, share, t_end)
            account.cpu_s = cpu_now[pid]
        self.machine = _plus(self.machine, delta, 0.0)
        self.seq += 1
        for pid in [pid for pid in self.accounts if pid not in self.regs]:
            del self.accounts[pid]
        self._write(t_end)
        self.prev_total = total
        self.interval_start = t_end
        self.p.on_interval(self.accounts.get(os.getpid()), t_end)

    def _open_account(self, pid: int, reg: _Registration) -> _Account:
        account = _Account(create_time=reg.create_time)
        own = _read_json(self.paths.energy_file(pid))
        if own is not None and _same_process(_num(own, "create_time"), reg.create_time):
            account.energy = _reading_from(own)  # the same process, registered again: its figures go on
        return account

    def _write(self, t_end: float) -> None:
        def entry(pid: int, account: _Account) -> dict[str, Any]:
            e = account.energy
            return {
                "pid": pid,
                "create_time": account.create_time,
                "cpu_s": account.cpu_s,
                "cpu_kwh": e.cpu_kwh,
                "gpu_kwh": e.gpu_kwh,
                "ram_kwh": e.ram_kwh,
            }

        def energy(r: Reading) -> dict[str, float]:
            return {"cpu_kwh": r.cpu_kwh, "gpu_kwh": r.gpu_kwh, "ram_kwh": r.ram_kwh}

        state = {
            "version": _STATE_VERSION,
            "seq": self.seq,
            "t": t_end,
            "leader": os.getpid(),
            "machine": energy(self.machine),
            "unattributed": energy(self.unattributed),
            "extrapolated": {"s": self.extrapolated_s, "kwh": self.extrapolated_kwh},
            "procs": {str(pid): entry(pid, a) for pid, a in self.accounts.items()},
        }
        try:
            _write_json(self.paths.state, state)  # the commit point of this interval
        except OSError as exc:
            _warn_once("write:state", "TRAICE ledger: cannot write %s: %s", self.paths.state, exc)
            return
        for pid, account in self.accounts.items():
            try:
                _write_json(self.paths.energy_file(pid), {**entry(pid, account), "seq": self.seq, "t": t_end})
            except OSError as exc:
                _warn_once("write:energy", "TRAICE ledger: cannot write energy file of pid %d: %s", pid, exc)

    # ------------------------------------------------------------ registrations

    def _scan_registrations(self) -> None:
        """Keep ``self.regs`` equal to the registered, alive processes (O(registered) per call)."""
        import psutil

        try:
            names = {int(n) for n in os.listdir(self.paths.procs) if n.isdigit()}
        except OSError:
            names = set()
        for pid in [pid for pid in self.regs if pid not in names]:
            self._forget(pid, remove_file=False)  # unregistered itself
        for pid in names - set(self.regs):
            path = self.paths.procs / str(pid)
            data = _read_json(path)
            if data is None:
                continue  # being written, or corrupt: looked at again next interval
            create_time = _num(data, "create_time")
            try:
                process = psutil.Process(pid)
                alive = _same_process(process.create_time(), create_time)
            except (psutil.Error, OSError):
                alive = False
            if not alive:
                self._remove_stale_registration(path, create_time)
                continue
            self.regs[pid] = _Registration(pid, create_time, _num(data, "registered_at"), _num(data, "cpu_s"), process)

    def _forget(self, pid: int, *, remove_file: bool) -> None:
        reg = self.regs.pop(pid, None)
        if remove_file and reg is not None:
            self._remove_stale_registration(self.paths.procs / str(pid), reg.create_time)

    @staticmethod
    def _remove_stale_registration(path: Path, create_time: float) -> None:
        again = _read_json(path)  # a new process with the same pid may just have registered
        if again is None or _same_process(_num(again, "create_time"), create_time):
            with contextlib.suppress(OSError):
                path.unlink()

    def _cleanup(self) -> None:
        now = time.time()
        for folder in (self.paths.root, self.paths.energy, self.paths.procs):  # left by killed writers
            with contextlib.suppress(OSError):
                for name in os.listdir(folder):
                    if name.startswith(".") and name.endswith(".tmp"):
                        with contextlib.suppress(OSError):
                            if now - (folder / name).stat().st_mtime > 60.0:
                                (folder / name).unlink()
        with contextlib.suppress(OSError):
            for name in os.listdir(self.paths.energy):
                stem = name[:-5] if name.endswith(".json") else ""
                path = self.paths.energy / name
                if stem.isdigit() and int(stem) in self.regs:
                    continue
                with contextlib.suppress(OSError):
                    if now - path.stat().st_mtime > STALE_FILE_S:
                        path.unlink()


class _LostLock(Exception):
    pass


# --------------------------------------------------------------------------- a participating process


class _Participant:
    """This process's membership in one ledger directory (shared by its meters on that directory)."""

    def __init__(self, root: Path, country_iso_code: str, flush_timeout_s: float,
                 estimate_reads: bool = True) -> None:
        self.paths = _Paths(root)
        self.estimate_reads = estimate_reads
        # The last two charged intervals' ends: (cumulative energy, our CPU seconds), for estimates.
        self._charged: list[tuple[Reading, float]] = []
        self.country_iso_code = country_iso_code
        self.flush_timeout_s = flush_timeout_s
        self.pid = os.getpid()
        self.create_time = 0.0
        self.refs = 0
        self.hardware = Hardware()
        self._hardware_ready = threading.Event()
        self.meters: list[MachineShareMeter] = []
        self._lock_fd: int | None = None
        self._leader: _Leader | None = None
        # One interval at a time (leader thread, leader's readers); reentrant for a listener that reads.
        self._interval_lock = threading.RLock()
        self._state_lock = threading.Lock()  # guards _latest
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prebuilt: tuple[Any, _Totals] | None = None
        self._latest = Reading(t=time.time())
        self._retry_at = 0.0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        import psutil

        self.paths.make()
        self._lock_fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        me = psutil.Process()
        self.create_time = me.create_time()
        cpu_s = _cpu_seconds(me)
        self._register(cpu_s)
        # Our share starts at zero at registration: with the first charged interval, reads can estimate.
        self._charged = [(Reading(t=time.time()), cpu_s)]
        self._stop.clear()
        if not self._try_lead():  # the first participant leads from the start
            # A standby needs its tracker only to take over: detect the hardware off the caller's thread.
            threading.Thread(target=self._prebuild, name="traice-ledger-setup", daemon=True).start()
        self._thread = threading.Thread(target=self._run, name="traice-ledger", daemon=True)
        self._thread.start()

    def _prebuild(self) -> None:
        try:
            prebuilt = _make_tracker(self.country_iso_code)
        except Exception:
            log.exception("TRAICE ledger: hardware detection failed")
            self._hardware_ready.set()  # hello goes without it rather than waiting for nothing
            return
        with self._interval_lock:
            if self._leader is None and not self._stop.is_set():
                self._prebuilt = prebuilt  # ready for a fast takeover
        self._learn_hardware(prebuilt[0])

    def _learn_hardware(self, tracker: Any) -> None:
        if self._hardware_ready.is_set():
            return
        self.hardware = describe_hardware(tracker)
        self._hardware_ready.set()
        if self.hardware.cpu_power_method == "cpu_load":
            _warn_once(
                "cpu_load",
                "TRAICE: no RAPL energy counters here; codecarbon estimates CPU power from "
                "load (TDP x load). Energy figures are estimates.",
            )

    def wait_hardware(self, timeout_s: float = 10.0) -> Hardware:
        """What codecarbon detected; waits (bounded) for a standby's detection in the background."""
        self._hardware_ready.wait(timeout_s)
        return self.hardware

    def stop(self) -> None:
        if self.forked:
            return  # a forked child never took part: nothing of it to undo (the registration is the parent's)
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(10.0)
        with self._interval_lock:
            leader, self._leader = self._leader, None
            if leader is not None:
                try:
                    leader.interval()  # charge everyone up to now; the next leader starts here
                except Exception:
                    log.exception("TRAICE ledger: final interval failed")
                leader.end()
        with contextlib.suppress(OSError):
            (self.paths.procs / str(self.pid)).unlink()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # releases the leadership, if we had it
            self._lock_fd = None
        self._prebuilt = None

    @property
    def is_leader(self) -> bool:
        return self._leader is not None

    @property
    def forked(self) -> bool:
        """True in a child forked from a participating process: the child does not take part."""
        return os.getpid() != self.pid

    def _register(self, cpu_s: float) -> None:
        _write_json(
            self.paths.procs / str(self.pid),
            {
                "pid": self.pid,
                "create_time": self.create_time,
                "registered_at": time.time(),
                "cpu_s": cpu_s,
            },
        )

    # ------------------------------------------------------------ leadership

    def _try_lead(self) -> bool:
        if self._leader is not None or self._lock_fd is None or time.monotonic() < self._retry_at:
            return self._leader is not None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # someone else leads
        if not self.lock_is_current():  # the lock file was replaced under us: lock the new one
            self._reopen_lock()
            return False
        tracker, totals = self._prebuilt or _make_tracker(self.country_iso_code)
        self._prebuilt = None
        self._learn_hardware(tracker)
        leader = _Leader(self, tracker, totals)
        try:
            with self._interval_lock:
                leader.begin()
                self._leader = leader
        except Exception:
            log.exception("TRAICE ledger: could not start measuring the machine; retrying in 30 s")
            leader.end()
            self._release_lock()
            self._retry_at = time.monotonic() + 30.0
            return False
        return True

    def lock_is_current(self) -> bool:
        if self._lock_fd is None:
            return False
        try:
            return os.fstat(self._lock_fd).st_ino == os.stat(self.paths.lock).st_ino
        except OSError:
            return False

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _reopen_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
        self._lock_fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _step_down(self) -> None:
        with self._interval_lock:
            leader, self._leader = self._leader, None
        if leader is not None:
            leader.end()
        self._release_lock()
        self._reopen_lock()
        log.warning("TRAICE ledger: %s was replaced; pid %d stops leading", self.paths.lock, self.pid)

    # ------------------------------------------------------------ background thread

    def _run(self) -> None:
        last_registration_check = time.monotonic()
        failures = 0
        while not self._stop.is_set():
            try:
                if self._leader is None:
                    self._try_lead()
                if self._leader is not None:
                    with self._interval_lock:
                        if self._leader is not None:
                            self._leader.poll()
                else:
                    self._refresh_from_file()
                if time.monotonic() - last_registration_check >= REGISTRATION_CHECK_S:
                    last_registration_check = time.monotonic()
                    if not (self.paths.procs / str(self.pid)).exists():  # removed (a /tmp cleaner?): again
                        import psutil

                        self.paths.make()
                        self._register(_cpu_seconds(psutil.Process()))
            except _LostLock:
                self._step_down()
            except Exception:
                failures += 1
                if failures == 1:
                    log.exception("TRAICE ledger thread (logged once; retrying every second)")
                else:
                    log.debug("TRAICE ledger thread", exc_info=True)
                self._stop.wait(1.0)
            self._stop.wait(REQUEST_POLL_S if self._leader is not None else ELECTION_POLL_S)

    # ------------------------------------------------------------ readings

    def read(self) -> Reading:
        """This process's cumulative energy as of now (see the module docstring)."""
        if self.forked:
            return self._latest  # the parent's last figure; locks may have been held at the fork
        if self.estimate_reads:
            estimate = self._estimate()
            if estimate is not None:
                self._publish(estimate)
                return self._current()
        return self._measured_read()

    def _estimate(self) -> Reading | None:
        """Our energy now, from our CPU seconds since the last charged interval at its energy per
        CPU second; None when the charged intervals cannot tell (too old, or too idle)."""
        with self._state_lock:
            if len(self._charged) < 2:
                return None
            (before, cpu_before), (last, cpu_last) = self._charged
        now = time.time()
        cpu_in_last = cpu_last - cpu_before
        if cpu_in_last < MIN_ESTIMATE_CPU_S or now - last.t > MAX_ESTIMATE_AGE_S:
            return None
        times = os.times()  # this process's user + system seconds, as the leader counts them
        k = max(0.0, times.user + times.system - cpu_last) / cpu_in_last
        return Reading(
            t=now,
            cpu_kwh=last.cpu_kwh + k * max(0.0, last.cpu_kwh - before.cpu_kwh),
            gpu_kwh=last.gpu_kwh + k * max(0.0, last.gpu_kwh - before.gpu_kwh),
            ram_kwh=last.ram_kwh + k * max(0.0, last.ram_kwh - before.ram_kwh),
        )

    def _charged_interval(self, reading: Reading, cpu_s: Any) -> None:
        """Remember a charged interval's end (from the leader or our energy file) for estimates."""
        if not isinstance(cpu_s, (int, float)):
            return
        with self._state_lock:
            if self._charged and reading.t <= self._charged[-1][0].t:
                return
            self._charged = [*self._charged[-1:], (reading, float(cpu_s))]

    def _measured_read(self) -> Reading:
        """Ask for an interval that ends now and return our figure from it."""
        if self._leader is not None:
            with self._interval_lock:
                if self._leader is not None:
                    try:
                        self._leader.interval()
                    except Exception:
                        log.exception("TRAICE ledger interval failed")
                    return self._current()
        t_req = time.time()
        with contextlib.suppress(OSError):
            (self.paths.requests / str(self.pid)).touch()
        deadline = time.monotonic() + self.flush_timeout_s
        while True:
            if self._refresh_from_file() >= t_req or self._leader is not None:
                break
            if time.monotonic() >= deadline:
                _warn_once(
                    "stale",
                    "TRAICE ledger: no fresh interval within %.1f s; reading the last one",
                    self.flush_timeout_s,
                )
                break
            time.sleep(0.01)
        if self._leader is not None:  # became leader while waiting
            return self._measured_read()
        return self._current()

    def _current(self) -> Reading:
        with self._state_lock:
            return self._latest

    def _refresh_from_file(self) -> float:
        """Take this process's cumulative energy from its file; returns the file's interval end."""
        data = _read_json(self.paths.energy_file(self.pid))
        if data is None or not _same_process(_num(data, "create_time"), self.create_time):
            return 0.0  # not charged yet, or the file of an earlier process with our pid
        reading = _reading_from(data)
        self._charged_interval(reading, data.get("cpu_s"))
        self._publish(reading)
        return reading.t

    def on_interval(self, account: _Account | None, t_end: float) -> None:
        """The leader charged an interval; keep our own figure (the leader's process reads it here)."""
        if account is not None:
            e = account.energy
            reading = Reading(t=t_end, cpu_kwh=e.cpu_kwh, gpu_kwh=e.gpu_kwh, ram_kwh=e.ram_kwh)
            self._charged_interval(reading, account.cpu_s)
            self._publish(reading)

    def _publish(self, reading: Reading) -> None:
        with self._state_lock:
            old = self._latest
            if reading.t <= old.t and reading.energy_kwh <= old.energy_kwh:
                return
            # Monotonic: a reading never goes back, whatever a file says.
            self._latest = Reading(
                t=max(old.t, reading.t),
                cpu_kwh=max(old.cpu_kwh, reading.cpu_kwh),
                gpu_kwh=max(old.gpu_kwh, reading.gpu_kwh),
                ram_kwh=max(old.ram_kwh, reading.ram_kwh),
            )
            latest = self._latest
            meters = list(self.meters)
        for meter in meters:
            meter._on_reading(latest)


_participants: dict[Path, _Participant] = {}
_participants_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A forked child inherits the lock's descriptor, and with it the leadership, but none of the
    # threads: close it so the parent (or its successor) keeps leading. The child does not take
    # part (its CPU time is not counted, like any child's); a meter it starts afresh would.
    for participant in _participants.values():
        if participant._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(participant._lock_fd)
        participant._lock_fd = None
        participant._leader = None
        participant._prebuilt = None
    _participants.clear()


@atexit.register
def _stop_at_exit() -> None:
    # A process that exits without stopping its meter still hands over cleanly: a last interval
    # charges it up to now, and the next leader starts from there.
    for participant in list(_participants.values()):
        with contextlib.suppress(Exception):
            participant.stop()
    _participants.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------- the meter


class MachineShareMeter(SampleFeed):
    """This process's share of its machine's energy: the interface of :class:`traice.measure.Meter`.

    ``read()`` returns the cumulative energy apportioned to this process since it registered.
    The shares of all processes on the machine that use this meter (with the same ``dir``) add
    up to what the machine used. Live samples are this process's share of the machine's power.
    """

    tracking_mode = "machine-share"

    def __init__(
        self,
        *,
        country_iso_code: str = "USA",
        sample_interval_s: float = 5.0,
        dir: str | os.PathLike[str] | None = None,
        flush_timeout_s: float = 1.5,
        estimate_reads: bool | None = None,
    ) -> None:
        self.country_iso_code = country_iso_code
        if estimate_reads is None:  # TRAICE_ESTIMATE_READS=0: measure at every read (exact rounds, slower)
            estimate_reads = os.environ.get("TRAICE_ESTIMATE_READS", "1").strip().lower() not in ("0", "false", "no")
        self.estimate_reads = estimate_reads
        self.sample_interval_s = sample_interval_s
        self.dir = Path(dir) if dir is not None else default_dir()
        self.flush_timeout_s = flush_timeout_s
        self._participant: _Participant | None = None
        self._lifecycle = threading.Lock()
        self._lock = threading.Lock()
        self._listeners: list[SampleListener] = []
        self._latest = Reading(t=time.time())
        self._last_sample: Reading | None = None

    def start(self) -> None:
        with self._lifecycle:
            if self._participant is not None and not self._participant.forked:
                return
            self._participant = None  # a meter inherited through fork: the child takes part anew
            key = self.dir.resolve()
            with _participants_lock:
                participant = _participants.get(key)
                if participant is None:
                    participant = _Participant(key, self.country_iso_code, self.flush_timeout_s,
                                               self.estimate_reads)
                    participant.start()
                    _participants[key] = participant
                participant.refs += 1
                participant.meters.append(self)
            self._participant = participant

    @property
    def hardware(self) -> Hardware:
        """What codecarbon detected (for ``hello``); a joining process may wait for it a moment."""
        participant = self._participant
        return participant.wait_hardware() if participant is not None else Hardware()

    def stop(self) -> None:
        with self._lifecycle:
            participant, self._participant = self._participant, None
            if participant is None:
                return
            with _participants_lock:
                if self in participant.meters:
                    participant.meters.remove(self)
                participant.refs -= 1
                last = participant.refs <= 0
                if last and _participants.get(participant.paths.root) is participant:
                    del _participants[participant.paths.root]
            if last:
                participant.stop()

    @property
    def running(self) -> bool:
        return self._participant is not None

    @property
    def is_leader(self) -> bool:
        """True while this process measures the machine for the ledger."""
        participant = self._participant
        return participant is not None and participant.is_leader

    def read(self) -> Reading:
        """This process's cumulative share of the machine's energy, as of now."""
        participant = self._participant
        if participant is not None:
            self._on_reading(participant.read())
        with self._lock:
            return self._latest

    def _on_reading(self, reading: Reading) -> None:
        """A newer cumulative figure: keep it, and every ``sample_interval_s`` tell listeners the power."""
        with self._lock:
            if reading.t >= self._latest.t:
                self._latest = reading
            previous = self._last_sample
            due = previous is None or reading.t - previous.t >= self.sample_interval_s
            if due:
                self._last_sample = reading
            listeners = list(self._listeners) if due and previous is not None else []
        if not listeners or previous is None:
            return
        dt_h = (reading.t - previous.t) / 3600.0
        if dt_h <= 0:
            return
        d = reading - previous
        sample = PowerSample(
            t=reading.t, cpu_w=1000 * d.cpu_kwh / dt_h, gpu_w=1000 * d.gpu_kwh / dt_h, ram_w=1000 * d.ram_kwh / dt_h
        )
        for listener in listeners:
            try:
                listener(sample)
            except Exception:  # a listener must never break measurement
                log.exception("TRAICE sample listener failed")
