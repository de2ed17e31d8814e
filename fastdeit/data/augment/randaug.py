"""RandAugment as timm's `rand-m9-mstd0.5-inc1` defines it, batched on the loader's device.

timm's RandAugment (what the DeiT reference trains with) runs per image in PIL on the CPU:
for each image, `n` ops drawn uniformly with replacement from the op set; each op applies with
probability `p` (0.5) at a magnitude drawn per application from N(m, mstd) clipped to
[0, mmax]; geometric ops and signed enhancements flip their sign with probability 0.5.
DALI's own `rand_augment` has no magnitude noise, a different op set (`identity`, no `invert`
or `solarize_add`) and always applies both ops, so we do not use it.

Here the same distribution runs on a whole uint8 batch at once: the per-image choices are
drawn up front from a dedicated torch.Generator (never the global RNG, which the trainer
restores on resume), then for each of the `n` op slots the images are grouped by op and each
group is transformed in one batched call (imageops.py). On a GPU this is a few dozen small kernels per batch; on a CPU it is vectorised
torch code instead of a per-image Python loop.

Faithfulness to timm with the DeiT hyper-parameters (create_transform(..., interpolation=
"bicubic")): same op set and order, same level->argument maps (increasing variants with inc1),
same fill colour (the mean pixel, round(255 * mean) = (124, 116, 104)), bicubic warps. The point
and colour ops are bit-exact against PIL; shear and translate use PIL's own bicubic kernel
(float32 instead of float64: about 0.1% of values one level apart). Remaining differences:
  * rotation interpolates with torch's bicubic kernel (grid_sample, a = -0.75) where PIL uses
    a = -1: about half a grey level on average, a few levels at sharp edges;
  * posterize at magnitude 10 keeps 0 bits (a black image), as timm did with the Pillow of the
    DeiT paper; Pillow >= 11 raises ValueError there, so current timm + Pillow can crash on it;
  * the random draws come from torch, not Python's `random`/numpy: same distribution, other
    numbers.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ...errors import ConfigError
from . import imageops
from ..transfer import to_device

# timm expresses magnitudes on a 0..10 scale (_LEVEL_DENOM).
TIMM_MAX_MAGNITUDE = 10

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order.
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

_TRANSLATE_PCT = 0.45  # timm's hparams default translate_pct


@dataclass(frozen=True)
class RandAugmentSpec:
    magnitude: int              # m: level on timm's 0..10 scale
    num_ops: int = 2            # n: op slots per image
    magnitude_std: float = 0.0  # mstd: per-application magnitude noise; inf = uniform(0, m)
    increasing: bool = False    # inc1: the op set whose strength grows with m
    prob: float = 0.5           # p: chance that each drawn op is applied
    magnitude_max: float = TIMM_MAX_MAGNITUDE   # mmax: upper clip of the noisy magnitude

    @property
    def ops(self) -> Tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """Parse timm's `rand-m{M}[-n{N}][-mstd{S}][-inc{0|1}][-p{P}][-mmax{X}]`; ValueError else.

    Sections are split like timm does (a key, then a number). Stricter than timm: a magnitude
    is required and must lie in [0, mmax] (timm silently clips), and the `t` (op subsets and
    weights) section is rejected rather than ignored.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"RandAugment spec must start with 'rand-': {spec!r}")
    values: Dict[str, str] = {}
    for part in parts[1:]:
        pieces = re.split(r"(\d.*)", part)
        key, val = (pieces[0], pieces[1]) if len(pieces) >= 2 else (part, "")
        if key not in ("m", "n", "mstd", "inc", "p", "mmax") or not val or key in values:
            raise ConfigError(f"RandAugment option {part!r} is not supported in {spec!r}")
        values[key] = val

    def number(key: str, kind=float):
        try:
            v = kind(values[key])
        except ValueError:
            raise ConfigError(f"malformed RandAugment option {key}{values[key]!r} in {spec!r}") from None
        if not v >= 0:
            raise ConfigError(f"RandAugment option {key} must be >= 0 in {spec!r}")
        return v

    if "m" not in values:
        raise ConfigError(f"RandAugment spec needs a magnitude 'm<int>': {spec!r}")
    mmax = number("mmax", int) if "mmax" in values else TIMM_MAX_MAGNITUDE
    magnitude = number("m", int)  # timm: int(val)
    if magnitude > mmax:
        raise ConfigError(f"RandAugment magnitude must be an integer in [0, {mmax}], got "
                         f"m{values['m']} in {spec!r}")
    mstd = number("mstd") if "mstd" in values else 0.0
    if mstd > 100:
        mstd = math.inf  # timm: mstd > 100 means uniform sampling in [0, m]
    if values.get("inc", "0") not in ("0", "1"):
        raise ConfigError(f"malformed RandAugment option inc{values['inc']} in {spec!r}")
    prob = number("p") if "p" in values else 0.5
    if prob > 1:
        raise ConfigError(f"RandAugment op probability p must be in [0, 1] in {spec!r}")
    num_ops = number("n", int) if "n" in values else 2
    return RandAugmentSpec(magnitude, num_ops, mstd, values.get("inc") == "1", prob, mmax)


# -- per-image choices -------------------------------------------------------------------------

@dataclass
class RandAugmentPlan:
    """One batch's draws, arranged for batched application.

    For each op slot j the batch is gathered (`gather[j]`: positions in the previous
    arrangement) so that the images of each op group are contiguous; `groups[j]` lists
    (kind, start, end) of those runs, and value[j] / matrix[j] hold each position's op argument
    and warp matrix. `gather[-1]` puts the images back in loader order at the end.
    gather: int64 [num_ops + 1, B]; value: float64 [num_ops, B]; matrix: float64 [num_ops, B, 2, 3].
    draws: the raw per-image choices in loader order, CPU tensors [num_ops, B]: "op" (index
    into spec.ops), "applied" (bool), "magnitude" (after noise and clipping), "sign" (+-1).
    """
    gather: torch.Tensor
    value: torch.Tensor
    matrix: torch.Tensor
    groups: List[List[Tuple[str, int, int]]]
    draws: Optional[Dict[str, torch.Tensor]] = None

    def to(self, device: torch.device) -> "RandAugmentPlan":
        """Two copies from pinned memory that do not block the host (transfer.py)."""
        if device.type == "cpu":
            return self
        n, b = self.value.shape
        floats = torch.cat([self.value.view(n, b, 1), self.matrix.view(n, b, 6)], dim=2)
        floats = to_device(floats, device)
        gather = to_device(self.gather, device)
        return RandAugmentPlan(gather, floats[..., 0], floats[..., 1:].reshape(n, b, 2, 3),
                               self.groups, self.draws)


class BatchRandAugment:
    """`(uint8 images [B, 3, H, W], generator) -> uint8 images`, timm RandAugment semantics.

    fill: the warp fill colour, 3 uint8 values (timm/DeiT: round(255 * mean)).
    """

    def __init__(self, spec: RandAugmentSpec, fill: Sequence[int]):
        self.spec = spec
        self.names = spec.ops
        self.fill = torch.tensor([int(v) for v in fill], dtype=torch.uint8)
        # float32 copies of the fill per device, made by the first batch there (whatever ops it
        # draws) and reused: a per-op copy of the constant would block the host every batch
        self._fills: Dict[torch.device, torch.Tensor] = {}
        # kind of every op id, and the group order used in a slot (one call per kind)
        self._kinds = [_kind(name) for name in self.names]
        self._kind_order = list(dict.fromkeys(self._kinds))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        plan = self.sample(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, plan.to(images.device))

    def sample(self, batch: int, height: int, width: int,
               generator: torch.Generator) -> RandAugmentPlan:
        """Draw every choice for one batch on the CPU. Always the same number of draws per
        batch, so skipping k batches is k calls."""
        s = self.spec
        shape = (s.num_ops, batch)
        op = torch.randint(len(self.names), shape, generator=generator)
        applied = torch.rand(shape, generator=generator, dtype=torch.float64) < s.prob
        if math.isinf(s.magnitude_std):
            mag = torch.rand(shape, generator=generator, dtype=torch.float64) * s.magnitude
        else:
            noise = torch.randn(shape, generator=generator, dtype=torch.float64)
            mag = s.magnitude + s.magnitude_std * noise if s.magnitude_std > 0 else \
                torch.full(shape, float(s.magnitude), dtype=torch.float64)
        mag = mag.clamp(0.0, float(s.magnitude_max))
        negate = torch.rand(shape, generator=generator, dtype=torch.float64) > 0.5
        sign = torch.where(negate, -1.0, 1.0).to(torch.float64)

        value = torch.zeros(shape, dtype=torch.float64)
        matrix = torch.zeros(shape + (2, 3), dtype=torch.float64)
        for i, name in enumerate(self.names):
            sel = op == i
            if not sel.any():
                continue
            v, m = _level_to_arg(name, mag[sel], sign[sel], height, width)
            if v is not None:
                value[sel] = v
            if m is not None:
                matrix[sel] = m

        kind_of = torch.tensor([self._kind_order.index(k) for k in self._kinds])[op]
        kind_of = torch.where(applied, kind_of, len(self._kind_order))  # not applied: last
        order = torch.sort(kind_of, dim=1, stable=True)   # per slot: sample ids by group
        value = value.gather(1, order.indices)
        matrix = matrix.gather(1, order.indices.view(*shape, 1, 1).expand(*shape, 2, 3))
        # Compose the slot orders into gathers from the previous arrangement.
        gather = torch.empty(s.num_ops + 1, batch, dtype=torch.int64)
        where = torch.arange(batch)            # where[sample] = its current position
        for j in range(s.num_ops):
            gather[j] = where[order.indices[j]]
            where = torch.empty_like(where)
            where[order.indices[j]] = torch.arange(batch)
        gather[-1] = where                     # back to loader order
        groups = []
        for j in range(s.num_ops):
            counts = torch.bincount(order.values[j], minlength=len(self._kind_order) + 1).tolist()
            slot, start = [], 0
            for kind, count in zip(self._kind_order, counts):
                if count:
                    slot.append((kind, start, start + count))
                start += count
            groups.append(slot)
        draws = dict(op=op, applied=applied, magnitude=mag, sign=sign)
        return RandAugmentPlan(gather, value, matrix, groups, draws)

    def apply(self, images: torch.Tensor, plan: RandAugmentPlan) -> torch.Tensor:
        """Apply a plan to uint8 images [B, 3, H, W] (on plan's device); returns new images in
        channels-last memory. Works on the NHWC buffer: each slot is one gather that makes
        every op group a contiguous run of images, so each op reads and writes a plain slice
        (scattered index_copy_ into strided memory is several times slower on the CPU)."""
        fill = self._fill_on(images.device)
        x = images.permute(0, 2, 3, 1)          # NHWC view; a no-op for channels-last input
        for j, slot in enumerate(plan.groups):
            x = x.index_select(0, plan.gather[j])
            for kind, start, end in slot:
                sub = x[start:end].permute(0, 3, 1, 2)     # [k, 3, H, W], channels-last
                if kind == "affine":
                    out = imageops.affine(sub, plan.matrix[j, start:end], fill)
                elif kind == "shift_x":   # matrix [[1, shear, shift], [0, 1, 0]]
                    m = plan.matrix[j, start:end]
                    out = imageops.shift_rows(sub, 3, m[:, 0, 1], m[:, 0, 2], fill)
                elif kind == "shift_y":   # matrix [[1, 0, 0], [shear, 1, shift]]
                    m = plan.matrix[j, start:end]
                    out = imageops.shift_rows(sub, 2, m[:, 1, 0], m[:, 1, 2], fill)
                elif kind in _NO_ARG:
                    out = getattr(imageops, kind)(sub)
                else:
                    out = getattr(imageops, kind)(sub, plan.value[j, start:end])
                x[start:end] = out.permute(0, 2, 3, 1)
        x = x.index_select(0, plan.gather[-1])
        return x.permute(0, 3, 1, 2)

    def _fill_on(self, device: torch.device) -> torch.Tensor:
        fill = self._fills.get(device)
        if fill is None:
            fill = self._fills[device] = to_device(self.fill.to(torch.float32), device)
        return fill


_NO_ARG = ("autocontrast", "equalize", "invert")


def _kind(name: str) -> str:
    """timm op name -> the imageops call that implements it: warps along one axis (shear,
    translate) share a 4-tap path with PIL's exact kernel, rotation is a general affine."""
    if name in ("ShearX", "TranslateXRel"):
        return "shift_x"
    if name in ("ShearY", "TranslateYRel"):
        return "shift_y"
    if name == "Rotate":
        return "affine"
    base = name[: -len("Increasing")] if name.endswith("Increasing") else name
    return {"AutoContrast": "autocontrast", "Equalize": "equalize", "Invert": "invert",
            "Posterize": "posterize", "Solarize": "solarize", "SolarizeAdd": "solarize_add",
            "Color": "color", "Contrast": "contrast", "Brightness": "brightness",
            "Sharpness": "sharpness"}[base]


def _level_to_arg(name: str, m: torch.Tensor, sign: torch.Tensor, height: int, width: int
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """timm's LEVEL_TO_ARG for a vector of magnitudes (float64, the same operation order as
    timm's Python floats, so int() truncations land on the same integers).
    Returns (op argument [k] or None, warp matrix [k, 2, 3] or None)."""
    level = m / TIMM_MAX_MAGNITUDE
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None, None
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1, None
    if name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize")):
        return torch.clamp(1.0 + sign * (level * 0.9), min=0.1), None
    if name == "Posterize":
        return torch.floor(level * 4), None
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(level * 4), None
    if name == "Solarize":
        return torch.clamp(torch.floor(level * 256), max=256), None
    if name == "SolarizeIncreasing":
        return 256 - torch.clamp(torch.floor(level * 256), max=256), None
    if name == "SolarizeAdd":
        return torch.clamp(torch.floor(level * 110), max=128), None
    k = m.shape[0]
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64).repeat(k, 1, 1)
    if name == "Rotate":
        return None, _rotation(level * 30.0 * sign, height, width)
    if name == "ShearX":
        eye[:, 0, 1] = level * 0.3 * sign
    elif name == "ShearY":
        eye[:, 1, 0] = level * 0.3 * sign
    elif name == "TranslateXRel":
        eye[:, 0, 2] = level * _TRANSLATE_PCT * sign * width
    elif name == "TranslateYRel":
        eye[:, 1, 2] = level * _TRANSLATE_PCT * sign * height
    else:
        raise KeyError(name)
    return None, eye


def _rotation(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's Image.rotate matrix (counter-clockwise about the centre, output -> input)."""
    angle = -torch.deg2rad(degrees)
    cos = torch.round(torch.cos(angle), decimals=15)
    sin = torch.round(torch.sin(angle), decimals=15)
    cx, cy = width / 2.0, height / 2.0
    out = torch.empty(degrees.shape[0], 2, 3, dtype=torch.float64)
    out[:, 0, 0], out[:, 0, 1] = cos, sin
    out[:, 1, 0], out[:, 1, 1] = -sin, cos
    out[:, 0, 2] = cx - cos * cx - sin * cy
    out[:, 1, 2] = cy + sin * cx - cos * cy
    return out
