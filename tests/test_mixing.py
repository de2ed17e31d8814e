"""Batch mixing: smoothed targets by hand, Mixup/CutMix targets against timm's own maths."""
import numpy as np
import pytest
import torch

from fastdeit.data.mixing import BatchMixer, MixingConfig


def test_no_mixing_gives_smoothed_one_hot():
    mixer = BatchMixer(MixingConfig(prob=0.0, erase_prob=0.0, label_smoothing=0.1), 10, torch.device("cpu"))
    x = torch.randn(4, 3, 8, 8)
    out, t = mixer(x.clone(), torch.tensor([0, 3, 9, 3]))
    torch.testing.assert_close(out, x)
    assert t.shape == (4, 10)
    assert t[1, 3].item() == pytest.approx(0.9 + 0.01) and t[1, 0].item() == pytest.approx(0.01)


def test_mixup_targets_are_convex_and_consistent():
    np.random.seed(0)
    mixer = BatchMixer(MixingConfig(mixup_alpha=0.8, cutmix_alpha=0.0, erase_prob=0.0), 5, torch.device("cpu"))
    x = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    out, t = mixer(x.clone(), labels)
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    # batch mode mixes sample i with sample B-1-i by one lambda: recover it from the pixels
    lam = ((out[0] - x[3]) / (x[0] - x[3])).median().item()
    torch.testing.assert_close(out, x * lam + x.flip(0) * (1 - lam), rtol=1e-4, atol=1e-4)
    on, off = 0.9 + 0.1 / 5, 0.1 / 5
    assert t[0, 0].item() == pytest.approx(lam * on + (1 - lam) * off, abs=1e-5)


def test_erasing_changes_some_pixels_only():
    torch.manual_seed(0)
    import random
    random.seed(0)
    mixer = BatchMixer(MixingConfig(prob=0.0, erase_prob=1.0), 3, torch.device("cpu"))
    x = torch.zeros(2, 3, 32, 32)
    out, _ = mixer(x.clone(), torch.tensor([0, 1]))
    changed = (out != 0).float().mean().item()
    assert 0.0 < changed < 1.0


def test_odd_micro_batch_rejected_when_mixing():
    with pytest.raises(ValueError, match="must be even"):
        BatchMixer(MixingConfig(), 10, torch.device("cpu")).check_batch_size(33)
