"""Parameter groups, optimizer choice and the per-step learning-rate schedule (DeiT recipe).

LAMB (DeiT III): ``optim.name=lamb`` is fastdeit.lamb.Lamb, Apex FusedLAMB's maths with its
trust ratios kept per parameter under ZeRO's flat partitions, the only LAMB that is still
LAMB at ZeRO stage 1/2 (see fastdeit/lamb.py: Apex's, timm's and DeepSpeed's compute one ratio
per flat partition there). ``apex_fused_lamb`` is accepted at ZeRO stage 0 only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from fastdeit.errors import ConfigError

OptimizerName = Literal["adamw", "lamb", "sgd", "apex_fused_adam", "apex_fused_lamb", "deepspeed_fused_adam"]


@dataclass
class OptimConfig:
    name: OptimizerName = "adamw"       # torch AdamW (fused kernel where supported) by default
    lr: float = 5e-4                    # at a global batch of lr_base_batch; scaled linearly
    lr_base_batch: int = 512
    weight_decay: float = 0.05
    eps: float = 1e-8
    betas: Tuple[float, float] = (0.9, 0.999)
    fused: Optional[bool] = None        # torch AdamW's fused kernel; None = wherever supported
    # LAMB: gradients first clipped to this global norm (Apex FusedLAMB's default 1.0, which
    # the DeiT III reference trains with), by fastdeit.lamb.Lamb itself at every ZeRO stage:
    # engine.gradient_clipping stays 0 (DeepSpeed's clipping syncs the host, see lamb.py).
    lamb_max_grad_norm: Optional[float] = 1.0
    # SGD: momentum with Nesterov, as timm's create_optimizer('sgd') that the DeiT reference
    # calls (--momentum 0.9); the DeiT authors' CIFAR-10 / Cars fine-tuning used it (deit#45).
    momentum: float = 0.9
    # Layer-wise LR decay for fine-tuning (BEiT; timm's param_groups_layer_decay): with L blocks
    # the head(s) train at the full LR, block i (from 0) at decay^(L-i) (the final norm with the
    # last block, as timm's group_matcher puts it), the embeddings (patch and position
    # embedding, tokens) at decay^(L+1). null: one LR for every layer.
    layer_decay: Optional[float] = None


@dataclass
class ScheduleConfig:
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6             # linear warmup starts here
    min_lr: float = 1e-5                # cosine ends here


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """DeiT's linear scaling rule: lr = base_lr x global_batch / 512."""
    return cfg.lr * global_batch / cfg.lr_base_batch


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> List[dict]:
    """Two groups: decayed weights, and undecayed 1-D params (norms, biases) plus the model's
    ``no_weight_decay()`` set (pos_embed, cls_token, dist_token for DeiT).

    With ``layer_decay``: those two per layer (timm's param_groups_layer_decay, the model's
    group_matcher deciding the layers), each with an ``lr_scale`` that the schedule
    (timm's Scheduler.update_groups) multiplies into its LR at every step. The groups are
    ordered by decreasing scale, so group 0 is at the full LR, the one the run logs.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if layer_decay is None:
        return param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay must be in (0, 1], got {layer_decay}")
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                      layer_decay=layer_decay)
    if len({g["lr_scale"] for g in groups}) == 1 and layer_decay != 1.0:
        raise ConfigError(f"optim.layer_decay={layer_decay}: {type(model).__name__} has no layers timm can "
                          "tell apart (no group_matcher); leave optim.layer_decay unset")
    return sorted(groups, key=lambda g: -g["lr_scale"])


def _fused_supported(device: torch.device) -> bool:
    # torch's fused AdamW has CUDA kernels and, since 2.4, a CPU kernel.
    return device.type in ("cuda", "cpu")


def build_optimizer(cfg: OptimConfig, model: nn.Module, global_batch: int) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s parameters, which must already sit on their device."""
    lr = scaled_lr(cfg, global_batch)
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    device = next(model.parameters()).device
    if cfg.name == "adamw":
        fused = _fused_supported(device) if cfg.fused is None else cfg.fused
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.name in ("apex_fused_adam", "apex_fused_lamb"):
        try:
            from apex.optimizers import FusedAdam, FusedLAMB
        except ImportError as e:
            raise ImportError(
                f"optim.name={cfg.name} needs NVIDIA Apex built with its CUDA extensions "
                "(it is not on the package index); use optim.name=adamw otherwise"
            ) from e
        cls = FusedAdam if cfg.name == "apex_fused_adam" else FusedLAMB
        extra = {"adam_w_mode": True} if cls is FusedAdam else {}
        return cls(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, **extra)
    if cfg.name == "lamb":
        from fastdeit.lamb import Lamb

        return Lamb(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, max_grad_norm=cfg.lamb_max_grad_norm)
    if cfg.name == "deepspeed_fused_adam":
        if device.type != "cuda":
            raise ConfigError("optim.name=deepspeed_fused_adam needs CUDA; use adamw on CPU")
        from deepspeed.ops.adam import FusedAdam as DSFusedAdam

        return DSFusedAdam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, adam_w_mode=True)
    raise ConfigError(f"unknown optim.name {cfg.name!r}")


def check_clipping(cfg: OptimConfig, gradient_clipping: float) -> None:
    """LAMB clips inside its step; DeepSpeed clipping as well would clip twice, with host syncs."""
    if cfg.name == "lamb" and gradient_clipping > 0:
        raise ConfigError(
            f"optim.name=lamb clips gradients itself (optim.lamb_max_grad_norm={cfg.lamb_max_grad_norm}, "
            f"no host sync): set engine.gradient_clipping=0 (it is {gradient_clipping})")


def check_zero_stage(cfg: OptimConfig, zero_stage: int) -> None:
    """Apex FusedLAMB under ZeRO 1/2/3 would take each flat partition for one layer; our LAMB
    reads ZeRO 1/2's layout, not ZeRO-3's."""
    if cfg.name == "apex_fused_lamb" and zero_stage > 0:
        raise ConfigError(
            f"optim.name=apex_fused_lamb with engine.zero_stage={zero_stage}: ZeRO hands the optimizer "
            "flat partitions, so a per-tensor LAMB computes its trust ratios over many layers at once; "
            "use optim.name=lamb (layer-aware under ZeRO) or engine.zero_stage=0")
    if cfg.name == "lamb" and zero_stage == 3:
        # fastdeit.lamb reads ZeRO 1/2's layout (one flat buffer per group cut at rank
        # boundaries); ZeRO-3 cuts every parameter into world pieces and steps per sub-group, a
        # layout it does not read yet: its trust ratios would span many layers.
        raise ConfigError(
            "optim.name=lamb with engine.zero_stage=3: ZeRO-3 partitions every parameter separately and steps "
            "sub-groups of those pieces, a layout fastdeit.lamb (built for ZeRO 1/2's flat partitions) does not "
            "read, so its per-layer trust ratios would be wrong; use engine.zero_stage=2 (ViT-H's LAMB state fits "
            "there: python -m benchmarks.memory plan --config CONFIG) or optim.name=adamw")


def build_scheduler(
    cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int
) -> CosineLRScheduler:
    """Linear warmup from ``warmup_lr`` to the peak, then cosine to ``min_lr``, per optimizer step.

    The reference steps the schedule per epoch; stepping per update is smoother and ends the
    same. Drive it with ``scheduler.step_update(step)`` before each optimizer step (0-based).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch must have at least one optimizer step, got {steps_per_epoch}")
    total = steps_per_epoch * epochs
    warmup = min(int(math.ceil(cfg.warmup_epochs * steps_per_epoch)), max(total - 1, 0))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total - warmup, 1),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,      # the cosine starts at the peak once warmup ends
        t_in_epochs=False,
    )
