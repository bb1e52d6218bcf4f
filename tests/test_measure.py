"""The codecarbon adapter, measured for real on this machine."""

from __future__ import annotations

import subprocess
import sys
import time

from traice.measure import Meter


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_process_meter_does_not_count_its_children() -> None:
    meter = Meter(sample_interval_s=1.0)
    meter.start()
    try:
        start = meter.read()
        child = subprocess.Popen([sys.executable, "-c", "import time\nend=time.time()+2\nwhile time.time()<end: pass"])
        child.wait(30)
        while_child_works = meter.read() - start

        start = meter.read()
        _busy(2.0)
        while_we_work = meter.read() - start
    finally:
        meter.stop()

    # The parent idled while its child worked: its CPU energy is a small fraction of its own busy 2 s.
    assert while_we_work.cpu_kwh > 0
    assert while_child_works.cpu_kwh < 0.25 * while_we_work.cpu_kwh


def test_readings_add_up_and_samples_reach_listeners() -> None:
    meter = Meter(sample_interval_s=0.5)
    samples = []
    meter.subscribe(samples.append)
    meter.start()
    try:
        first = meter.read()
        _busy(1.2)
        second = meter.read()
        deadline = time.monotonic() + 10
        while not samples and time.monotonic() < deadline:  # the sampler runs on its own thread
            time.sleep(0.1)
    finally:
        meter.stop()

    delta = second - first
    assert delta.energy_kwh == delta.cpu_kwh + delta.gpu_kwh + delta.ram_kwh > 0
    assert delta.t >= 1.2
    assert samples and all(s.cpu_w >= 0 and s.ram_w >= 0 for s in samples)
    assert meter.hardware.cpu_count and meter.hardware.cpu_power_method
