"""The training loop: epochs, per-step LR, evaluation, logging cadence, checkpoint/resume.

Hot-loop rule: between logging steps nothing reads a device value on the host. Losses,
non-finite detection and eval counts accumulate in device tensors; the logging step reads
them in one transfer.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from fastdeit.checkpoint import Checkpointer, export_state_dict
from fastdeit.data.mixing import BatchMixer
from fastdeit.losses import DeiTLoss
from fastdeit.metrics import DeviceMeter, RunLogger, StepTelemetry, Throughput
from fastdeit.models import FrozenTeacher, eval_heads


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the first such optimizer step."""


@dataclass
class TrainerConfig:
    epochs: int = 300
    eval_every: int = 1            # evaluate every N epochs (and after the last); 0 = last only
    seed: int = 0
    run_dir: str = "runs/deit"


class Trainer:
    def __init__(
        self,
        cfg: TrainerConfig,
        engine,
        train_loader,
        val_loader,
        mixer: BatchMixer,
        criterion: DeiTLoss,
        teacher: Optional[FrozenTeacher],
        scheduler,
        logger: RunLogger,
        checkpointer: Checkpointer,
        log_every: int,
        world_size: int,
        dtype: torch.dtype,
        device: torch.device,
        telemetry: StepTelemetry,
    ):
        self.cfg = cfg
        self.engine = engine
        # MFU and data-wait share next to img/s (metrics.StepTelemetry): next() is timed.
        self.telemetry = telemetry
        self.train_loader = telemetry.timed(train_loader)
        self.val_loader = val_loader
        self.mixer = mixer
        self.criterion = criterion
        self.teacher = teacher
        self.scheduler = scheduler
        self.logger = logger
        self.checkpointer = checkpointer
        self.log_every = max(log_every, 1)
        self.world_size = world_size
        self.dtype = dtype
        self.device = device
        self.accum = engine.gradient_accumulation_steps()
        self.steps_per_epoch = len(train_loader) // self.accum
        self.best_top1 = -1.0
        self.rates: list = []

    # ------------------------------------------------------------------ fit

    def fit(self) -> Dict[str, Any]:
        start_epoch = self._maybe_resume()
        last = self.cfg.epochs - 1
        metrics: Dict[str, float] = {}
        for epoch in range(start_epoch, self.cfg.epochs):
            train_stats = self.train_epoch(epoch)
            metrics = {}
            if (self.cfg.eval_every and (epoch + 1) % self.cfg.eval_every == 0) or epoch == last:
                metrics = self.evaluate()
                head = "val/avg_top1" if "val/avg_top1" in metrics else "val/cls_top1"
                self.best_top1 = max(self.best_top1, metrics[head])
            self.logger.record("epoch", self.engine.global_steps, {"epoch": epoch, **train_stats, **metrics})
            self.logger.info(self._epoch_line(epoch, train_stats, metrics))
            if self.checkpointer.should_save(epoch, last):
                self.checkpointer.save(self.engine, epoch, self._state(epoch))
        return self._finish(metrics)

    def _state(self, epoch: int) -> Dict[str, Any]:
        # No scheduler state: the LR is a pure function of the optimizer step, which DeepSpeed
        # restores; a resumed run with a longer trainer.epochs gets the longer schedule.
        return {"epoch": epoch, "best_top1": self.best_top1}

    def _maybe_resume(self) -> int:
        path = self.checkpointer.resume_path()
        if path is None:
            return 0
        state = self.checkpointer.load(self.engine, path)
        self.best_top1 = state.get("best_top1", -1.0)
        self.logger.info(f"resumed from {path} after epoch {state['epoch'] + 1} "
                         f"(optimizer step {self.engine.global_steps})")
        return state["epoch"] + 1

    # ------------------------------------------------------------------ train

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        engine = self.engine
        engine.train()
        self.train_loader.set_epoch(epoch)
        meter = DeviceMeter(self.device)
        clock = Throughput()
        # Index of the first optimizer step whose loss was non-finite, -1 if none: on device.
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        sums: Dict[str, float] = {}
        logged_steps = 0
        self.logger.start_epoch(epoch, self.cfg.epochs, self.steps_per_epoch)
        micro = 0
        for micro, (images, labels) in enumerate(self.train_loader, start=1):
            step = engine.global_steps
            self.scheduler.step_update(step)                  # host-side: sets param-group LRs
            images, targets = self.mixer(images, labels)
            images = images.to(self.dtype)
            teacher_logits = self.teacher(images) if self.teacher is not None else None
            outputs = engine(images)
            loss, parts = self.criterion(outputs, targets, teacher_logits)
            engine.backward(loss)
            engine.step()
            meter.update({"loss": loss, **parts})
            clock.add(images.shape[0])
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()),
                                    torch.full_like(first_bad, step), first_bad)
            boundary = micro % self.accum == 0
            done = engine.global_steps - epoch * self.steps_per_epoch
            if boundary and (engine.global_steps % self.log_every == 0 or micro == len(self.train_loader)):
                values = self._log_step(meter, clock, first_bad)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                logged_steps += 1
                self.logger.progress(done, {
                    "epoch": f"{epoch + 1}/{self.cfg.epochs}", "step": f"{done}/{self.steps_per_epoch}",
                    "loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.2e}", **self.telemetry.progress(),
                    "img/s": f"{values['img_per_sec']:.0f}"})
        self.logger.end_epoch()
        if micro == 0:
            raise RuntimeError("the training loader yielded no batch: the dataset is smaller than one global batch")
        return {f"train/{k}": v / max(logged_steps, 1) for k, v in sums.items()}

    def _log_step(self, meter: DeviceMeter, clock: Throughput, first_bad: torch.Tensor) -> Dict[str, float]:
        values = meter.read()                                  # host sync (logging steps only)
        bad = int(first_bad.item())
        if bad >= 0 or not math.isfinite(values["loss"]):
            raise NonFiniteLossError(
                f"the loss became non-finite at optimizer step {max(bad, 0)}; stopping without "
                f"saving, so the last checkpoint in {self.checkpointer.dir} stays the last good one"
            )
        values["img_per_sec"] = clock.read() * self.world_size
        values["lr"] = self.engine.get_lr()[0]
        values.update(self.telemetry.read(values["img_per_sec"] / self.world_size))  # host numbers only
        self.rates.append(values["img_per_sec"])
        self.logger.record("step", self.engine.global_steps, values)
        return values

    # ------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Top-1/top-5 over the whole val set (each image once across ranks), per head."""
        module = self.engine.module
        module.eval()
        self.val_loader.set_epoch(0)
        counts: Optional[torch.Tensor] = None   # [heads, 2] correct@1, correct@5
        heads = []
        total = torch.zeros((), dtype=torch.long, device=self.device)
        for images, labels in self.val_loader:
            logits = eval_heads(module, images.to(self.dtype))
            heads = list(logits)
            k = min(5, next(iter(logits.values())).shape[1])
            batch = []
            for z in logits.values():
                top = z.topk(k, dim=1).indices == labels[:, None]     # [B, k]
                batch.append(torch.stack([top[:, 0].sum(), top.any(dim=1).sum()]))
            batch = torch.stack(batch)
            counts = batch if counts is None else counts + batch
            total += labels.numel()
        module.train()
        if not heads:  # this rank got no val sample; still join the reduction
            heads = ["cls", "dist", "avg"] if hasattr(module, "head_dist") else ["cls"]
            counts = torch.zeros(len(heads), 2, dtype=torch.long, device=self.device)
        packed = torch.cat([counts.flatten(), total.view(1)])
        if dist.is_initialized():
            dist.all_reduce(packed)
        packed = packed.cpu().tolist()
        n = max(packed[-1], 1)
        out = {"val/images": float(packed[-1])}
        for i, head in enumerate(heads):
            out[f"val/{head}_top1"] = 100.0 * packed[2 * i] / n
            out[f"val/{head}_top5"] = 100.0 * packed[2 * i + 1] / n
        return out

    # ------------------------------------------------------------------ end

    def _epoch_line(self, epoch: int, train: Dict[str, float], metrics: Dict[str, float]) -> str:
        parts = [f"epoch {epoch + 1}/{self.cfg.epochs}", f"loss {train.get('train/loss', float('nan')):.4f}",
                 f"img/s {train.get('train/img_per_sec', 0):.0f}"]
        parts += [f"{k[4:]} {v:.2f}" for k, v in metrics.items() if k.endswith("top1")]
        return " | ".join(parts)

    def _finish(self, metrics: Dict[str, float]) -> Dict[str, Any]:
        run_dir = Path(self.cfg.run_dir)
        # Steady-state speed: skip the first logging window (pipeline warm-up, allocator).
        steady = self.rates[1:] or self.rates
        summary = {
            "final": metrics,
            "best_top1": self.best_top1,
            "img_per_sec": sum(steady) / max(len(steady), 1),
            "optimizer_steps": self.engine.global_steps,
            "epochs": self.cfg.epochs,
        }
        if self.logger.is_main:
            if self.checkpointer.cfg.export:
                export_state_dict(self.engine.module, str(run_dir / "model.pth"))
                summary["export"] = str(run_dir / "model.pth")
            with open(run_dir / "summary.json", "w") as f:
                json.dump(summary, f, indent=2)
        return summary
