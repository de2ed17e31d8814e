"""Which sample indices each rank reads in an epoch (pure numpy; DALI only sees the result).

Both orders are functions of (seed, epoch, rank, world) alone, never of earlier epochs or of
process state, so a run resumed at an epoch boundary reads exactly the same indices.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import ConfigError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(num_samples) shared by every rank for `epoch`.

    Seeded by (seed, epoch) only, never by rank: all ranks must agree on it to shard disjointly.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(num_samples)


def effective_repeats(repeats: int, world_size: int, single_process: bool = False) -> int:
    """The repeat count the sampler uses: the reference applies RASampler only when
    distributed, so one process reads a plain permutation unless `single_process` forces it."""
    if repeats < 1:
        raise ConfigError(f"data.repeated_aug must be >= 1, got {repeats}")
    return repeats if (world_size > 1 or single_process) else 1


def train_samples_per_rank(num_samples: int, world_size: int, repeats: int) -> int:
    """Samples a rank reads per train epoch (before dropping the last partial batch).

    Repeated augmentation (repeats > 1) follows the reference DeiT RASampler:
    floor(N // 256 * 256 / world), so an epoch is as long as a plain one. For N < 256 that rule
    gives 0, so small (test/debug) sets fall back to ceil(N / world): as many reads as a padded
    DistributedSampler, so an epoch stays N images long whatever the set size.
    Without repeats it is ceil(N / world) (indices padded to a multiple of world).
    """
    if repeats > 1 and num_samples >= 256:
        return int(math.floor(num_samples // 256 * 256 / world_size))
    return math.ceil(num_samples / world_size)


def train_indices(num_samples: int, rank: int, world_size: int, seed: int, epoch: int,
                  repeats: int = 1) -> np.ndarray:
    """Indices rank `rank` reads, in order, for train epoch `epoch`.

    repeats > 1 (docs/DESIGN.md "repeated augmentation"): one permutation, each index repeated
    `repeats` times back to back, padded by wrapping to a multiple of world, rank r takes
    [r::world] and keeps the first train_samples_per_rank(). Consecutive copies go to
    consecutive ranks, so with world >= repeats every copy of an image is augmented on a
    different rank. Whether to repeat on one process is the caller's policy
    (effective_repeats(): off unless forced, like the reference).

    Otherwise: the permutation padded by wrapping to a multiple of world, rank r takes [r::world]
    (DistributedSampler semantics), so ranks are disjoint up to the <= world-1 padded indices.
    """
    _check_rank(rank, world_size)
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    perm = epoch_permutation(num_samples, seed, epoch)
    if repeats > 1:
        perm = np.repeat(perm, repeats)
    total = math.ceil(len(perm) / world_size) * world_size
    perm = np.resize(perm, total)  # np.resize wraps around: pads with the leading indices
    keep = train_samples_per_rank(num_samples, world_size, repeats)
    return perm[rank:total:world_size][:keep]


def val_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Indices rank `rank` evaluates: [rank::world], no shuffle, no padding.

    Every sample is evaluated exactly once over all ranks, so metrics summed across ranks are
    exact; ranks may differ by one sample (and so by one batch).
    """
    _check_rank(rank, world_size)
    return np.arange(rank, num_samples, world_size)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
