"""The training resolution as a pure function of the epoch (`data.size_schedule`).

Low- and progressive-resolution training spend fewer FLOPs per image where that costs no
accuracy: a ViT step at 160 px has 100 patch tokens instead of 196. FFCV's ImageNet recipes ramp
the training resolution linearly over the middle of training and evaluate at full size; DeiT III
(Touvron et al. 2022, "Revenge of the ViT") trains ViT-B at 192 px and finishes at 224.

`data.size_schedule` is a list of `[epoch, size]` milestones (0-based epochs, strictly
increasing). The size of epoch e is:

  * at or before the first milestone: the first size; at or after the last: the last size;
  * between two milestones: linear interpolation, then rounded to a multiple of
    `data.size_multiple` as `data.size_rounding` says.

`data.size_rounding: nearest` (the default) is FFCV's rule, ffcv-imagenet `train_imagenet.py`
`get_resolution`: `int(np.round(np.interp(epoch, [start_ramp, end_ramp], [min_res, max_res])
/ 32)) * 32` between the milestones (nearest multiple, ties to even as np.round does; the same
float computation, so ties land where FFCV's do), and the milestone sizes as written outside
them, which is why they must be multiples of `data.size_multiple` here (a ConfigError
otherwise, rather than an epoch at a size the model's patch grid does not divide). An FFCV
`resolution:` section is the schedule `[[start_ramp, min_res], [end_ramp, max_res]]` and gives
FFCV's sizes epoch by epoch (tests/test_size_schedule.py checks it against FFCV's formula). Its
rn50 configs (min_res 160, max_res 192; FFCV evaluates at `validation.resolution` 256 with a
224/256 centre crop: data.img_size 256, data.eval_crop_pct 0.875):

    rn50_16_epochs  [[11, 160], [13, 192]]   160 px epochs 0-11, 192 px from 12
    rn50_24_epochs  [[17, 160], [20, 192]]   160 px epochs 0-18, 192 px from 19
    rn50_32_epochs  [[23, 160], [27, 192]]   160 px epochs 0-24, 192 px from 25
    rn50_40_epochs  [[29, 160], [34, 192]]   160 px epochs 0-31, 192 px from 32
    rn50_56_epochs  [[41, 160], [48, 192]]   160 px epochs 0-44, 192 px from 45
    rn50_88_epochs  [[65, 160], [76, 192]]   160 px epochs 0-70, 192 px from 71

(epochs 0-based, as FFCV counts them). `data.size_rounding: floor` rounds every size, the
milestones' included, down to the multiple (never below one multiple): fastdeit's rule before
FFCV's was adopted, kept for runs that started with it.

So `[[10, 160], [250, 224]]` ramps 160 -> 224 px over epochs 10..250 (192 px from epoch 130,
224 px from epoch 250 with nearest rounding) and `[[279, 192], [280, 224]]` is a DeiT III-style
step (192 px, then 224 px for the last 20 of 300 epochs). No schedule: every epoch at
`data.img_size`.

Rounding: a ViT needs a multiple of its patch size (else the patch embedding drops the border);
the default multiple is twice the patch size (32 for /16 models), which also keeps the number
of distinct sizes, hence of compiled graphs and DALI resize shapes, small. The data section does
not see the model, so the composition root (build.py) derives the default from the student
(`fastdeit.models.size_multiple`) and passes it in. Convnets without a patch size get 32, their
usual total stride.

Because the size depends on the epoch alone, a run resumed at any step (even mid-epoch, at
another size than the one it stopped at) reads the same batches as an uninterrupted one.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from fastdeit.errors import ConfigError

from ..config import DataConfig

DEFAULT_MULTIPLE = 32   # convnets' usual total stride; ViTs: 2 x patch (models.size_multiple)
ROUNDINGS = ("nearest", "floor")


class SizeSchedule:
    """`schedule(epoch) -> training image side in pixels`; see the module docstring."""

    def __init__(self, milestones: Optional[Sequence[Tuple[int, int]]], default: int, multiple: int,
                 where: str = "data.size_schedule", rounding: str = "nearest"):
        if multiple < 1:
            raise ConfigError(f"data.size_multiple must be a positive integer, got {multiple}")
        if rounding not in ROUNDINGS:
            raise ConfigError(f"data.size_rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
        self.default = default
        self.multiple = multiple
        self.rounding = rounding
        self.milestones: List[Tuple[int, int]] = []
        if milestones is None:
            return
        if len(milestones) == 0:
            raise ConfigError(f"{where} is empty: give [[epoch, size], ...] or null for the fixed "
                             f"data.img_size")
        previous = None
        for i, item in enumerate(milestones):
            if len(item) != 2:
                raise ConfigError(f"{where}[{i}] must be [epoch, size], got {list(item)!r}")
            epoch, size = int(item[0]), int(item[1])
            if epoch < 0:
                raise ConfigError(f"{where}[{i}]: epoch {epoch} is negative (epochs count from 0)")
            if size < multiple:
                raise ConfigError(f"{where}[{i}]: size {size} is below data.size_multiple={multiple}")
            if rounding == "nearest" and size % multiple:
                raise ConfigError(f"{where}[{i}]: size {size} is not a multiple of data.size_multiple="
                                  f"{multiple}; with data.size_rounding: nearest (FFCV's rule) milestone "
                                  f"sizes are used as written: give multiples, or data.size_rounding: floor")
            if previous is not None and epoch <= previous:
                raise ConfigError(f"{where}: epochs must increase strictly, got {previous} then {epoch} "
                                 f"at [{i}]")
            previous = epoch
            self.milestones.append((epoch, size))

    @property
    def fixed(self) -> bool:
        """True when every epoch trains at `data.img_size` (no schedule)."""
        return not self.milestones

    def _round(self, size: float) -> int:
        return max(self.multiple, int(size) // self.multiple * self.multiple)

    def _milestone(self, size: int) -> int:
        # nearest (FFCV): as written (validated to be a multiple); floor: rounded down
        return size if self.rounding == "nearest" else self._round(size)

    def __call__(self, epoch: int) -> int:
        if not self.milestones:
            return self.default
        (e0, s0), (e1, s1) = self.milestones[0], self.milestones[-1]
        if epoch <= e0:
            return self._milestone(s0)
        if epoch >= e1:
            return self._milestone(s1)
        for (a, sa), (b, sb) in zip(self.milestones, self.milestones[1:]):
            if a <= epoch < b:
                if self.rounding == "nearest":
                    # FFCV's get_resolution, float for float (np.interp, np.round: ties to even),
                    # so an FFCV config gives FFCV's size at every epoch, ties included.
                    interp = np.interp([epoch], [a, b], [sa, sb])[0]
                    return max(self.multiple, int(np.round(interp / self.multiple)) * self.multiple)
                # Integer arithmetic for the interpolation: no float rounding can move a size
                # across a multiple boundary (sa + (sb - sa) * t exactly, then floor).
                return self._round((sa * (b - a) + (sb - sa) * (epoch - a)) // (b - a))
        raise AssertionError("unreachable: the milestones cover every epoch")

    def sizes(self, epochs: int) -> List[int]:
        """The distinct sizes of epochs 0 .. epochs - 1, in first-use order."""
        return list(dict.fromkeys(self(e) for e in range(max(epochs, 1))))

    def describe(self, epochs: int) -> str:
        """One line for the log: the size runs over the epochs, e.g. '160 px x 130 epochs, ...'."""
        if not self.milestones:
            return f"fixed {self.default} px"
        runs: List[List[int]] = []
        for e in range(max(epochs, 1)):
            size = self(e)
            if runs and runs[-1][0] == size:
                runs[-1][2] = e
            else:
                runs.append([size, e, e])
        parts = [f"{s} px (epochs {a + 1}-{b + 1})" if b > a else f"{s} px (epoch {a + 1})" for s, a, b in runs]
        return ", ".join(parts) + f"; multiple {self.multiple}, rounding {self.rounding}"


def size_schedule(cfg: DataConfig, model_multiple: Optional[int] = None) -> SizeSchedule:
    """The schedule of `cfg`: `data.size_multiple` if set, else the model's (`model_multiple`,
    from `fastdeit.models.size_multiple`), else 32; rounded as `data.size_rounding` says."""
    multiple = cfg.size_multiple or model_multiple or DEFAULT_MULTIPLE
    return SizeSchedule(cfg.size_schedule, cfg.img_size, multiple, rounding=cfg.size_rounding)
