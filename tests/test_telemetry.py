"""Run telemetry: MFU and data-wait share from host clocks, and the data-bound warning."""
import time

import pytest

from fastdeit.metrics import StepTelemetry


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


def run_epoch(loader, compute):
    t0 = time.perf_counter()
    n = 0
    for _ in loader:
        time.sleep(compute)               # the "step"
        n += 8
    return n / (time.perf_counter() - t0)


def test_data_wait_mfu_and_warning():
    warnings = []
    telemetry = StepTelemetry(flops_per_image=1e9, peak_flops=1e12, data_wait_warn=0.10, warn=warnings.append)
    loader = telemetry.timed(SlowLoader(wait=0.03))
    loader.set_epoch(5)                               # forwarded to the real loader
    assert loader.loader.epochs == [5] and len(loader) == 4 and loader.num_classes == 3
    rate = run_epoch(loader, compute=0.01)
    values = telemetry.read(rate)
    assert values["data_wait"] == pytest.approx(0.75, abs=0.12)   # 30 ms of every 40 ms
    assert values["mfu"] == pytest.approx(rate * 1e9 / 1e12)
    assert set(telemetry.progress()) == {"mfu", "data"}
    assert len(warnings) == 1 and "data-bound" in warnings[0]
    # The next window of the same epoch does not warn again; the next epoch may.
    telemetry.waited = 1e9
    telemetry.read(rate)
    assert len(warnings) == 1
    run_epoch(loader, compute=0.0)
    telemetry.read(rate)
    assert len(warnings) == 2


def test_eval_time_between_epochs_does_not_dilute_the_share():
    telemetry = StepTelemetry(warn=lambda m: None)
    loader = telemetry.timed(SlowLoader(wait=0.02))
    run_epoch(loader, compute=0.0)
    telemetry.read(1.0)
    time.sleep(0.2)                                   # "evaluation": outside any window
    run_epoch(loader, compute=0.0)
    assert telemetry.read(1.0)["data_wait"] > 0.8


def test_compute_bound_run_is_quiet_and_mfu_needs_flops():
    warnings = []
    telemetry = StepTelemetry(data_wait_warn=0.10, warn=warnings.append)   # no FLOPs known
    rate = run_epoch(telemetry.timed(SlowLoader(wait=0.0)), compute=0.01)
    values = telemetry.read(rate)
    assert values["data_wait"] < 0.10 and "mfu" not in values
    assert warnings == []
