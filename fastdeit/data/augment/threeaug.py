"""3-Augment (DeiT III, Touvron et al. 2022, section 3), batched on the loader's device.

The reference (facebookresearch/deit, augment.py `new_data_aug_generator`) applies per image,
in PIL, after the crop and the horizontal flip:

  1. one of three operations chosen uniformly (torchvision RandomChoice):
     grayscale (PIL's RGB -> L, copied to 3 channels), solarisation (ImageOps.solarize,
     threshold 128), Gaussian blur (ImageFilter.GaussianBlur, radius uniform in [0.1, 2]);
  2. torchvision ColorJitter(b, b, b) with b = `data.color_jitter` (0.3 in DeiT III):
     brightness, contrast and saturation factors uniform in [1 - b, 1 + b], applied in a random
     order (ImageEnhance.Brightness / Contrast / Color); no hue.

Here the same distribution runs on a uint8 batch at once, like RandAugment (randaug.py): every
per-image choice is drawn up front on the CPU from a dedicated torch.Generator (the loader seeds
it per batch, so resume needs no replay), then each stage groups the images by operation (one
gather that makes every group contiguous) and transforms each group in one batched call.

Bit-exact against PIL on the same choices (tests/test_data_threeaug.py): grayscale, solarise
and the three enhancements reuse imageops' PIL-exact ops; the blur below reproduces Pillow's
own algorithm, which is not a true Gaussian: three passes of an "extended" box blur (box
radius with a fractional part, Gwosdek et al. 2011) per axis, in 24-bit fixed point, rounded
to uint8 after every pass, borders extended.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from fastdeit.errors import ConfigError

from . import imageops
from ..config import DataConfig

Tensor = torch.Tensor

CHOICES = ("grayscale", "solarize", "blur")     # the reference's RandomChoice order
JITTERS = ("brightness", "contrast", "color")   # torchvision ColorJitter fn ids 0, 1, 2
BLUR_RADIUS = (0.1, 2.0)                        # the reference's GaussianBlur radius_min/max
SOLARIZE_THRESHOLD = 128                        # ImageOps.solarize's default
REFERENCE_JITTER = 0.3                          # main.py's --color-jitter default (DeiT III commands)
_BLUR_PASSES = 3                                # Pillow's GaussianBlur: 3 box passes per axis
_TAPS = 5                                       # box radius < 2 for radius <= 2: at most 5 taps


def box_blur_weights(radius: Tensor) -> Tensor:
    """Pillow's fixed-point taps for GaussianBlur(radius): int64 [k, 5], centre at index 2.

    Pillow (_gaussian_blur_radius, ImagingLineBoxBlur) in float32 C arithmetic: per pass
    sigma^2 = radius^2 / 3, box length L = sqrt(12 sigma^2 + 1), integer box radius
    l = floor((L - 1) / 2) and fractional part a; r = l + a. Inner taps (|k| <= l) weigh
    ww = trunc(2^24 / (2r + 1)), the two outer ones fw = (2^24 - (2l + 1) ww) // 2.
    Computed with numpy float32 step by step, so the integer weights are Pillow's exactly.
    """
    r32 = radius.detach().cpu().numpy().astype(np.float32)
    one, two, three, six, twelve = (np.float32(v) for v in (1, 2, 3, 6, 12))
    sigma2 = r32 * r32 / np.float32(_BLUR_PASSES)
    big_l = np.sqrt((twelve * sigma2 + one).astype(np.float64)).astype(np.float32)  # C sqrt -> float
    low = np.floor((big_l - one) / two).astype(np.float32)
    a = (two * low + one) * (low * (low + one) - three * sigma2)
    a = a / (six * (sigma2 - (low + one) * (low + one)))
    box = (low + a).astype(np.float32)
    ww = (np.float32(1 << 24) / (box * two + one)).astype(np.int64)        # (UINT32) truncation
    inner = box.astype(np.int64)                                           # (int) floatRadius
    if (inner > (_TAPS - 3) // 2).any():
        raise ValueError(f"blur radius too large for {_TAPS} taps: {radius.max().item()}")
    fw = ((1 << 24) - (inner * 2 + 1) * ww) // 2
    taps = np.zeros((len(r32), _TAPS), dtype=np.int64)
    centre = _TAPS // 2
    for i in range(len(r32)):
        n = int(inner[i])
        taps[i, centre - n: centre + n + 1] = ww[i]
        taps[i, centre - n - 1] = taps[i, centre + n + 1] = fw[i]
    return torch.from_numpy(taps)


# The blur's integer arithmetic, exact in 16/32-bit integers. Pillow's pass is
# floor((S + 2^23) / 2^24) with S = sum_k w_k x_k: taps w_k < 2^24 summing to (at most) 2^24 and
# pixels x_k <= 255, so S needs 32 bits, which int32 does not hold (int64 did, at 8 bytes per
# pixel in every temporary). The taps are symmetric (outer, inner, centre, inner, outer), so
# S = w_0 x_0 + w_1 (x_-1 + x_1) + w_2 (x_-2 + x_2), the pair sums <= 510 in int16; splitting
# each tap as w = 2^12 hi + lo (hi, lo < 2^12) gives S = 2^12 S_hi + S_lo with
# S_hi, S_lo <= 4095 x 1275 < 2^23 in int32, and exactly (floor(floor(a / b) / c) = floor(a / bc))
#     floor((S + 2^23) / 2^24) = (S_hi + ((S_lo + 2^23) >> 12)) >> 12.
# S_hi and S_lo accumulate side by side in one [2, ...] int32 tensor (each input read once per
# op); the pixels between passes are int16. Pillow's integers bit for bit, at 0.4x the bytes
# moved of the int64 version (benchmarks/results/2026-12-03-cpu-traffic-*.md).
_SPLIT = 12


def _split_taps(taps: Tensor) -> Tensor:
    """int64 [k, 5] symmetric taps (box_blur_weights) -> int32 [3, 2, k]: for the centre, +-1
    and +-2 taps, (hi, lo) split at 2^12. Slices only: no index tensor to copy to the device."""
    sym = taps[:, _TAPS // 2:].t()                                    # [3, k]
    return torch.stack([sym >> _SPLIT, sym & ((1 << _SPLIT) - 1)], dim=1).to(torch.int32)


def _blur_rows(x: Tensor, taps: Tensor, bias: Tensor) -> Tensor:
    """One box pass along the last axis of int16 [k, ..., W] (values 0..255), borders extended
    (Pillow clamps its line indices); returns int16 values 0..255 (Pillow's rounded uint8)."""
    half = _TAPS // 2
    edge = (*x.shape[:-1], half)
    padded = torch.cat([x[..., :1].expand(edge), x, x[..., -1:].expand(edge)], dim=-1)
    width = x.shape[-1]
    near = padded[..., half - 1:half - 1 + width] + padded[..., half + 1:half + 1 + width]
    far = padded[..., 0:width] + padded[..., half + 2:half + 2 + width]
    shape = (2, taps.shape[-1], *([1] * (x.dim() - 1)))
    s = torch.addcmul(bias.view(2, *([1] * x.dim())), padded[..., half:half + width], taps[0].view(shape))
    s.addcmul_(near, taps[1].view(shape))
    s.addcmul_(far, taps[2].view(shape))
    s_hi, s_lo = s.unbind(0)                    # s_lo already holds + 2^23 (the bias)
    s_hi.add_(s_lo.bitwise_right_shift_(_SPLIT))
    return torch.bitwise_right_shift(s_hi, _SPLIT, out=torch.empty_like(x))


def gaussian_blur(x: Tensor, taps: Tensor) -> Tensor:
    """Pillow's GaussianBlur on uint8 [k, 3, H, W] with per-image taps ([k, 5] from
    box_blur_weights): three passes along the rows, then three along the columns."""
    taps = _split_taps(taps.to(x.device))
    # (0, 2^23) for (S_hi, S_lo), made on the device: no host data to copy
    bias = torch.arange(2, dtype=torch.int32, device=x.device) << 23
    v = x.to(torch.int16)
    for _ in range(_BLUR_PASSES):
        v = _blur_rows(v, taps, bias)
    v = v.transpose(-1, -2)
    for _ in range(_BLUR_PASSES):
        v = _blur_rows(v, taps, bias)
    return v.transpose(-1, -2).to(torch.uint8).contiguous(memory_format=torch.channels_last)


def grayscale(x: Tensor) -> Tensor:
    """PIL's RGB -> L copied to three channels (torchvision Grayscale(3))."""
    luma = imageops._luma(x.permute(0, 2, 3, 1)).to(torch.uint8)     # [k, H, W, 1]
    return luma.expand(-1, -1, -1, 3).contiguous().permute(0, 3, 1, 2)


@dataclass
class ThreeAugmentPlan:
    """One batch's draws, in loader order (CPU tensors), plus the stage arrangements.

    choice: int64 [B] (index into CHOICES); radius: float64 [B] (blur radius, drawn for every
    image so the stream does not depend on the choices); factor: float64 [3, B] (brightness,
    contrast, saturation); order: int64 [3, B] (the jitter op of each slot, a permutation of
    0..2 per image). gather/groups: like RandAugmentPlan, for 1 + 3 stages.
    """
    choice: Tensor
    radius: Tensor
    factor: Tensor
    order: Tensor
    gather: Tensor
    groups: List[List[Tuple[int, int, int]]]
    taps: Tensor                   # [B, 5] blur taps, in the blur stage's arrangement
    values: Tensor                 # [3, B] jitter factor of each slot, in that slot's arrangement

    def to(self, device: torch.device) -> "ThreeAugmentPlan":
        if device.type == "cpu":
            return self
        move = lambda t: t.pin_memory().to(device, non_blocking=True)   # noqa: E731
        return ThreeAugmentPlan(self.choice, self.radius, self.factor, self.order, move(self.gather),
                                self.groups, move(self.taps), move(self.values))


class ThreeAugment:
    """`(uint8 images [B, 3, H, W], generator) -> uint8 images`, 3-Augment semantics.

    jitter: ColorJitter strength b (factors in [1 - b, 1 + b]); 0 leaves the colour alone.
    choose: False leaves out the grayscale/solarise/blur choice: ColorJitter(b, b, b) alone,
    what timm's create_transform (the reference's transform) applies after the crop and flip
    when neither RandAugment nor 3-Augment is on. The draws are the same either way.
    """

    def __init__(self, jitter: float = 0.3, choose: bool = True):
        if not 0.0 <= jitter < 1.0:
            raise ConfigError(f"data.color_jitter must be in [0, 1), got {jitter}")
        self.jitter = jitter
        self.choose = choose

    @staticmethod
    def from_config(cfg: DataConfig) -> Optional["ThreeAugment"]:
        """3-Augment when data.three_augment is on, else None; contradictory keys are errors
        (the reference's --ThreeAugment replaces RandAugment, and timm ignores the colour
        jitter next to RandAugment, so neither combination would do what it says).

        data.color_jitter null is the reference's --color-jitter default as it takes effect:
        REFERENCE_JITTER inside 3-Augment (augment.py's ColorJitter), nothing elsewhere (timm's
        create_transform disables the jitter when RandAugment is on). So turning on
        three_augment alone gives DeiT III's 3-Augment, jitter included."""
        if not cfg.three_augment:
            if cfg.color_jitter and cfg.rand_augment:
                raise ConfigError(f"data.color_jitter={cfg.color_jitter} does not apply next to "
                                  f"RandAugment (timm's create_transform, and so the reference, drops "
                                  f"it): use it with data.three_augment or data.rand_augment: null")
            if cfg.color_jitter:
                # --aa off, no 3-Augment: create_transform's ColorJitter(b, b, b) after the flip
                return ThreeAugment(cfg.color_jitter, choose=False)
            return None
        if cfg.rand_augment:
            raise ConfigError(f"data.three_augment replaces RandAugment: set data.rand_augment: null "
                             f"(got {cfg.rand_augment!r})")
        return ThreeAugment(REFERENCE_JITTER if cfg.color_jitter is None else cfg.color_jitter)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        plan = self.sample(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, plan.to(images.device))

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator) -> ThreeAugmentPlan:
        """Every choice for one batch, on the CPU; the same number of draws for every batch."""
        choice = torch.randint(len(CHOICES), (batch,), generator=generator)
        lo, hi = BLUR_RADIUS
        radius = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
        b = self.jitter
        factor = (1 - b) + 2 * b * torch.rand(3, batch, generator=generator, dtype=torch.float64)
        order = torch.argsort(torch.rand(3, batch, generator=generator), dim=0)   # a permutation per image
        first = 1 if self.choose else 0          # jitter slots start after the choice stage
        stages = ([choice] if self.choose else []) + ([order[j] for j in range(3)] if b > 0 else [])
        gather, groups, arranged = _arrange(stages, batch)
        taps = (box_blur_weights(radius.index_select(0, arranged[0])) if self.choose
                else torch.zeros(0, _TAPS, dtype=torch.int64))
        values = torch.stack([factor.gather(0, order[j:j + 1])[0].index_select(0, arranged[first + j])
                              for j in range(3)]) if b > 0 else torch.zeros(0, batch)
        return ThreeAugmentPlan(choice, radius, factor, order, gather, groups, taps, values)

    def apply(self, images: Tensor, plan: ThreeAugmentPlan) -> Tensor:
        """Apply a plan to uint8 images [B, 3, H, W] (on the plan's device); returns uint8 images
        in channels-last memory."""
        x = images.permute(0, 2, 3, 1)                       # NHWC view (free for channels-last)
        first = 1 if self.choose else 0
        for j, slot in enumerate(plan.groups):
            x = x.index_select(0, plan.gather[j])
            for op, start, end in slot:
                sub = x[start:end].permute(0, 3, 1, 2)        # [k, 3, H, W], channels-last
                if j < first:
                    out = (grayscale(sub) if op == 0 else
                           imageops.solarize(sub, torch.full((end - start,), SOLARIZE_THRESHOLD, device=x.device))
                           if op == 1 else gaussian_blur(sub, plan.taps[start:end]))
                else:
                    fn = getattr(imageops, JITTERS[op])
                    out = fn(sub, plan.values[j - first, start:end])
                x[start:end] = out.permute(0, 2, 3, 1)
        x = x.index_select(0, plan.gather[-1])
        return x.permute(0, 3, 1, 2)


def _arrange(stages: List[Tensor], batch: int):
    """For each stage's per-image op ids (loader order), the gather from the previous
    arrangement that makes each op's images contiguous, the (op, start, end) runs, and each
    stage's arrangement (arranged[j][p] = the loader index at position p in stage j)."""
    gather = torch.empty(len(stages) + 1, batch, dtype=torch.int64)
    where = torch.arange(batch)             # where[sample] = its current position
    groups, arranged = [], []
    for j, ops in enumerate(stages):
        sort = torch.sort(ops, stable=True)
        gather[j] = where[sort.indices]
        where = torch.empty_like(where)
        where[sort.indices] = torch.arange(batch)
        counts = torch.bincount(ops, minlength=3).tolist()
        slot, start = [], 0
        for op, count in enumerate(counts):
            if count:
                slot.append((op, start, start + count))
            start += count
        groups.append(slot)
        arranged.append(sort.indices)
    gather[-1] = where
    return gather, groups, arranged
