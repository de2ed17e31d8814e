"""On-device meters, throughput, JSON-lines logs, TensorBoard and the progress display.

Nothing here synchronises with the device except ``DeviceMeter.read``, which the trainer calls
on logging steps only: between them, losses accumulate in device tensors.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Literal, Optional

import torch


@dataclass
class LoggingConfig:
    log_every: int = 50                          # optimizer steps between logging steps
    progress: Literal["auto", "bar", "lines"] = "auto"   # auto: a bar on a terminal, lines otherwise
    tensorboard: bool = False


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

    def close(self) -> None:
        self.end_epoch()
        if self.tb is not None:
            self.tb.close()
