"""3-Augment (threeaug.py) against the DeiT III reference's PIL version on the same images.

The reference (facebookresearch/deit augment.py) is written out here with PIL and torchvision
as it defines it: RandomChoice([Grayscale(3), ImageOps.solarize, ImageFilter.GaussianBlur(
radius ~ U(0.1, 2))]) then ColorJitter(0.3, 0.3, 0.3). Each image is replayed through it with
the batch plan's draws (choice, radius, jitter factors and order): the outputs must be equal.
"""
import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from fastdeit.data import DataConfig, build_loader
from fastdeit.data.loading.schedule import SizeSchedule
from fastdeit.data.augment.threeaug import CHOICES, ThreeAugment, box_blur_weights, gaussian_blur

CPU = torch.device("cpu")


def images(n, h=33, w=47, seed=0):
    """Smooth structure plus noise (blur, grayscale and the enhancements all change them)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 5, generator=g) * 255
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    x = (x + 40 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 255).to(torch.uint8)
    return x.contiguous(memory_format=torch.channels_last)


def pil(x):
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())


def reference_choice(img, choice, radius):
    """The reference's three secondary transforms (gray_scale, Solarization, GaussianBlur)."""
    if CHOICES[choice] == "grayscale":
        return T.Grayscale(3)(img)
    if CHOICES[choice] == "solarize":
        return ImageOps.solarize(img)
    return img.filter(ImageFilter.GaussianBlur(radius=radius))


def reference_jitter(img, factors, order):
    """torchvision ColorJitter's forward with given factors and op order (fn ids 0, 1, 2)."""
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for op in order:
        img = fns[op](img, float(factors[op]))
    return img


@pytest.mark.parametrize("h, w", [(33, 47), (1, 9), (7, 2), (64, 64)])
def test_blur_is_pillows_gaussian_blur(h, w):
    radii = torch.tensor([0.1, 0.37, 0.9, 1.3, 1.71, 2.0], dtype=torch.float64)
    x = images(len(radii), h, w, seed=h * w)
    got = gaussian_blur(x, box_blur_weights(radii))
    for i, r in enumerate(radii.tolist()):
        ref = np.asarray(pil(x[i]).filter(ImageFilter.GaussianBlur(radius=r)))
        assert np.array_equal(got[i].permute(1, 2, 0).numpy(), ref), (h, w, r)


def test_blur_is_pillows_at_the_extremes():
    """All 255, and 0/255 stripes and checks: the largest sums the int32 halves of the
    fixed-point arithmetic must hold, and the steepest edges."""
    radii = torch.tensor([0.1, 0.5, 0.99, 1.0, 1.5, 2.0], dtype=torch.float64)
    n = len(radii)
    yy, xx = torch.meshgrid(torch.arange(12), torch.arange(15), indexing="ij")
    for pattern in (torch.ones(12, 15), (xx % 2).float(), ((xx + yy) % 2).float(), (yy % 3 == 0).float()):
        x = (pattern * 255).to(torch.uint8).expand(n, 3, 12, 15).contiguous(memory_format=torch.channels_last)
        got = gaussian_blur(x, box_blur_weights(radii))
        for i, r in enumerate(radii.tolist()):
            ref = np.asarray(pil(x[i]).filter(ImageFilter.GaussianBlur(radius=r)))
            assert np.array_equal(got[i].permute(1, 2, 0).numpy(), ref), r


@pytest.mark.parametrize("jitter", [0.3, 0.0])
def test_batch_equals_the_reference_pil_transform(jitter):
    """A whole batch, grouped and batched, equals the reference applied image by image."""
    x = images(48)
    aug = ThreeAugment(jitter)
    plan = aug.sample(48, 33, 47, torch.Generator().manual_seed(3))
    got = aug.apply(x.clone(), plan)
    assert got.shape == x.shape and got.dtype == torch.uint8
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert set(plan.choice.tolist()) == {0, 1, 2}
    for i in range(48):
        ref = reference_choice(pil(x[i]), int(plan.choice[i]), float(plan.radius[i]))
        if jitter:
            ref = reference_jitter(ref, plan.factor[:, i], plan.order[:, i].tolist())
        assert np.array_equal(got[i].permute(1, 2, 0).numpy(), np.asarray(ref)), (i, plan.choice[i])


def test_draws_have_the_reference_distribution():
    """Choice uniform over 3 (RandomChoice), radius U(0.1, 2), factors U(0.7, 1.3), the six
    jitter orders equally likely (ColorJitter's randperm): 60000 draws, tolerances ~5 sigma."""
    n = 60000
    plan = ThreeAugment(0.3).sample(n, 8, 8, torch.Generator().manual_seed(0))
    freq = torch.bincount(plan.choice, minlength=3).double() / n
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01)
    r = plan.radius
    assert 0.1 <= r.min() and r.max() <= 2.0 and abs(r.mean() - 1.05) < 0.01 and abs(r.var() - 1.9 ** 2 / 12) < 0.01
    f = plan.factor
    assert 0.7 <= f.min() and f.max() <= 1.3 and (f.mean(dim=1) - 1).abs().max() < 0.005
    assert abs(f.var() - 0.6 ** 2 / 12) < 0.002
    perms = {p: 0 for p in itertools.permutations(range(3))}
    for p in plan.order.T.tolist():
        perms[tuple(p)] += 1
    assert all(abs(c / n - 1 / 6) < 0.01 for c in perms.values()), perms


def test_loader_three_augment_and_config_errors(synthetic_tree):
    base = dict(root=synthetic_tree, img_size=32, num_threads=2, device="cpu", repeated_aug=1)
    plain = build_loader(DataConfig(**base, rand_augment=None), "train", 8, 0, 1, 0, CPU)
    three = build_loader(DataConfig(**base, rand_augment=None, three_augment=True, color_jitter=0.3),
                         "train", 8, 0, 1, 0, CPU)
    assert isinstance(three.randaug, ThreeAugment) and three.randaug.jitter == 0.3
    plain.set_epoch(0)
    three.set_epoch(0)
    a, b = list(plain), list(three)
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(a, b))     # same images, labels
    assert not any(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))   # augmented
    three.sizes = SizeSchedule([[1, 48]], 32, 16)                          # any size, resumable
    three.set_epoch(1, skip_batches=5)
    assert next(iter(three))[0].shape == (8, 3, 48, 48)
    plain.close(), three.close()
    with pytest.raises(ValueError, match="rand_augment: null"):
        build_loader(DataConfig(**base, three_augment=True), "train", 8, 0, 1, 0, CPU)
    with pytest.raises(ValueError, match="color_jitter=0.3 does not apply next to RandAugment"):
        build_loader(DataConfig(**base, color_jitter=0.3), "train", 8, 0, 1, 0, CPU)
    # neither RandAugment nor 3-Augment: an explicit jitter is create_transform's ColorJitter alone
    jitter = build_loader(DataConfig(**base, rand_augment=None, color_jitter=0.3), "train", 8, 0, 1, 0, CPU)
    assert isinstance(jitter.randaug, ThreeAugment) and not jitter.randaug.choose
    jitter.close()


def test_color_jitter_default_is_the_references_effective_one():
    """The reference's --color-jitter 0.3 (main.py default) as it takes effect: next to
    RandAugment timm's create_transform (the reference's train transform) holds no ColorJitter;
    its 3-Augment (augment.py) ends in ColorJitter(0.3, 0.3, 0.3). data.color_jitter unset
    resolves to the same: none with rand_augment, 0.3 with three_augment alone."""
    from timm.data import create_transform

    reference = create_transform(224, is_training=True, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1",
                                 interpolation="bicubic")
    assert not any(isinstance(t, T.ColorJitter) for t in reference.transforms)
    assert DataConfig().color_jitter is None and ThreeAugment.from_config(DataConfig()) is None
    three = ThreeAugment.from_config(DataConfig(rand_augment=None, three_augment=True))
    assert three.jitter == 0.3                              # not silently 0: DeiT III's jitter
    assert ThreeAugment.from_config(DataConfig(rand_augment=None, three_augment=True, color_jitter=0.0)).jitter == 0.0
    # the same draws as an explicit 0.3: identical batches
    x = images(6)
    explicit = ThreeAugment(0.3)
    assert torch.equal(three(x.clone(), torch.Generator().manual_seed(3)),
                       explicit(x.clone(), torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="data.color_jitter=0.4 does not apply next to RandAugment"):
        ThreeAugment.from_config(DataConfig(color_jitter=0.4))   # next to RandAugment: timm drops it


def test_color_jitter_alone_is_create_transforms_color_jitter():
    """--aa off and no 3-Augment: timm's create_transform (the reference's train transform)
    ends its secondary stage in ColorJitter(0.3, 0.3, 0.3) (no hue); ours, batched, equals
    torchvision's ColorJitter steps image by image on the same factors and order."""
    from timm.data import create_transform

    reference = create_transform(224, is_training=True, color_jitter=0.3, auto_augment=None, interpolation="bicubic")
    jitters = [t for t in reference.transforms if isinstance(t, T.ColorJitter)]
    assert len(jitters) == 1 and jitters[0].brightness == (0.7, 1.3) and jitters[0].contrast == (0.7, 1.3)
    assert jitters[0].saturation == (0.7, 1.3) and jitters[0].hue is None
    aug = ThreeAugment.from_config(DataConfig(rand_augment=None, color_jitter=0.3))
    assert not aug.choose and aug.jitter == 0.3
    assert ThreeAugment.from_config(DataConfig(rand_augment=None)) is None   # unset: plain crop + flip
    x = images(24)
    plan = aug.sample(24, 33, 47, torch.Generator().manual_seed(5))
    got = aug.apply(x.clone(), plan)
    assert got.is_contiguous(memory_format=torch.channels_last)
    for i in range(24):
        ref = reference_jitter(pil(x[i]), plan.factor[:, i], plan.order[:, i].tolist())
        assert np.array_equal(got[i].permute(1, 2, 0).numpy(), np.asarray(ref)), i


@pytest.mark.gpu
def test_gpu_equals_cpu():
    x = images(24)
    aug = ThreeAugment(0.3)
    plan = aug.sample(24, 33, 47, torch.Generator().manual_seed(5))
    cpu = aug.apply(x.clone(), plan)
    gpu = aug.apply(x.cuda(), plan.to(torch.device("cuda")))
    assert torch.equal(gpu.cpu(), cpu)
