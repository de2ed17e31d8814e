"""DeiT's objective: soft-target cross entropy plus optional distillation (paper section 4).

With C classes, batch B, student class logits ``z_s`` and distillation-head logits ``z_d``
(both [B, C]), soft targets ``y`` [B, C] (mixed and label-smoothed), teacher logits ``z_t``:

    none: CE(z_s, y)
    soft: (1 - a) CE(z_s, y) + a T^2 KL(softmax(z_t/T) || softmax(z_d/T)) summed / (B*C)
    hard: (1 - a) CE(z_s, y) + a CE(z_d, argmax z_t)

The soft term divides the summed KL by ``numel`` (B*C), not B, exactly as the reference code
does; that scaling is part of what alpha=0.5 was tuned against.

The class-head term CE(z_s, y) is the soft-target cross entropy by default (DeiT); with
``loss.base: bce`` it is DeiT III's binary cross entropy instead (section 3, after Wightman et
al.'s "ResNet strikes back"): the reference trains with ``--bce-loss``, which binarises the
mixed targets (``targets.gt(0.0)``: every class present in the Mixup/CutMix blend becomes 1)
and applies ``BCEWithLogitsLoss`` (mean over B*C). The distillation terms are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from fastdeit.errors import ConfigError

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LossConfig:
    base: Literal["ce", "bce"] = "ce"     # class-head loss: soft-target CE (DeiT) or BCE (DeiT III)
    # BCE targets: 1 where the mixed (soft) target exceeds this, else 0; the reference's
    # targets.gt(0.0). null: BCE on the soft targets as they are.
    bce_target_threshold: Optional[float] = 0.0


def check_loss_targets(cfg: LossConfig, label_smoothing: float, num_classes: int) -> None:
    """Smoothing gives every class at least label_smoothing / num_classes (timm's Mixup): BCE
    targets binarised below that would be 1 everywhere. Refuse it rather than train on it."""
    t = cfg.bce_target_threshold
    if cfg.base == "bce" and t is not None and label_smoothing > 0 and t < label_smoothing / num_classes:
        raise ConfigError(
            f"loss.base=bce with loss.bce_target_threshold={t} and mixing.label_smoothing="
            f"{label_smoothing}: every smoothed class ({label_smoothing / num_classes:.2g} or more) is "
            "above the threshold, so every target would be 1. DeiT III trains BCE without "
            "smoothing (mixing.label_smoothing: 0); or raise the threshold, or set it null")


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, threshold: Optional[float]) -> torch.Tensor:
    """Mean BCE-with-logits over all B*C entries; targets binarised at ``threshold`` if given."""
    if threshold is not None:
        targets = (targets > threshold).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


@dataclass
class DistillConfig:
    type: Literal["none", "soft", "hard"] = "hard"   # the paper's best (Table 3): hard + dist token
    alpha: float = 0.5
    tau: float = 1.0


class DeiTLoss:
    """``loss(outputs, targets, teacher_logits) -> (loss, parts)``; parts are detached scalars."""

    def __init__(self, cfg: DistillConfig, loss: Optional[LossConfig] = None):
        if cfg.type not in ("none", "soft", "hard"):
            raise ConfigError(f"distill.type must be none, soft or hard, got {cfg.type!r}")
        if not 0.0 <= cfg.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {cfg.alpha}")
        if cfg.tau <= 0:
            raise ConfigError(f"distill.tau must be positive, got {cfg.tau}")
        self.cfg = cfg
        self.loss = loss or LossConfig()
        if self.loss.base not in ("ce", "bce"):
            raise ConfigError(f"loss.base must be ce or bce, got {self.loss.base!r}")
        if self.loss.base == "bce":
            threshold = self.loss.bce_target_threshold
            self.base = lambda logits, targets: binary_cross_entropy(logits, targets, threshold)
        else:
            self.base = SoftTargetCrossEntropy()

    @property
    def needs_teacher(self) -> bool:
        return self.cfg.type != "none"

    def __call__(
        self, outputs: Outputs, targets: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        distilled = isinstance(outputs, tuple)
        if self.needs_teacher and not distilled:
            raise ValueError(
                f"distill.type={self.cfg.type} needs a model with a distillation head "
                "(a *_distilled_* DeiT); this model returned one output"
            )
        if distilled and not self.needs_teacher:
            raise ValueError("a distilled model needs distill.type soft or hard (and a teacher)")
        cls_logits, dist_logits = outputs if distilled else (outputs, None)
        # Losses in fp32: bf16 log-softmax over 1000 classes loses the small probabilities.
        base = self.base(cls_logits.float(), targets)
        if not self.needs_teacher:
            return base, {"loss_cls": base.detach()}
        if teacher_logits is None:
            raise ValueError(f"distill.type={self.cfg.type} but no teacher logits were given")
        a, tau = self.cfg.alpha, self.cfg.tau
        dist_logits = dist_logits.float()
        teacher_logits = teacher_logits.float()
        if self.cfg.type == "soft":
            kd = F.kl_div(
                F.log_softmax(dist_logits / tau, dim=1),
                F.log_softmax(teacher_logits / tau, dim=1),
                reduction="sum",
                log_target=True,
            ) * (tau * tau) / dist_logits.numel()
        else:
            kd = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
        loss = (1 - a) * base + a * kd
        return loss, {"loss_cls": base.detach(), "loss_dist": kd.detach()}
