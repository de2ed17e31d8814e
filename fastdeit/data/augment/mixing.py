"""Batch-level regularisation on the device, after the loader: random erasing, then Mixup/CutMix.

Order and values follow the DeiT reference: random erasing is a per-image transform applied
after normalisation (so it runs before batch mixing), and Mixup/CutMix run on the batch with
label-smoothed targets. The output targets are always soft [B, C] float32, smoothed even when
mixing is off, so the loss is one soft-target cross entropy in every configuration.

Everything is batched on the images' device. Random erasing is our own vectorised version of
timm's RandomErasing (a per-image Python loop): the same per-image probability, box count,
area/aspect sampling with 10 attempts, and fills (tests/test_mixing.py compares the statistics);
its draws come from torch's global generators, on the host, and reach the device as one small
copy from pinned memory that does not block (transfer.py). Mixup/CutMix take their parameters
and targets from timm's Mixup (numpy's global RNG, as in timm) and write the mixed batch once,
straight into the engine's dtype in channels-last memory, so the trainer's cast is a no-op.
In "batch" mode (the recipe) nothing here waits for the device. The "pair" and "elem" modes run
timm's own per-sample code, which moves its lambdas with one blocking copy per batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

from ...errors import ConfigError
from ..transfer import to_device

CHANNELS_LAST = torch.channels_last


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


class BatchRandomErasing:
    """timm's RandomErasing over a whole batch in one vectorised pass (in place).

    Per image: erase with probability p; count = 1 or uniform in [1, max_count]; per box, up to
    10 attempts of area ~ U(min_area, max_area) * HW / count and log-aspect ~ U(log a, -log a),
    h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), the first with h < H and
    w < W wins (none: no box), top/left uniform; fill: per-pixel N(0, 1) ('pixel'), per-box
    per-channel N(0, 1) ('rand') or 0 ('const').
    """

    def __init__(self, probability: float = 0.5, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: Optional[float] = None, mode: str = "const",
                 min_count: int = 1, max_count: Optional[int] = None, attempts: int = 10):
        if mode not in ("const", "rand", "pixel"):
            raise ConfigError(f"erase mode must be const|rand|pixel, got {mode!r}")
        self.probability, self.min_area, self.max_area = probability, min_area, max_area
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.min_count, self.max_count = min_count, max_count or min_count
        self.mode, self.attempts = mode, attempts

    def boxes(self, batch: int, height: int, width: int) -> torch.Tensor:
        """Draw boxes on the CPU: int64 [batch, max_count, 4] (top, left, h, w); h = 0: none."""
        n, a = self.max_count, self.attempts
        erase = torch.rand(batch) < self.probability
        count = torch.randint(self.min_count, self.max_count + 1, (batch,))
        area = height * width
        target = torch.empty(batch, n, a, dtype=torch.float64).uniform_(self.min_area, self.max_area)
        target = target * area / count.view(batch, 1, 1)
        aspect = torch.exp(torch.empty(batch, n, a, dtype=torch.float64).uniform_(*self.log_aspect))
        h = torch.round(torch.sqrt(target * aspect)).long()       # round half to even, as Python
        w = torch.round(torch.sqrt(target / aspect)).long()
        ok = (w < width) & (h < height)
        first = ok.to(torch.int8).argmax(dim=2, keepdim=True)      # first fitting attempt
        found = ok.gather(2, first).squeeze(2)
        h, w = h.gather(2, first).squeeze(2), w.gather(2, first).squeeze(2)
        top = (torch.rand(batch, n, dtype=torch.float64) * (height - h + 1)).long()
        left = (torch.rand(batch, n, dtype=torch.float64) * (width - w + 1)).long()
        used = erase.view(batch, 1) & found & (torch.arange(n).view(1, n) < count.view(batch, 1))
        return torch.stack([top, left, h * used, w * used], dim=2)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Erase in place. One scatter over the erased pixels of the whole batch: the work is
        proportional to the erased area, not to the batch (a full-batch mask pass costs
        several times timm's per-image slicing on a CPU)."""
        b, c, height, width = images.shape
        boxes = self.boxes(b, height, width).view(-1, 4)             # [b * max_count, 4]
        pixels = boxes[:, 2] * boxes[:, 3]
        keep = pixels > 0
        total = int(pixels.sum())
        if total == 0:
            return images
        sample = torch.arange(b).repeat_interleave(self.max_count)[keep]
        boxes, pixels = boxes[keep], pixels[keep]
        dev = images.device
        # per box: the flat NHWC pixel index of its top-left corner, its width, its first
        # slot in the list of erased pixels; per pixel: corner + row * W + column
        corner = (sample * height + boxes[:, 0]) * width + boxes[:, 1]
        table = torch.stack([corner, boxes[:, 3], pixels.cumsum(0) - pixels, pixels], dim=1)
        table = to_device(table, dev)     # one copy from pinned memory: the host never waits
        box_of = torch.repeat_interleave(torch.arange(len(boxes), device=dev),
                                         table[:, 3], output_size=total)
        corner, w, start = table[:, :3].index_select(0, box_of).unbind(1)
        local = torch.arange(total, device=dev) - start
        row = torch.div(local, w, rounding_mode="floor")
        flat = corner + row * width + (local - row * w)
        if self.mode == "pixel":
            values = torch.randn(total, c, dtype=images.dtype, device=dev)
        elif self.mode == "rand":   # one colour per box
            values = torch.randn(len(boxes), c, dtype=images.dtype, device=dev)[box_of]
        else:
            values = torch.zeros((), dtype=images.dtype, device=dev)
        nhwc = images.permute(0, 2, 3, 1)
        if nhwc.is_contiguous():      # channels-last: scatter whole pixels (C values) at once
            nhwc.view(-1, c).index_put_((flat,), values)
        else:                         # any other layout: (sample, y, x) indices
            hw = height * width
            nhwc.index_put_((flat // hw, flat % hw // width, flat % width), values)
        return images


class BatchMixer:
    """``(images [B,3,H,W] normalised, labels [B] int64) -> (images, soft targets [B, C])``.

    Output images are in `dtype` (the engine's: bf16, fp16 or fp32) and channels-last memory;
    targets are float32. The input batch may be modified in place.
    """

    def __init__(self, cfg: MixingConfig, num_classes: int, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.num_classes = num_classes
        self.dtype = dtype
        # timm's Mixup draws lambda and the CutMix/Mixup switch (numpy's global RNG); with both
        # alphas at 0 it only smooths.
        self.mixup = Mixup(
            mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.prob,
            switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )
        self.mixing = cfg.prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)
        self.erase = (
            BatchRandomErasing(cfg.erase_prob, mode=cfg.erase_mode, max_count=cfg.erase_count)
            if cfg.erase_prob > 0 else None
        )

    def check_batch_size(self, micro_batch: int) -> None:
        if self.mixing and micro_batch % 2:
            raise ConfigError(f"Mixup/CutMix pair samples within a batch: the micro batch ({micro_batch}) must be even")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.erase is not None:
            images = self.erase(images)   # in place, whole batch at once
        if not self.mixing:
            targets = mixup_target(labels, self.num_classes, 1.0, self.cfg.label_smoothing)
            return self._out(images), targets
        if self.cfg.mode != "batch":      # per-pair/per-sample lambdas: timm's own code
            images, targets = self.mixup(images, labels)
            return self._out(images), targets
        lam, use_cutmix = self.mixup._params_per_batch()
        if lam == 1.0:
            out = self._out(images)
        elif use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                images.shape, lam, ratio_minmax=self.mixup.cutmix_minmax,
                correct_lam=self.mixup.correct_lam)
            out = self._out(images)   # the input may be modified in place (see above)
            box = out[:, :, yl:yh, xl:xh]
            box.copy_(box.flip(0))        # sample i takes the box from sample B-1-i
        else:
            # lam x + (1 - lam) x.flip(0), written once in the output dtype and layout
            out = torch.empty(images.shape, dtype=self.dtype, device=images.device,
                              memory_format=CHANNELS_LAST)
            torch.add(images.flip(0).mul_(1.0 - lam), images, alpha=lam, out=out)
        targets = mixup_target(labels, self.num_classes, lam, self.cfg.label_smoothing)
        return out, targets

    def _out(self, images: torch.Tensor, copy: bool = False) -> torch.Tensor:
        """images in the output dtype and channels-last memory (no copy if already so)."""
        return images.to(dtype=self.dtype, memory_format=CHANNELS_LAST, copy=copy)
