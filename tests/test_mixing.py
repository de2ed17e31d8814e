"""Batch mixing: smoothed targets by hand, Mixup/CutMix targets against timm's own maths."""
import numpy as np
import pytest
import torch

from fastdeit.data.augment.mixing import BatchMixer, MixingConfig


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


def _timm_mixup(cfg, num_classes):
    from timm.data import Mixup
    return Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.prob,
                 switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixing_matches_timm_mixup(alphas):
    """Same numpy seed, same lambda and box: our single-write mixing equals timm's in-place
    Mixup/CutMix (images to float rounding, targets exactly), for several batches."""
    cfg = MixingConfig(mixup_alpha=alphas[0], cutmix_alpha=alphas[1], erase_prob=0.0)
    ours, ref = BatchMixer(cfg, 7, torch.device("cpu")), _timm_mixup(cfg, 7)
    torch.manual_seed(0)
    for seed in range(6):
        x = torch.randn(6, 3, 16, 20).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 7, (6,))
        np.random.seed(seed)
        out, t = ours(x.clone(), y)
        np.random.seed(seed)
        ref_x, ref_t = ref(x.clone(), y)
        torch.testing.assert_close(out, ref_x, rtol=1e-6, atol=1e-6)
        assert torch.equal(t, ref_t)
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_output_dtype_and_layout(prob):
    """The mixer emits the engine's dtype in channels-last memory (the trainer's cast is then
    a no-op); targets stay float32."""
    cfg = MixingConfig(prob=prob, erase_prob=0.5)
    x = torch.randn(8, 3, 12, 12)                       # any input layout
    y = torch.randint(0, 5, (8,))
    np.random.seed(1)
    out, t = BatchMixer(cfg, 5, torch.device("cpu"), dtype=torch.bfloat16)(x.clone(), y)
    assert out.dtype == torch.bfloat16 and t.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    np.random.seed(1)
    keep = x.contiguous(memory_format=torch.channels_last)
    out32, _ = BatchMixer(cfg, 5, torch.device("cpu"))(keep, y)
    assert out32.dtype == torch.float32
    if prob == 0.0:
        assert out32 is keep  # nothing to mix, already float32 channels-last: no copy


def _boxes(images):
    """(h, w, centre y, centre x) of the erased rectangle of each image, None if untouched."""
    out = []
    for img in images:
        hit = (img != 0).any(0)
        if not hit.any():
            out.append(None)
            continue
        rows, cols = hit.any(1).nonzero().flatten(), hit.any(0).nonzero().flatten()
        assert hit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one solid rectangle
        out.append((len(rows), len(cols), (rows[0] + rows[-1]).item() / 2,
                    (cols[0] + cols[-1]).item() / 2))
    return out


def test_batched_erasing_matches_timm_statistics():
    """Batched random erasing vs timm's per-image RandomErasing on 3000 zero images each:
    probability, box size/aspect distribution, position, and N(0, 1) pixel noise."""
    import random
    from timm.data.random_erasing import RandomErasing
    from fastdeit.data.augment.mixing import BatchRandomErasing

    n, h, w = 3000, 24, 32
    torch.manual_seed(0)
    random.seed(0)
    ours = BatchRandomErasing(0.25, mode="pixel")(torch.zeros(n, 3, h, w))
    ref = RandomErasing(0.25, mode="pixel", device="cpu")(torch.zeros(n, 3, h, w))
    a = [b for b in _boxes(ours) if b is not None]
    r = [b for b in _boxes(ref) if b is not None]
    assert abs(len(a) / n - 0.25) < 0.025 and abs(len(r) / n - 0.25) < 0.025
    a, r = np.array(a), np.array(r)
    for k in range(4):  # h, w, centre y, centre x
        assert abs(a[:, k].mean() - r[:, k].mean()) < 0.6, k
        assert abs(a[:, k].std() - r[:, k].std()) < 0.6, k
    area = lambda b: b[:, 0] * b[:, 1] / (h * w)  # noqa: E731
    assert abs(area(a).mean() - area(r).mean()) < 0.01
    assert a[:, 0].max() < h and a[:, 1].max() < w
    noise = ours[ours != 0]
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02


def test_erasing_modes_and_layouts():
    from fastdeit.data.augment.mixing import BatchRandomErasing

    torch.manual_seed(1)
    x = torch.zeros(64, 3, 16, 16)
    const = BatchRandomErasing(1.0, mode="const")(torch.full_like(x, 5.0))
    assert ((const == 0) | (const == 5)).all() and (const == 0).any()
    rand = BatchRandomErasing(1.0, mode="rand")(x.clone())
    for img in rand:  # one colour per box and channel
        for ch in img:
            assert len(ch[ch != 0].unique()) <= 1
    cl = BatchRandomErasing(1.0, mode="pixel", max_count=3)(
        x.clone().contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last) and (cl != 0).any()
    with pytest.raises(ValueError):
        BatchRandomErasing(0.5, mode="blur")
