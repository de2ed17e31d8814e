"""Run telemetry: img/s, MFU and data-wait share from host clocks, and the data-bound warning."""
import time

import pytest

from fastdeit.metrics import StepTelemetry, Throughput


class SlowLoader:
    """Four batches; each next() blocks `wait` seconds; set_epoch and extra attributes."""

    num_classes = 3

    def __init__(self, wait):
        self.wait = wait
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return 4

    def __iter__(self):
        for i in range(4):
            time.sleep(self.wait)
            yield i


def run_epoch(telemetry, loader, compute):
    window = telemetry.window()
    for _ in loader:
        time.sleep(compute)               # the "step"
        window.add(8)
    rate = window.read()
    return rate, window


def test_data_wait_mfu_and_warning():
    warnings = []
    telemetry = StepTelemetry(flops_per_image=1e9, peak_flops=1e12, data_wait_warn=0.10, warn=warnings.append)
    loader = telemetry.timed(SlowLoader(wait=0.03))
    loader.set_epoch(5)                               # forwarded to the real loader
    assert loader.loader.epochs == [5] and len(loader) == 4 and loader.num_classes == 3
    rate, window = run_epoch(telemetry, loader, compute=0.01)
    values = window.values()
    assert values["data_wait"] == pytest.approx(0.75, abs=0.12)   # 30 ms of every 40 ms
    assert rate == pytest.approx(8 / 0.04, rel=0.3)
    assert values["mfu"] == pytest.approx(rate * 1e9 / 1e12)
    assert set(window.progress()) == {"mfu", "data"}
    assert len(warnings) == 1 and "data-bound" in warnings[0]
    window.read()                                     # same window (epoch): no second warning
    assert len(warnings) == 1


def test_compute_bound_run_is_quiet_and_mfu_needs_flops():
    warnings = []
    telemetry = StepTelemetry(data_wait_warn=0.10, warn=warnings.append)   # no FLOPs known
    _, window = run_epoch(telemetry, telemetry.timed(SlowLoader(wait=0.0)), compute=0.01)
    assert window.values()["data_wait"] < 0.10
    assert "mfu" not in window.values()
    assert warnings == []


def test_plain_throughput_has_no_extras():
    clock = Throughput()
    clock.add(4)
    assert clock.read() > 0 and clock.values() == {} and clock.progress() == {}
