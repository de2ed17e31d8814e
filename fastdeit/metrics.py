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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Literal, Optional

import torch


@dataclass
class LoggingConfig:
    log_every: int = 50                          # optimizer steps between logging steps
    progress: Literal["auto", "bar", "lines"] = "auto"   # auto: a bar on a terminal, lines otherwise
    tensorboard: bool = False
    # MFU denominator per device, TFLOP/s. None: the datasheet dense-bf16 figure for known GPUs
    # (fastdeit.flops.KNOWN_PEAK_TFLOPS), else a short bf16 matmul measured at start-up.
    peak_tflops: Optional[float] = None
    data_wait_warn: float = 0.10                 # warn (once per epoch) above this data-wait share


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

    def values(self) -> Dict[str, float]:
        """Extra numbers for the window just read (none here; see ``TelemetryWindow``)."""
        return {}

    def progress(self) -> Dict[str, str]:
        return {}


class StepTelemetry:
    """Throughput telemetry for every training run: images/sec, MFU and data-wait share.

    * images/sec: images over host wall time between two logging steps. Exact because each
      logging step ends in a host sync (``DeviceMeter.read``), so the window holds finished work.
    * MFU: images/sec x counted FLOPs per image (``fastdeit.flops``) / peak FLOP/s per device.
    * data wait: host seconds blocked in the loader's ``next()`` over the window's wall time.
      The loader prefetches on its own threads (DALI), so a pipeline that keeps up hands over
      a ready batch at once. While the host is blocked there it enqueues no device work, so
      once the device has drained what was already queued it idles: on GPU, with asynchronous
      execution, host time blocked on the loader is data starvation (overstated at most by
      the work the host had queued ahead of the device when it started waiting). On CPU the
      step is synchronous and the share is exact.

    No device syncs: only ``time.perf_counter`` and arithmetic on host numbers.
    """

    def __init__(self, flops_per_image: Optional[float] = None, peak_flops: Optional[float] = None,
                 data_wait_warn: float = 0.10, warn: Callable[[str], None] = print):
        self.flops_per_image = flops_per_image
        self.peak_flops = peak_flops
        self.data_wait_warn = data_wait_warn
        self.warn = warn
        self.waited = 0.0    # cumulative host seconds blocked in next(loader)

    def timed(self, loader: Iterable) -> "TimedLoader":
        """``loader`` with the time spent in its ``next()`` added to ``self.waited``."""
        return TimedLoader(loader, self)

    def window(self) -> "TelemetryWindow":
        """A fresh measuring window (one per epoch): the trainer's throughput clock."""
        return TelemetryWindow(self)


class TimedLoader:
    """Iterates like the wrapped loader and forwards everything else to it (``set_epoch``,
    ``len``, ``num_classes``...); only ``next()`` is timed."""

    def __init__(self, loader: Iterable, telemetry: StepTelemetry):
        self.loader = loader
        self.telemetry = telemetry

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        it = iter(self.loader)
        telemetry = self.telemetry
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                telemetry.waited += time.perf_counter() - t0
            yield batch


class TelemetryWindow(Throughput):
    """``Throughput`` that also yields MFU and the data-wait share for the same window, and
    warns once per window lifetime (an epoch) when the run is data-bound."""

    def __init__(self, telemetry: StepTelemetry):
        super().__init__()
        self.telemetry = telemetry
        self.waited0 = telemetry.waited
        self.warned = False
        self.last: Dict[str, float] = {}

    def read(self) -> float:
        """Images/sec on this rank since the last read; also computes ``values()``."""
        t = self.telemetry
        now = time.perf_counter()
        elapsed = max(now - self.t0, 1e-9)
        rate = self.images / elapsed
        wait = min(max((t.waited - self.waited0) / elapsed, 0.0), 1.0)
        self.t0, self.images, self.waited0 = now, 0, t.waited
        self.last = {"data_wait": wait}
        if t.flops_per_image and t.peak_flops:
            self.last["mfu"] = rate * t.flops_per_image / t.peak_flops
        if wait > t.data_wait_warn and not self.warned:
            self.warned = True
            t.warn(f"data-bound: {100 * wait:.0f}% of step time waiting for the loader "
                   f"(above {100 * t.data_wait_warn:.0f}%); more data.num_threads, data.device=gpu "
                   "or a faster disk would raise img/s")
        return rate

    def values(self) -> Dict[str, float]:
        """{'data_wait': share in [0, 1], 'mfu': share (when FLOPs and peak are known)}."""
        return dict(self.last)

    def progress(self) -> Dict[str, str]:
        """The same, formatted for the progress bar / lines."""
        text = {}
        if "mfu" in self.last:
            text["mfu"] = f"{100 * self.last['mfu']:.1f}%"
        if "data_wait" in self.last:
            text["data"] = f"{100 * self.last['data_wait']:.0f}%"
        return text


class RunLogger:
    """Rank-0 sink for records: ``log.jsonl`` in the run dir, TensorBoard, and the console."""

    def __init__(self, cfg: LoggingConfig, run_dir: str, is_main: bool):
        self.cfg = cfg
        self.is_main = is_main
        self.path = Path(run_dir) / "log.jsonl"
        self.bar = None
        self.tb = None
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

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
            self.bar.set_postfix(text, refresh=True)
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

    def close(self) -> None:
        self.end_epoch()
        if self.tb is not None:
            self.tb.close()
