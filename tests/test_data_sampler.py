"""Index-level tests of the epoch sampler (no DALI)."""
import math

import numpy as np
import pytest

from fastdeit.data.loading.sampler import (effective_repeats, epoch_permutation, train_indices,
                                   train_samples_per_rank, val_indices)


def reference_ra(n, rank, world, seed, epoch, repeats):
    """The reference RASampler written out literally, on our shared permutation."""
    perm = epoch_permutation(n, seed, epoch).tolist()
    idx = [i for i in perm for _ in range(repeats)]
    total = int(math.ceil(n * repeats / world)) * world
    idx += idx[: total - len(idx)]
    keep = int(math.floor(n // 256 * 256 / world))
    return idx[rank:total:world][:keep]


def test_permutation_depends_on_seed_and_epoch_only():
    a = epoch_permutation(100, seed=1, epoch=3)
    assert np.array_equal(a, epoch_permutation(100, seed=1, epoch=3))
    assert sorted(a) == list(range(100))
    assert not np.array_equal(a, epoch_permutation(100, seed=1, epoch=4))
    assert not np.array_equal(a, epoch_permutation(100, seed=2, epoch=3))


@pytest.mark.parametrize("n,world,repeats", [(1000, 4, 3), (300, 3, 3), (2000, 8, 3), (777, 2, 3),
                                             (1024, 5, 2)])
def test_repeated_aug_matches_reference(n, world, repeats):
    for rank in range(world):
        ours = train_indices(n, rank, world, seed=7, epoch=2, repeats=repeats).tolist()
        assert ours == reference_ra(n, rank, world, 7, 2, repeats)
        assert len(ours) == n // 256 * 256 // world


@pytest.mark.parametrize("world", [3, 4, 8])
def test_repeated_copies_land_on_different_ranks(world):
    n = 1024
    per_rank = [train_indices(n, r, world, 0, 0, repeats=3) for r in range(world)]
    for idx in per_rank:
        assert len(set(idx.tolist())) == len(idx)  # no rank sees an image twice
    seen = np.concatenate(per_rank)
    # ~1/3 unique images per epoch, each repeated (the RA trade-off: same epoch length)
    assert len(np.unique(seen)) < 0.5 * n
    counts = np.bincount(seen, minlength=n)
    assert counts.max() <= 3


def test_repeated_aug_small_dataset_rule():
    # N < 256: the reference rule would give 0; we keep ceil(N / world) per rank.
    for rank in range(4):
        assert len(train_indices(100, rank, 4, 0, 0, repeats=3)) == 25
    assert train_samples_per_rank(101, 4, 3) == 26


def test_repeated_aug_off_on_one_process_unless_forced():
    # the reference uses RASampler only when distributed; our switch forces it on one process
    assert effective_repeats(3, world_size=1) == 1
    assert effective_repeats(3, world_size=1, single_process=True) == 3
    assert effective_repeats(3, world_size=2) == 3 and effective_repeats(1, world_size=8) == 1
    with pytest.raises(ValueError):
        effective_repeats(0, 1)
    plain = train_indices(500, 0, 1, seed=3, epoch=1, repeats=effective_repeats(3, 1))
    assert np.array_equal(plain, epoch_permutation(500, 3, 1))
    # forced on one process: the reference sampler with num_replicas=1, copies back to back
    forced = train_indices(500, 0, 1, seed=3, epoch=1, repeats=3).tolist()
    assert forced == reference_ra(500, 0, 1, 3, 1, 3) and len(forced) == 256
    assert forced[0] == forced[1] == forced[2] != forced[3]


@pytest.mark.parametrize("n,world", [(100, 4), (101, 4), (7, 3)])
def test_plain_sharding_disjoint_and_covering(n, world):
    shards = [train_indices(n, r, world, 5, 0, repeats=1) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same count -> same batch count on every rank
    allidx = np.concatenate(shards)
    assert set(allidx.tolist()) == set(range(n))
    assert len(allidx) - len(set(allidx.tolist())) == (-n) % world  # only the wrap padding repeats


def test_val_indices_each_sample_once():
    shards = [val_indices(10, r, 3) for r in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]


def test_bad_rank():
    with pytest.raises(ValueError):
        train_indices(10, 2, 2, 0, 0)
