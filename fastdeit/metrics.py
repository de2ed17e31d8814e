"""On-device meters, throughput telemetry (img/s, MFU, data wait), JSON-lines logs, TensorBoard
and the progress display.

Nothing here synchronises with the device except ``DeviceMeter.read``, which the trainer calls
on logging steps only: between them, losses accumulate in device tensors. Telemetry is host
clocks and host arithmetic only.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Literal, Optional

import torch

from fastdeit.trackers import TrackerConfig, start_trackers


@dataclass
class LoggingConfig:
    log_every: int = 50                          # optimizer steps between logging steps
    progress: Literal["auto", "bar", "lines"] = "auto"   # auto: a bar on a terminal, lines otherwise
    tensorboard: bool = False
    # MFU denominator per device, TFLOP/s. None: a known GPU's data-sheet dense figure for the
    # run's compute dtype (fastdeit.flops.KNOWN_PEAKS_TFLOPS), else a short matmul in that dtype
    # measured at start-up on the rank's threads (fastdeit.flops.peak_flops).
    peak_tflops: Optional[float] = None
    data_wait_warn: float = 0.10                 # warn (once per epoch) above this data-wait share
    # Experiment trackers (fastdeit.trackers), rank 0 only, the log.jsonl records: enabled,
    # project, name, tags (and MLflow's uri). Optional packages: pip install -e .[trackers].
    wandb: TrackerConfig = field(default_factory=TrackerConfig)
    mlflow: TrackerConfig = field(default_factory=TrackerConfig)


class DeviceMeter:
    """Sums of named scalars kept on the device; ``read()`` (a host sync) returns their means."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, values: Dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()
            if k in self.sums:
                self.sums[k] += v
            else:
                self.sums[k] = v.clone()
        self.count += 1

    def read(self) -> Dict[str, float]:
        if not self.sums:
            return {}
        stacked = torch.stack(list(self.sums.values())).cpu().tolist()  # the one sync
        means = {k: s / self.count for k, s in zip(self.sums, stacked)}
        self.sums, self.count = {}, 0
        return means


class Throughput:
    """Images/sec between two reads; exact as long as each read follows a host sync."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, images: int) -> None:
        self.images += images

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.t0, 1e-9)
        self.t0, self.images = now, 0
        return rate


class StepTelemetry:
    """Throughput telemetry for every training run: MFU and the data-wait share, per logging
    window, next to the trainer's images/sec.

    * MFU: images/sec per device x counted FLOPs per image (``fastdeit.flops``) / peak FLOP/s
      per device.
    * data wait: host seconds blocked in the train loader's ``next()`` over the window's wall
      time. The loader prefetches on its own threads (DALI), so a pipeline that keeps up hands
      over a ready batch at once. While the host is blocked there it enqueues no device work,
      so once the device has drained what was already queued it idles: on GPU, with
      asynchronous execution, host time blocked on the loader is data starvation (overstated
      at most by the work the host had queued ahead of the device when it started waiting).
      On CPU the step is synchronous and the share is exact.

    A window runs from the start of an epoch's iteration, or the previous ``read``, to the next
    ``read`` (a logging step), so evaluation time never dilutes it. No device syncs: only
    ``time.perf_counter`` and arithmetic on host numbers.
    """

    def __init__(self, flops_per_image: Optional[float] = None, peak_flops: Optional[float] = None,
                 data_wait_warn: float = 0.10, warn: Callable[[str], None] = print,
                 flops_by_size: Optional[Dict[int, float]] = None):
        self.flops_per_image = flops_per_image
        # Training at several resolutions (data.size_schedule): FLOPs per image for each size;
        # set_img_size picks the epoch's (fastdeit.flops.train_flops_by_size).
        self.flops_by_size = dict(flops_by_size or {})
        self.peak_flops = peak_flops
        self.data_wait_warn = data_wait_warn
        self.warn = warn
        self.last: Dict[str, float] = {}
        self.start_epoch()

    def start_epoch(self) -> None:
        """Open a new window and re-arm the data-bound warning (once per epoch)."""
        self.t0 = time.perf_counter()
        self.waited = 0.0        # host seconds blocked in next(loader) in this window
        self.warned = False

    def set_img_size(self, size: int) -> None:
        """The coming epoch trains at `size` px: MFU from then on uses that size's FLOPs
        (unknown sizes leave MFU unreported rather than wrong)."""
        if self.flops_by_size:
            self.flops_per_image = self.flops_by_size.get(int(size))

    def timed(self, loader: Iterable) -> "TimedLoader":
        """``loader`` with the time spent in its ``next()`` added to this window."""
        return TimedLoader(loader, self)

    def read(self, images_per_sec: float) -> Dict[str, float]:
        """{'data_wait': share in [0, 1], 'mfu': share} for the window now ending; starts the next.

        ``images_per_sec`` is this device's rate over the same window (not the global one).
        """
        now = time.perf_counter()
        wait = min(max(self.waited / max(now - self.t0, 1e-9), 0.0), 1.0)
        self.t0, self.waited = now, 0.0
        self.last = {"data_wait": wait}
        if self.flops_per_image and self.peak_flops:
            self.last["mfu"] = images_per_sec * self.flops_per_image / self.peak_flops
        if wait > self.data_wait_warn and not self.warned:
            self.warned = True
            self.warn(f"data-bound: {100 * wait:.0f}% of step time waiting for the loader "
                      f"(above {100 * self.data_wait_warn:.0f}%); more data.num_threads, "
                      "data.device=gpu or a faster disk would raise img/s")
        return dict(self.last)

    def progress(self) -> Dict[str, str]:
        """The last read, formatted for the progress bar / lines."""
        text = {}
        if "mfu" in self.last:
            text["mfu"] = f"{100 * self.last['mfu']:.1f}%"
        if "data_wait" in self.last:
            text["data"] = f"{100 * self.last['data_wait']:.0f}%"
        return text


class TimedLoader:
    """Iterates like the wrapped loader and forwards everything else to it (``set_epoch``,
    ``len``, ``num_classes``...); each ``iter()`` opens a telemetry window, each ``next()``
    is timed."""

    def __init__(self, loader: Iterable, telemetry: StepTelemetry):
        self.loader = loader
        self.telemetry = telemetry

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        telemetry = self.telemetry
        telemetry.start_epoch()
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                telemetry.waited += time.perf_counter() - t0
            yield batch


class RunLogger:
    """Rank-0 sink for records: ``log.jsonl`` in the run dir, TensorBoard, and the console."""

    def __init__(self, cfg: LoggingConfig, run_dir: str, is_main: bool, config: Optional[Dict[str, Any]] = None):
        self.cfg = cfg
        self.is_main = is_main
        self.path = Path(run_dir) / "log.jsonl"
        self.bar = None
        self.tb = None
        self.trackers: list = []
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            # W&B / MLflow: the same records as log.jsonl, the resolved config, the model folder.
            self.trackers = start_trackers(cfg.wandb, cfg.mlflow, Path(run_dir), config or {}, self.info)

    @property
    def use_bar(self) -> bool:
        if self.cfg.progress == "auto":
            return sys.stderr.isatty()
        return self.cfg.progress == "bar"

    def record(self, kind: str, step: int, values: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"kind": kind, "step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        for tracker in self.trackers:
            tracker.record(kind, step, values)

    def artifact(self, folder: Path) -> None:
        """The exported model folder, to every tracker (rank 0)."""
        for tracker in self.trackers:
            tracker.artifact(Path(folder))

    # -- console

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.is_main:
            return
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True, leave=False)

    def progress(self, steps_done: int, text: Dict[str, str]) -> None:
        """Called on logging steps only."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.update(steps_done - self.bar.n)
            # The bar itself shows the epoch and the step count.
            self.bar.set_postfix({k: v for k, v in text.items() if k not in ("epoch", "step")}, refresh=True)
        else:
            print(" ".join(f"{k} {v}" for k, v in text.items()), flush=True)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def info(self, message: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(message)
            sys.stdout.flush()

    def close(self, failed: bool = False) -> None:
        self.end_epoch()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        for tracker in self.trackers:
            tracker.close(failed)
        self.trackers = []
