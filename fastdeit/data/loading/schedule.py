"""The training resolution as a pure function of the epoch (`data.size_schedule`).

Low- and progressive-resolution training spend fewer FLOPs per image where that costs no
accuracy: a ViT step at 160 px has 100 patch tokens instead of 196. FFCV's ImageNet recipes ramp
the training resolution linearly over the middle of training and evaluate at full size; DeiT III
(Touvron et al. 2022, "Revenge of the ViT") trains ViT-B at 192 px and finishes at 224.

`data.size_schedule` is a list of `[epoch, size]` milestones (0-based epochs, strictly
increasing). The size of epoch e is:

  * before the first milestone: the first size; after the last: the last size;
  * between two milestones: linear interpolation, then rounded *down* to a multiple of
    `data.size_multiple` (never below one multiple).

So `[[10, 160], [250, 224]]` is an FFCV-style ramp (160 px until epoch 10, 224 px from epoch
250) and `[[279, 192], [280, 224]]` a DeiT III-style step (192 px, then 224 px for the last 20
of 300 epochs). No schedule: every epoch at `data.img_size`.

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

from fastdeit.errors import ConfigError

from ..config import DataConfig

DEFAULT_MULTIPLE = 32   # convnets' usual total stride; ViTs: 2 x patch (models.size_multiple)


class SizeSchedule:
    """`schedule(epoch) -> training image side in pixels`; see the module docstring."""

    def __init__(self, milestones: Optional[Sequence[Tuple[int, int]]], default: int, multiple: int,
                 where: str = "data.size_schedule"):
        if multiple < 1:
            raise ConfigError(f"data.size_multiple must be a positive integer, got {multiple}")
        self.default = default
        self.multiple = multiple
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

    def __call__(self, epoch: int) -> int:
        if not self.milestones:
            return self.default
        (e0, s0), (e1, s1) = self.milestones[0], self.milestones[-1]
        if epoch <= e0:
            return self._round(s0)
        if epoch >= e1:
            return self._round(s1)
        for (a, sa), (b, sb) in zip(self.milestones, self.milestones[1:]):
            if a <= epoch < b:
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
        return ", ".join(parts) + f"; multiple {self.multiple}"


def size_schedule(cfg: DataConfig, model_multiple: Optional[int] = None) -> SizeSchedule:
    """The schedule of `cfg`: `data.size_multiple` if set, else the model's (`model_multiple`,
    from `fastdeit.models.size_multiple`), else 32."""
    multiple = cfg.size_multiple or model_multiple or DEFAULT_MULTIPLE
    return SizeSchedule(cfg.size_schedule, cfg.img_size, multiple)
