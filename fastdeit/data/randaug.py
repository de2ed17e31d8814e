"""timm-style RandAugment spec ("rand-m9-mstd0.5-inc1") -> arguments for DALI's rand_augment.

Known differences from timm's RandAugment that DALI cannot express (follow-up issues):
  * magnitude noise: timm draws each op's magnitude from N(m, mstd) per call; DALI uses the
    fixed bin m. `mstd` is parsed and kept but not applied.
  * op set: DALI's suite has `identity` and lacks timm's `invert` and `solarize_add`, and DALI
    applies both sampled ops always where timm applies each with probability 0.5.
  * warp fill is a single grey level (128) instead of the per-channel mean pixel, and warps
    interpolate bilinearly (timm: bicubic/random for PIL).
"""
from __future__ import annotations

from dataclasses import dataclass

# timm expresses magnitudes on a 0..10 scale (_LEVEL_DENOM = 10). With 11 DALI bins, bin m is
# the same fraction m/10 of each op's maximum strength as timm's level m.
TIMM_MAX_MAGNITUDE = 10
DALI_MAGNITUDE_BINS = TIMM_MAX_MAGNITUDE + 1


@dataclass(frozen=True)
class RandAugmentSpec:
    magnitude: int              # m: bin in [0, 10]
    num_ops: int = 2            # n: ops applied per image
    magnitude_std: float = 0.0  # mstd: parsed, NOT applied by DALI (see module docstring)
    increasing: bool = False    # inc1: strength grows with m for every op (DALI monotonic_mag)


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """Parse `rand-m{M}[-n{N}][-mstd{S}][-inc{0|1}]`; raise ValueError for anything else.

    Options timm accepts but we cannot honour in DALI (`mmax`, `w` op weights, `p` op
    probability, `t` op subsets) are rejected rather than silently ignored.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec must start with 'rand-': {spec!r}")

    def malformed(part: str) -> ValueError:
        return ValueError(f"malformed RandAugment option {part!r} in {spec!r}")

    def number(part: str, text: str, kind=float):
        try:
            return kind(text)
        except ValueError:
            raise malformed(part) from None

    magnitude = None
    num_ops = 2
    mstd = 0.0
    increasing = False
    for part in parts[1:]:
        if part.startswith("mstd"):
            mstd = number(part, part[4:])
            if not mstd >= 0:
                raise malformed(part)
        elif part.startswith("inc"):
            if part[3:] not in ("0", "1"):
                raise malformed(part)
            increasing = part[3:] == "1"
        elif part.startswith("m") and not part.startswith("mmax"):
            value = number(part, part[1:])
            if value != int(value) or not 0 <= value <= TIMM_MAX_MAGNITUDE:
                raise ValueError(
                    f"RandAugment magnitude must be an integer in [0, {TIMM_MAX_MAGNITUDE}] "
                    f"(DALI uses discrete bins), got {part!r} in {spec!r}")
            magnitude = int(value)
        elif part.startswith("n"):
            num_ops = number(part, part[1:], int)
            if num_ops < 0:
                raise malformed(part)
        else:
            raise ValueError(f"RandAugment option {part!r} is not supported by the DALI "
                             f"pipeline (spec {spec!r})")
    if magnitude is None:
        raise ValueError(f"RandAugment spec needs a magnitude 'm<int>': {spec!r}")
    return RandAugmentSpec(magnitude, num_ops, mstd, increasing)
