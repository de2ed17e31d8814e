"""One micro-batch of training: the code the trainer runs and the benchmarks time.

``TrainStep`` is the whole per-batch work of ``Trainer.train_epoch``: the per-step LR, batch
mixing, the cast to the engine's dtype, the frozen teacher, the student's forward, the loss, the
backward, the engine's step, the on-device meters and non-finite detector, and the EMA update at
each optimizer-step boundary. ``benchmarks/`` builds the same parts (``fastdeit.build``) and
calls this class, so a benchmark of "the training step" cannot drift from the one that trains.

Three phases (``forward``, ``backward``, ``update``) so the benchmarks can time each; calling
the step runs all three. Nothing here reads a device value on the host (docs/DESIGN.md,
hot-path rules): the loss, its parts and the first non-finite step stay on the device until
the trainer's logging step reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from fastdeit.data.augment.mixing import BatchMixer
from fastdeit.ema import ModelEma
from fastdeit.losses import DeiTLoss
from fastdeit.metrics import DeviceMeter
from fastdeit.models import FrozenTeacher


@dataclass
class StepParts:
    """What a training step computes with (built by fastdeit.build)."""

    engine: Any                         # DeepSpeed engine around the (compiled) student
    scheduler: Any                      # per-step LR (fastdeit.optim)
    mixer: BatchMixer
    criterion: DeiTLoss
    teacher: Optional[FrozenTeacher]    # None without distillation
    ema: Optional[ModelEma]             # None with ema.decay = 0
    dtype: torch.dtype                  # the engine's compute dtype


class TrainStep:
    """``step(images, labels) -> True at an optimizer-step boundary``; see the module docstring.

    ``images``/``labels``: a batch as the loader delivers it (normalised float32 [B, 3, S, S],
    int64 [B]) on the device. ``meter`` and ``first_bad`` (the first optimizer step whose loss
    was non-finite on this rank, -1 if none) accumulate on the device until ``start_epoch``
    starts them afresh; the trainer reads them on logging steps only.
    """

    def __init__(self, parts: StepParts, device: torch.device):
        self.parts = parts
        self.engine = parts.engine
        self.device = device
        self.accum = self.engine.gradient_accumulation_steps()
        self.loss: Optional[torch.Tensor] = None
        self.losses: Dict[str, torch.Tensor] = {}
        self.start_epoch()

    def start_epoch(self, skip: int = 0) -> None:
        """Fresh meters; ``skip`` micro-batches of the epoch already done (a resumed run)."""
        self.meter = DeviceMeter(self.device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.micro = skip                 # micro-batches of this epoch so far

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """LR, mixing, cast, teacher, student and loss; returns the loss."""
        p = self.parts
        self.optimizer_step = self.engine.global_steps
        p.scheduler.step_update(self.optimizer_step)        # host-side: sets param-group LRs
        images, targets = p.mixer(images, labels)
        images = images.to(p.dtype)
        teacher_logits = p.teacher(images) if p.teacher is not None else None
        outputs = self.engine(images)
        self.loss, self.losses = p.criterion(outputs, targets, teacher_logits)
        return self.loss

    def backward(self) -> None:
        self.engine.backward(self.loss)

    def update(self) -> bool:
        """The engine's step (an optimizer step at the accumulation boundary), the meters, and
        the EMA from the fp32 masters just written; True at the boundary."""
        self.engine.step()
        self.meter.update({"loss": self.loss, **self.losses})
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(self.loss.detach()),
                                     torch.full_like(self.first_bad, self.optimizer_step), self.first_bad)
        self.micro += 1
        if self.micro % self.accum:
            return False
        if self.parts.ema is not None:
            self.parts.ema.update(self.engine.global_steps)
        return True

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        self.forward(images, labels)
        self.backward()
        return self.update()
