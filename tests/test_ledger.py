"""The per-machine energy ledger, measured for real: processes' shares add up to the machine.

The reference for "what the machine used" is a plain codecarbon machine-mode tracker in the test
process, not the ledger. It is read at the same wall-clock moments at which the workers read their
meters (shared round boundaries), so both cover the same window.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from traice import ledger
from traice.ledger import MachineShareMeter, apportion, read_ledger, request_flush
from traice.measure import Meter, PowerSample, Reading

TOLERANCE = 0.05


# --------------------------------------------------------------------------- helpers


def _busy_until(deadline: float) -> None:
    x = 0
    while time.time() < deadline:
        for _ in range(2000):
            x += 1


def _sleep_until(deadline: float) -> None:
    while (left := deadline - time.time()) > 0:
        time.sleep(min(left, 0.05))


def _as_dict(r: Reading) -> dict[str, float]:
    return {"t": r.t, "cpu_kwh": r.cpu_kwh, "gpu_kwh": r.gpu_kwh, "ram_kwh": r.ram_kwh}


def _energy(d: dict[str, float]) -> float:
    return d["cpu_kwh"] + d["gpu_kwh"] + d["ram_kwh"]


class _Reference:
    """What the machine used: a plain codecarbon machine-mode tracker (not the ledger)."""

    def __init__(self) -> None:
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        from codecarbon import OfflineEmissionsTracker
        from codecarbon.output_methods.base_output import BaseOutput

        ref = self

        class _Out(BaseOutput):  # type: ignore[misc]
            def out(self, total: Any, delta: Any) -> None:
                ref.latest = Reading(
                    t=time.time(),
                    cpu_kwh=float(total.cpu_energy or 0),
                    gpu_kwh=float(total.gpu_energy or 0),
                    ram_kwh=float(total.ram_energy or 0),
                )

        self.latest = Reading(t=0.0)
        self.tracker = OfflineEmissionsTracker(
            country_iso_code="USA",
            tracking_mode="machine",
            measure_power_secs=1,
            api_call_interval=1,
            output_methods=[],
            output_handlers=[_Out()],
            log_level="error",
            allow_multiple_runs=True,
        )
        self.tracker.start()

    def read(self) -> Reading:
        self.tracker.flush()
        return self.latest

    def stop(self) -> None:
        self.tracker.stop()


@contextlib.contextmanager
def _processes(target: Any, args_list: list[tuple[Any, ...]], done: Any) -> Iterator[list[Any]]:
    """Start the workers; at the end (or on a failure) tell them to stop, and wait for them."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args, daemon=True) for args in args_list]
    for p in procs:
        p.start()
    try:
        yield procs
    finally:
        done.set()
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join(5)


def _get(q: Any, timeout: float) -> Any:
    return q.get(timeout=timeout)


# --------------------------------------------------------------------------- 1. shares add up


ROUNDS = 3
ROUND_S = 2.0
DUTIES = (1.0, 0.6, 0.3)  # share of each round a worker computes; it sleeps for the rest


def _share_worker(dir: str, index: int, duty: float, start: Any, go: Any, done: Any, out: Any) -> None:
    """One FL client: a ledger meter, plus two naive meters for contrast, read at shared boundaries."""
    logging.basicConfig(level=logging.WARNING)
    # Measured reads: this test is about how the machine is shared at the ledger's boundaries. An
    # estimated read (the default) is off by up to an interval's error at each edge of a 6 s window;
    # estimates have a test of their own.
    meter = MachineShareMeter(dir=dir, sample_interval_s=1.0, estimate_reads=False)
    naive = Meter(tracking_mode="machine", sample_interval_s=1.0)  # what TRAICE reports today in machine mode
    process = Meter(tracking_mode="process", sample_interval_s=1.0)  # ... and in process mode
    meter.start()
    naive.start()
    process.start()
    out.put(("ready", index, os.getpid()))
    go.wait(60)
    t0 = start.value
    reads: list[dict[str, Any]] = []
    for k in range(ROUNDS + 1):
        if k:
            _busy_until(t0 + (k - 1) * ROUND_S + duty * ROUND_S)
        _sleep_until(t0 + k * ROUND_S)
        t_read = time.time()
        reads.append(
            {
                "at": t_read,
                "share": _as_dict(meter.read()),
                "read_s": time.time() - t_read,
                "naive": _as_dict(naive.read()),
                "process": _as_dict(process.read()),
            }
        )
    out.put(("reads", index, os.getpid(), reads, meter.is_leader))
    done.wait(60)  # stay registered until the test has read the ledger
    process.stop()
    naive.stop()
    meter.stop()


def test_shares_of_three_processes_add_up_to_the_machine(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    start, go, done, out = ctx.Value("d", 0.0), ctx.Event(), ctx.Event(), ctx.Queue()
    reference = _Reference()
    began = time.time()
    try:
        args = [(str(tmp_path), i, duty, start, go, done, out) for i, duty in enumerate(DUTIES)]
        with _processes(_share_worker, args, done) as procs:
            for _ in procs:
                assert _get(out, 60)[0] == "ready"
            ready_s = time.time() - began
            t0 = time.time() + 0.5
            start.value = t0
            go.set()
            _sleep_until(t0)
            ref_first = reference.read()
            _sleep_until(t0 + ROUNDS * ROUND_S)
            ref_last = reference.read()
            results = sorted((_get(out, 30) for _ in procs), key=lambda r: r[1])
            state = ledger.ledger_state(tmp_path)
            everyone = read_ledger(tmp_path)
            done.set()
    finally:
        reference.stop()

    machine = ref_last - ref_first
    per_worker = []
    for _, index, pid, reads, was_leader in results:
        first, last = reads[0], reads[-1]
        per_worker.append(
            {
                "index": index,
                "pid": pid,
                "leader": was_leader,
                "share": _energy(last["share"]) - _energy(first["share"]),
                "share_cpu": last["share"]["cpu_kwh"] - first["share"]["cpu_kwh"],
                "naive": _energy(last["naive"]) - _energy(first["naive"]),
                "process": _energy(last["process"]) - _energy(first["process"]),
                "window": last["share"]["t"] - first["share"]["t"],
                "read_s": max(r["read_s"] for r in reads),
                "rounds": [_energy(b["share"]) - _energy(a["share"]) for a, b in itertools.pairwise(reads)],
            }
        )
    share_sum = sum(w["share"] for w in per_worker)
    share_cpu_sum = sum(w["share_cpu"] for w in per_worker)
    naive_sum = sum(w["naive"] for w in per_worker)
    process_sum = sum(w["process"] for w in per_worker)

    print(f"\n[ledger] workers ready after {ready_s:.1f} s; window {machine.t:.2f} s (reference)")
    print(
        f"[ledger] machine (reference tracker): {machine.energy_kwh * 3.6e6:8.1f} J"
        f"  (cpu {machine.cpu_kwh * 3.6e6:.1f} J, ram {machine.ram_kwh * 3.6e6:.1f} J)"
    )
    for w in per_worker:
        print(
            f"[ledger]   worker {w['index']} (duty {DUTIES[w['index']]:.1f}{', leader' if w['leader'] else ''}):"
            f" share {w['share'] * 3.6e6:7.1f} J over {w['window']:.2f} s,"
            f" rounds {[round(r * 3.6e6, 1) for r in w['rounds']]} J, slowest read {w['read_s'] * 1000:.0f} ms"
        )
    print(
        f"[ledger] sum of shares:                {share_sum * 3.6e6:8.1f} J = {share_sum / machine.energy_kwh:.3f}"
        f" x machine (cpu part {share_cpu_sum / machine.cpu_kwh:.3f} x)"
    )
    print(
        f"[ledger] naive, 3 machine-mode trackers: {naive_sum * 3.6e6:8.1f} J = "
        f"{naive_sum / machine.energy_kwh:.2f} x machine"
    )
    print(
        f"[ledger] naive, 3 process-mode trackers: {process_sum * 3.6e6:8.1f} J = "
        f"{process_sum / machine.energy_kwh:.2f} x machine"
    )

    assert machine.energy_kwh > 0
    assert abs(share_sum / machine.energy_kwh - 1) <= TOLERANCE
    # The CPU part alone (RAM is most of the total here): codecarbon's machine-mode CPU power is
    # cubic in a load sampled once a second, so a part this small varies by up to ~15 % between
    # two trackers over 6 s; the requirement (within 5 %) is on the total, asserted above.
    assert abs(share_cpu_sum / machine.cpu_kwh - 1) <= 4 * TOLERANCE
    assert sum(1 for w in per_worker if w["leader"]) == 1
    # Shares follow the work: the worker that computes all the time gets the most.
    shares = [w["share"] for w in sorted(per_worker, key=lambda w: w["index"])]
    assert shares[0] > shares[1] > shares[2] > 0
    # Reads are fresh: each waits for the leader's interval, which takes milliseconds, not a second.
    assert all(abs(w["window"] - ROUNDS * ROUND_S) < 0.3 for w in per_worker)
    # The ledger charged exactly what it measured, once: its accounts add up to its machine total.
    charged = sum(r.energy_kwh for r in everyone.values())
    assert math.isclose(charged, sum(state["machine"].values()), rel_tol=1e-9)
    assert naive_sum > 2.5 * machine.energy_kwh


# --------------------------------------------------------------------------- 2. failover


RUN_S = 8.0
KILL_AT_S = 3.0


def _failover_worker(dir: str, index: int, start: Any, go: Any, done: Any, out: Any) -> None:
    meter = MachineShareMeter(dir=dir, sample_interval_s=1.0)
    meter.start()
    out.put(("ready", index, os.getpid()))
    go.wait(60)
    t0 = start.value
    _sleep_until(t0)
    k = 0
    while True:
        reading = meter.read()
        out.put(("read", index, os.getpid(), time.time(), _as_dict(reading), meter.is_leader))
        k += 1
        if t0 + k * 0.5 > t0 + RUN_S:
            break
        _busy_until(t0 + k * 0.5 - (0.2 if index == 2 else 0.0))  # worker 2 rests a little
        _sleep_until(t0 + k * 0.5)
    out.put(("finished", index, os.getpid()))
    done.wait(60)
    meter.stop()


def test_a_killed_leader_is_replaced_and_nothing_is_lost_or_counted_twice(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    start, go, done = ctx.Value("d", 0.0), ctx.Event(), ctx.Event()
    # One queue each: a process killed while writing to a shared queue would leave its lock taken.
    outs = [ctx.Queue() for _ in range(3)]
    reference = _Reference()
    reads: dict[int, list[tuple[float, dict[str, float], bool]]] = {}
    try:
        args = [(str(tmp_path), i, start, go, done, outs[i]) for i in range(3)]
        with _processes(_failover_worker, args, done):
            pids = [_get(out, 60)[2] for out in outs]
            assert request_flush(tmp_path)
            old_leader = int(ledger.ledger_state(tmp_path).get("leader") or 0)
            assert old_leader in pids
            t0 = time.time() + 0.5
            start.value = t0
            go.set()
            _sleep_until(t0)
            assert request_flush(tmp_path)
            before = read_ledger(tmp_path)
            ref_first = reference.read()

            _sleep_until(t0 + KILL_AT_S)
            os.kill(old_leader, signal.SIGKILL)
            killed_at = time.time()

            finished: set[int] = set()
            deadline = time.time() + 30
            while len(finished) < len(pids) - 1 and time.time() < deadline:
                for out in outs:
                    with contextlib.suppress(queue.Empty):
                        message = out.get(timeout=0.02)
                        if message[0] == "read":
                            reads.setdefault(message[2], []).append((message[3], message[4], message[5]))
                        elif message[0] == "finished":
                            finished.add(message[2])
            assert len(finished) == len(pids) - 1
            assert request_flush(tmp_path)
            after = read_ledger(tmp_path)
            ref_last = reference.read()
            state = ledger.ledger_state(tmp_path)
            done.set()
    finally:
        reference.stop()

    new_leader = int(state.get("leader") or 0)
    machine = ref_last - ref_first
    total = sum(after[pid].energy_kwh - before.get(pid, Reading(t=0)).energy_kwh for pid in after)
    survivors = [pid for pid in pids if pid != old_leader]
    takeover = min(t for pid in survivors for t, _, leads in reads.get(pid, []) if leads and t > killed_at)
    print(
        f"\n[failover] leader {old_leader} killed {killed_at - t0:.1f} s into the run; {new_leader} leads "
        f"from {takeover - killed_at:.2f} s later at the latest"
    )
    print(
        f"[failover] machine (reference) {machine.energy_kwh * 3.6e6:.1f} J over {machine.t:.2f} s; "
        f"ledger {total * 3.6e6:.1f} J = {total / machine.energy_kwh:.3f} x machine"
    )
    for pid in pids:
        gained = after[pid].energy_kwh - before[pid].energy_kwh
        print(f"[failover]   pid {pid}{' (killed leader)' if pid == old_leader else ''}: {gained * 3.6e6:.1f} J")
    gap = state["extrapolated"]
    print(
        f"[failover] unmeasured gap {gap['s']:.2f} s charged by extrapolation: {gap['kwh'] * 3.6e6:.1f} J "
        f"(without it the ledger would be {(total - gap['kwh']) / machine.energy_kwh:.3f} x machine)"
    )

    assert new_leader in survivors
    assert 0 < gap["s"] < 3.0  # the old leader's unfinished interval + one election poll + start
    assert abs(total / machine.energy_kwh - 1) <= TOLERANCE
    for pid in survivors:
        series = [r for _, r, _ in sorted(reads[pid], key=lambda x: x[0])]
        for a, b in itertools.pairwise(series):  # cumulative, through the leader change
            assert b["t"] >= a["t"]
            assert all(b[k] >= a[k] for k in ("cpu_kwh", "gpu_kwh", "ram_kwh"))
        late = [r for t, r, _ in reads[pid] if t > killed_at + 2.0]
        assert late and _energy(series[-1]) > _energy(late[0])  # still charged after the takeover


# --------------------------------------------------------------------------- 3. units


def _kwh(r: Reading) -> tuple[float, float, float]:
    return (round(r.cpu_kwh, 12), round(r.gpu_kwh, 12), round(r.ram_kwh, 12))


def test_apportion_splits_by_cpu_time() -> None:
    delta = Reading(t=2.0, cpu_kwh=0.8, gpu_kwh=0.4, ram_kwh=0.2)
    shares = apportion(delta, {11: 3.0, 12: 1.0, 13: 0.0})
    assert _kwh(shares[11]) == (0.6, 0.3, 0.15)
    assert _kwh(shares[12]) == (0.2, 0.1, 0.05)
    assert _kwh(shares[13]) == (0.0, 0.0, 0.0)
    assert all(s.t == 2.0 for s in shares.values())
    assert math.isclose(sum(s.energy_kwh for s in shares.values()), delta.energy_kwh)


def test_apportion_splits_idle_intervals_equally() -> None:
    delta = Reading(t=1.0, cpu_kwh=0.3, gpu_kwh=0.0, ram_kwh=0.6)
    for cpu in ({1: 0.0, 2: 0.0, 3: 0.0}, {1: -0.5, 2: float("nan"), 3: 0.0}):
        shares = apportion(delta, cpu)
        assert [_kwh(shares[p]) for p in (1, 2, 3)] == [(0.1, 0.0, 0.2)] * 3
    # Below the idle threshold counts as idle: 5 ms of bookkeeping does not earn all the idle power.
    shares = apportion(delta, {1: 0.005, 2: 0.0}, idle_cpu_s=0.01)
    assert _kwh(shares[1]) == _kwh(shares[2]) == (0.15, 0.0, 0.3)
    assert apportion(delta, {}) == {}


def test_corrupt_and_missing_files_count_as_zero(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger, "_warned", set())  # each problem is logged once per process
    for sub in ("procs", "energy", "requests"):
        (tmp_path / sub).mkdir()
    (tmp_path / "state.json").write_text("{not json")
    (tmp_path / "energy" / f"{os.getpid()}.json").write_text("[1, 2")
    (tmp_path / "energy" / "77.json").write_text('"a string"')
    (tmp_path / "procs" / "junk").write_text("x")
    # A registration left by a process that is gone, and one whose pid now belongs to another process.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)
    (tmp_path / "procs" / str(gone.pid)).write_text(json.dumps({"pid": gone.pid, "create_time": 1.0}))
    (tmp_path / "procs" / "1").write_text(json.dumps({"pid": 1, "create_time": 12345.0}))
    assert read_ledger(tmp_path) == {}

    meter = MachineShareMeter(dir=tmp_path)
    caplog.set_level(logging.WARNING, logger="traice.ledger")
    meter.start()
    try:
        assert meter.is_leader and meter.hardware.cpu_count
        first = meter.read()
        _busy_until(time.time() + 0.5)
        second = meter.read()
    finally:
        meter.stop()
    assert 0.0 <= first.energy_kwh < second.energy_kwh
    assert not (tmp_path / "procs" / str(gone.pid)).exists()  # dead: unregistered
    assert not (tmp_path / "procs" / "1").exists()  # pid reused by another process: unregistered
    assert not (tmp_path / "procs" / str(os.getpid())).exists()  # stopped: unregistered
    assert set(read_ledger(tmp_path)) == {os.getpid()}
    assert math.isclose(read_ledger(tmp_path)[os.getpid()].energy_kwh, second.energy_kwh)
    assert "counted as zero" in caplog.text


def test_a_restarted_leader_continues_from_the_files_and_samples_reach_listeners(tmp_path: Path) -> None:
    samples: list[PowerSample] = []
    meter = MachineShareMeter(dir=tmp_path, sample_interval_s=0.5)
    meter.subscribe(samples.append)
    meter.start()
    try:
        meter.read()
        _busy_until(time.time() + 0.6)
        before = meter.read()
    finally:
        meter.stop()
    again = MachineShareMeter(dir=tmp_path)
    again.start()
    try:
        after = again.read()
    finally:
        again.stop()
    assert after.energy_kwh >= before.energy_kwh > 0
    assert samples and all(s.cpu_w > 0 and s.ram_w > 0 and s.gpu_w == 0 for s in samples)


def test_reads_between_intervals_are_estimated_without_measuring_and_never_go_back(tmp_path: Path) -> None:
    """A round boundary must cost training nothing: once two charged intervals give this process's
    energy per CPU second, a read is an estimate from its CPU time, not a measurement."""
    meter = MachineShareMeter(dir=tmp_path, sample_interval_s=1.0)
    meter.start()
    try:
        _busy_until(time.time() + 2.5)  # at least two intervals charged with our CPU time in them
        seq_before = ledger.ledger_state(tmp_path)["seq"]
        readings = []
        for _ in range(50):
            _busy_until(time.time() + 0.01)
            asked = time.time()
            readings.append(meter.read())
            assert readings[-1].t >= asked  # fresh: it ends at the read, not at the last interval
        seq_after = ledger.ledger_state(tmp_path)["seq"]
        measured = meter._participant._measured_read()  # type: ignore[union-attr]
        after = meter.read()
    finally:
        meter.stop()
    # 50 reads over ~0.5 s: only the leader's own once-a-second intervals ran, no interval per read.
    assert seq_after - seq_before <= 2
    energies = [r.energy_kwh for r in readings]
    assert all(b >= a for a, b in itertools.pairwise(energies))
    assert energies[-1] > energies[0]  # the CPU time between reads is charged as it goes
    # The charged figure takes over; a reading never goes back below an earlier estimate.
    assert after.energy_kwh == max(measured.energy_kwh, energies[-1])


_FORKING_LEADER = """
import os, sys, time
from traice.ledger import MachineShareMeter
meter = MachineShareMeter(dir=sys.argv[1])
meter.start()
assert meter.is_leader
if os.fork() == 0:  # the child inherits the lock's descriptor: it must not keep the leadership
    time.sleep(30)
    os._exit(0)
print("leading", flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def _standby_beside(leader_script: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], MachineShareMeter]]:
    """A process running ``leader_script`` leads the ledger in ``tmp_path``: yield it and a started standby."""
    command = [sys.executable, "-c", leader_script, str(tmp_path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, start_new_session=True) as leader:
        try:
            assert leader.stdout is not None and leader.stdout.readline() == b"leading\n"
            standby = MachineShareMeter(dir=tmp_path)
            standby.start()
            try:
                yield leader, standby
            finally:
                standby.stop()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(leader.pid, signal.SIGKILL)  # and any child it forked
            leader.wait(10)


def test_a_forked_child_does_not_inherit_the_leadership(tmp_path: Path) -> None:
    with _standby_beside(_FORKING_LEADER, tmp_path) as (leader, standby):
        assert not standby.is_leader
        leader.send_signal(signal.SIGKILL)  # the forked child lives on, with a copy of the descriptor
        leader.wait(10)
        deadline = time.time() + 5
        while not standby.is_leader and time.time() < deadline:
            time.sleep(0.05)
        assert standby.is_leader


_LEADER = """
import sys, time
from traice.ledger import MachineShareMeter
meter = MachineShareMeter(dir=sys.argv[1])
meter.start()
assert meter.is_leader
print("leading", flush=True)
time.sleep(60)
"""


def test_a_process_joining_a_measured_machine_does_not_wait_for_hardware_detection(tmp_path: Path) -> None:
    """codecarbon's hardware detection takes a second or more; a standby needs its tracker only to take
    over, so a worker joining a machine already measured starts at once and learns its hardware later."""
    with _standby_beside(_LEADER, tmp_path) as (_, standby):
        detected_before_start_returned = standby._participant._hardware_ready.is_set()  # type: ignore[union-attr]
        hardware = standby.hardware  # what hello sends: waits for the detection
        reading = standby.read()
        is_leader = standby.is_leader
    assert not is_leader
    assert not detected_before_start_returned
    assert hardware.cpu_power_method is not None and hardware.cpu_count
    assert reading.t > 0


def test_traice_estimate_reads_0_makes_every_read_a_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAICE_ESTIMATE_READS", raising=False)
    assert MachineShareMeter().estimate_reads
    monkeypatch.setenv("TRAICE_ESTIMATE_READS", "0")
    assert not MachineShareMeter().estimate_reads
    assert MachineShareMeter(estimate_reads=True).estimate_reads  # an explicit choice wins
