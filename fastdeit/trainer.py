"""The training loop: epochs, per-step LR, evaluation, logging cadence, checkpoint/resume, stops.

Hot-loop rule: between logging steps nothing reads a device value on the host. Losses and the
non-finite-loss detector accumulate in device tensors; on a logging step one small all-reduce
(stop requested? non-finite loss? at which step?) and one read of the meters happen together.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import torch
import torch.distributed as dist

from fastdeit.checkpoint import Checkpointer
from fastdeit.errors import FastDeitError
from fastdeit.evaluate import evaluate
from fastdeit.export import export_checkpoint
from fastdeit.metrics import DeviceMeter, RunLogger, StepTelemetry, Throughput
from fastdeit.preemption import DEFAULT_STOP_SIGNALS, SignalWatch, Stopped, check_signals
from fastdeit.step import StepParts, TrainStep

__all__ = ["NonFiniteLossError", "RunServices", "StepParts", "Trainer", "TrainerConfig"]


class NonFiniteLossError(FastDeitError, RuntimeError):
    """The loss became NaN or infinite; the message names the first such optimizer step (and
    every rank raises it at the same step, after the all-reduce)."""


@dataclass
class TrainerConfig:
    epochs: int = 300
    eval_every: int = 1                      # evaluate every N epochs (and after the last); 0 = last only
    seed: int = 0
    run_dir: str = "runs/deit"
    stop_after_steps: Optional[int] = None   # checkpoint and stop cleanly after this optimizer step
    best_of: Literal["model", "ema"] = "model"   # the `best` checkpoint by the live model's or the EMA's top-1
    # Signals that stop the run with a checkpoint and exit 75 (fastdeit.preemption): SIGUSR2, not
    # SIGUSR1, because some NCCL versions take SIGUSR1 over; keep the SLURM templates'
    # --signal=USR2@300 in step when changing this.
    stop_signals: List[str] = field(default_factory=lambda: list(DEFAULT_STOP_SIGNALS))


@dataclass
class RunServices:
    """What the loop reads batches from and reports to (built by fastdeit.build)."""

    train_loader: Any
    val_loader: Any
    logger: RunLogger
    checkpointer: Checkpointer          # saves and restores the EMA with the engine
    telemetry: StepTelemetry
    device: torch.device
    world_size: int
    log_every: int


class Trainer:
    def __init__(self, cfg: TrainerConfig, parts: StepParts, run: RunServices):
        check_signals(cfg.stop_signals)            # before any work: a ConfigError naming the value
        self.cfg = cfg
        self.engine = parts.engine
        self.ema = parts.ema                    # evaluated next to the live model
        self.dtype = parts.dtype
        # The per-batch work (fastdeit.step): the code the benchmarks time; the rest is the loop's.
        self.train_step = TrainStep(parts, run.device)
        # MFU and data-wait share next to img/s (metrics.StepTelemetry): next() is timed.
        self.telemetry = run.telemetry
        self.train_loader = run.telemetry.timed(run.train_loader)
        self.val_loader = run.val_loader
        self.logger = run.logger
        self.checkpointer = run.checkpointer
        self.log_every = max(run.log_every, 1)
        self.world_size = run.world_size
        self.device = run.device
        self.accum = self.engine.gradient_accumulation_steps()
        self.steps_per_epoch = len(run.train_loader) // self.accum
        self.best_top1 = -1.0
        self.rates: list = []
        self.signals: Optional[SignalWatch] = None
        self._stop_requested = False

    # ------------------------------------------------------------------ fit

    def fit(self, signals: Optional[SignalWatch] = None) -> Dict[str, Any]:
        """Train to the end (or to a stop: ``Stopped``). ``signals``: a watch the caller already
        holds (launch/train.py, for the whole process); without one, the loop installs its own."""
        try:
            summary = self._fit(signals)
        except Stopped:
            self.logger.close()                 # preempted: the resumed run continues the tracker run
            raise
        except BaseException:
            self.logger.close(failed=True)
            raise
        self.logger.close()
        return summary

    def _fit(self, signals: Optional[SignalWatch]) -> Dict[str, Any]:
        epoch, epoch_step = self._maybe_resume()
        last = self.cfg.epochs - 1
        metrics: Dict[str, float] = {}
        watch = nullcontext(signals) if signals is not None else SignalWatch(self.cfg.stop_signals)
        with watch as self.signals:
            while epoch < self.cfg.epochs:
                train_stats = self.train_epoch(epoch, epoch_step)
                epoch_step = 0
                metrics, best = {}, False
                if (self.cfg.eval_every and (epoch + 1) % self.cfg.eval_every == 0) or epoch == last:
                    metrics = self._evaluate()
                    of = "val/ema_" if self.cfg.best_of == "ema" else "val/"
                    head = of + ("avg_top1" if "val/avg_top1" in metrics else "cls_top1")
                    best = metrics[head] > self.best_top1
                    self.best_top1 = max(self.best_top1, metrics[head])
                self.logger.record("epoch", self.engine.global_steps, {"epoch": epoch, **train_stats, **metrics})
                self.logger.info(self._epoch_line(epoch, train_stats, metrics))
                if self.checkpointer.should_save(epoch, last) or best:
                    self.checkpointer.save(self.engine, self._state(epoch + 1, 0), best=best)
                epoch += 1
        return self._finish(metrics)

    def _evaluate(self) -> Dict[str, float]:
        metrics = evaluate(self.engine.module, self.val_loader, self.dtype, self.device)
        if self.ema is not None:                 # the EMA next to the live model: val/ema_*
            ema = evaluate(self.ema.module(), self.val_loader, self.dtype, self.device)
            metrics.update({f"val/ema_{k[4:]}": v for k, v in ema.items() if k != "val/images"})
        return metrics

    def _state(self, epoch: int, epoch_step: int) -> Dict[str, Any]:
        # No scheduler state: the LR is a pure function of the optimizer step, which DeepSpeed
        # restores; a resumed run with a longer trainer.epochs gets the longer schedule.
        return {"epoch": epoch, "epoch_step": epoch_step, "best_top1": self.best_top1}

    def _maybe_resume(self):
        """(epoch, optimizer steps already done in it) to continue from."""
        path = self.checkpointer.resume_path()
        if path is None:
            return 0, 0
        state = self.checkpointer.load(self.engine, path)
        self.best_top1 = state.get("best_top1", -1.0)
        where = f"epoch {state['epoch'] + 1}" + (f", step {state['epoch_step']}" if state["epoch_step"] else "")
        note = f" (resharded from {state['resharded_from']} ranks)" if state.get("resharded_from") else ""
        note += f"; EMA {state['ema']}" if state.get("ema") else ""
        self.logger.info(f"resumed from {path} at {where} (optimizer step {self.engine.global_steps}){note}")
        return state["epoch"], state["epoch_step"]

    # ------------------------------------------------------------------ train

    def train_epoch(self, epoch: int, start_step: int = 0) -> Dict[str, float]:
        engine = self.engine
        engine.train()
        skip = start_step * self.accum
        # The side of this epoch comes from the loader's schedule (data.size_schedule, a pure
        # function of the epoch); evaluation always runs at data.img_size.
        # `then`: the next epoch's batches are made while this one's last are trained on.
        self.train_loader.set_epoch(epoch, skip_batches=skip, then=epoch + 1 if epoch + 1 < self.cfg.epochs else None)
        size = self.train_loader.img_size
        self.telemetry.set_img_size(size)                    # MFU from this size's FLOPs
        clock = Throughput()
        step = self.train_step
        step.start_epoch(skip)
        sums: Dict[str, float] = {}
        logged = 0
        self.logger.start_epoch(epoch, self.cfg.epochs, self.steps_per_epoch)
        for images, labels in self.train_loader:
            boundary = step(images, labels)
            clock.add(images.shape[0])
            if not boundary:
                continue
            micro = step.micro
            done = micro // self.accum
            end_of_epoch = micro == len(self.train_loader)
            if engine.global_steps % self.log_every == 0 or end_of_epoch or \
                    engine.global_steps == self.cfg.stop_after_steps:    # stops land on logging steps
                values = self._log_step(step.meter, clock, step.first_bad)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                logged += 1
                self.logger.progress(done, {
                    "epoch": f"{epoch + 1}/{self.cfg.epochs}", "step": f"{done}/{self.steps_per_epoch}",
                    "loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.2e}", **self.telemetry.progress(),
                    "img/s": f"{values['img_per_sec']:.0f}"})
                self._maybe_stop(epoch, done, end_of_epoch)
        self.logger.end_epoch()
        if step.micro == skip:
            raise RuntimeError("the training loader yielded no batch: the dataset is smaller than one global batch")
        return {"img_size": size, **{f"train/{k}": v / max(logged, 1) for k, v in sums.items()}}

    def _log_step(self, meter: DeviceMeter, clock: Throughput, first_bad: torch.Tensor) -> Dict[str, float]:
        # One all-reduce carries: stop requested (any rank), non-finite loss (any rank) and the
        # earliest such step (max of -step). It and the meter read are this step's host syncs.
        stop = self.signals is not None and self.signals.received is not None
        flags = torch.stack([torch.tensor(int(stop), device=self.device), (first_bad >= 0).long(),
                             torch.where(first_bad >= 0, -first_bad, torch.full_like(first_bad, -(2**62)))])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        any_stop, any_bad, neg_step = flags.cpu().tolist()
        self._stop_requested = bool(any_stop)
        if any_bad:
            raise NonFiniteLossError(
                f"the loss became non-finite at optimizer step {-neg_step}; stopping without saving, "
                f"so the last checkpoint in {self.checkpointer.dir} stays the last good one"
            )
        values = meter.read()
        values["img_per_sec"] = clock.read() * self.world_size
        values["lr"] = self.engine.get_lr()[0]
        # The logging step's global gradient norm (before clipping), where DeepSpeed computes
        # one: with engine.gradient_clipping > 0, or at ZeRO stage 0. A read of a value the
        # step already produced, on logging steps only.
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            values["grad_norm"] = float(norm)
        values.update(self.telemetry.read(values["img_per_sec"] / self.world_size))  # host numbers only
        self.rates.append(values["img_per_sec"])
        self.logger.record("step", self.engine.global_steps, values)
        return values

    def _maybe_stop(self, epoch: int, done: int, end_of_epoch: bool) -> None:
        """After a logging step: honour a signal or trainer.stop_after_steps, all ranks alike."""
        limit = self.cfg.stop_after_steps
        by_limit = limit is not None and self.engine.global_steps >= limit
        if not (self._stop_requested or by_limit):
            return
        state = self._state(epoch + 1, 0) if end_of_epoch else self._state(epoch, done)
        path = self.checkpointer.save(self.engine, state)
        self.logger.end_epoch()
        reason = (f"signal {self.signals.received}" if self.signals and self.signals.received
                  else "signal on another rank") if self._stop_requested else f"trainer.stop_after_steps={limit}"
        self.logger.info(f"stopping after optimizer step {self.engine.global_steps} ({reason}); "
                         f"checkpoint written to {path}")
        raise Stopped(reason, self.engine.global_steps, str(path), preempted=self._stop_requested)

    # ------------------------------------------------------------------ end

    def _epoch_line(self, epoch: int, train: Dict[str, float], metrics: Dict[str, float]) -> str:
        parts = [f"epoch {epoch + 1}/{self.cfg.epochs}", f"loss {train.get('train/loss', float('nan')):.4f}",
                 f"img/s {train.get('train/img_per_sec', 0):.0f}"]
        if not self.train_loader.sizes.fixed:
            parts.insert(1, f"{train.get('img_size')} px")
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
            "precision": self.checkpointer.precision,
        }
        if self.logger.is_main:
            if self.checkpointer.cfg.export:
                # The fp32 master weights of the final checkpoint, not the bf16 working copy: a
                # model folder timm loads (local-dir:, Hub layout; fastdeit.export) and, for
                # older tooling, the plain state_dict model.pth. With the EMA, the same for it.
                latest = self.checkpointer.latest()
                for tag, ema in (("model", False), ("model_ema", True)) if self.ema is not None else (("model", False),):
                    export_checkpoint(latest, run_dir / tag, ema=ema, pth=run_dir / f"{tag}.pth", summary=summary)
                    key = "export_ema" if ema else "export"
                    summary[key], summary[f"{key}_folder"] = str(run_dir / f"{tag}.pth"), str(run_dir / tag)
                    self.logger.artifact(run_dir / tag)
            with open(run_dir / "summary.json", "w") as f:
                json.dump(summary, f, indent=2)
        if dist.is_initialized():
            dist.barrier()
        return summary
