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


@pytest.mark.slow
def test_training_run_logs_telemetry_and_draws_its_report(tmp_path):
    """A real (one-process) training run: every step record carries img/s, MFU and data
    wait, the progress lines show them, and python -m fastdeit.report draws the run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from fastdeit import report
    from tests.childenv import child_env
    from fastdeit.data.synthetic import generate

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    generate(str(data), classes=4, train_per_class=24, val_per_class=4, min_size=36, max_size=48, seed=0, quality=90)
    run = tmp_path / "run"
    from fastdeit.distributed import free_port

    port = free_port()
    env = child_env("cpu", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    overrides = [
        f"data.root={data}", "data.img_size=32", "data.rand_augment=null", "data.repeated_aug=1",
        "data.num_threads=1", "mixing.prob=0.0", "mixing.erase_prob=0.0", "model.name=deit_tiny_patch16_224",
        "model.drop_path=0.0", "model.kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
        "distill.type=none", "engine.global_batch_size=16", "trainer.epochs=1", f"trainer.run_dir={run}",
        "logging.log_every=2", "logging.progress=lines", "logging.peak_tflops=1.0", "checkpoint.keep_last=1",
    ]
    proc = subprocess.run([sys.executable, str(root / "launch" / "train.py"), *overrides], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MFU basis:" in proc.stdout and "peak 1 TFLOP/s per device (given)" in proc.stdout
    assert " mfu " in proc.stdout and " data " in proc.stdout                  # progress lines
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert steps and all(r["img_per_sec"] > 0 and r["mfu"] > 0 and 0 <= r["data_wait"] <= 1 for r in steps)
    epoch = [r for r in rows if r["kind"] == "epoch"][-1]
    assert epoch["train/mfu"] > 0 and "train/data_wait" in epoch
    assert report.main([str(run)]).read_bytes().startswith(b"\x89PNG")
