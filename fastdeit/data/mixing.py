"""Batch-level regularisation on the device, after the loader: random erasing, then Mixup/CutMix.

Order and values follow the DeiT reference: random erasing is a per-image transform applied
after normalisation (so it runs before batch mixing), and Mixup/CutMix run on the batch with
label-smoothed targets. The output targets are always soft [B, C] float32, smoothed even when
mixing is off, so the loss is one soft-target cross entropy in every configuration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Tuple

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing


@dataclass
class MixingConfig:
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0                  # chance of mixing a batch at all
    switch_prob: float = 0.5           # chance of CutMix instead of Mixup when both are on
    mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1
    erase_prob: float = 0.25           # random erasing, per image, after normalisation
    erase_mode: Literal["const", "rand", "pixel"] = "pixel"
    erase_count: int = 1


class BatchMixer:
    """``(images [B,3,H,W] normalised, labels [B] int64) -> (images, soft targets [B, C])``."""

    def __init__(self, cfg: MixingConfig, num_classes: int, device: torch.device):
        self.cfg = cfg
        self.num_classes = num_classes
        # timm's Mixup covers both the mixing and the smoothed one-hot targets; with both
        # alphas at 0 it only smooths. Its lambda comes from numpy's global RNG.
        self.mixup = Mixup(
            mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.prob,
            switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )
        self.mixing = cfg.prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)
        self.erase = (
            RandomErasing(cfg.erase_prob, mode=cfg.erase_mode, max_count=cfg.erase_count, device=str(device))
            if cfg.erase_prob > 0 else None
        )

    def check_batch_size(self, micro_batch: int) -> None:
        if self.mixing and micro_batch % 2:
            raise ValueError(f"Mixup/CutMix pair samples within a batch: the micro batch ({micro_batch}) must be even")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.erase is not None:
            images = self.erase(images)   # in place, per image, on the images' device
        return self.mixup(images, labels)
