"""Batched RandAugment against timm's PIL implementation on the same images and choices,
its sampling statistics, and the spec parser."""
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from timm.data import auto_augment as timm_aa

from fastdeit.data.augment import imageops
from fastdeit.data.augment.randaug import (RAND_INCREASING_TRANSFORMS, BatchRandAugment,
                                   RandAugmentSpec, parse_rand_augment)

FILL = (124, 116, 104)  # timm/DeiT: round(255 * IMAGENET_MEAN)


def photos(n=12, h=43, w=57, seed=0):
    """Smooth colour fields with noise (some low-contrast, some noisy): [n, 3, h, w] uint8
    in channels-last memory, the loader's layout."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
        im = np.asarray(base.resize((w, h), Image.BICUBIC), np.float32)
        im = im + rng.normal(0, 20 if i % 2 else 3, im.shape)
        if i % 3 == 0:
            im = im * 0.3 + 60
        out.append(np.clip(im, 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def pil(x):
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).numpy()]


def diff(ours, refs):
    ref = torch.from_numpy(np.stack([np.asarray(r) for r in refs])).permute(0, 3, 1, 2)
    assert ours.shape == ref.shape and ours.dtype == torch.uint8
    return (ours.int() - ref.int()).abs()


X = photos()
F = torch.tensor(np.random.default_rng(1).uniform(0.1, 1.9, 12))


@pytest.mark.parametrize("name,ours,ref", [
    ("autocontrast", lambda x: imageops.autocontrast(x), ImageOps.autocontrast),
    ("equalize", lambda x: imageops.equalize(x), ImageOps.equalize),
    ("invert", lambda x: imageops.invert(x), ImageOps.invert),
])
def test_point_ops_bit_exact(name, ours, ref):
    assert diff(ours(X), [ref(p) for p in pil(X)]).max() == 0


def test_parametrised_point_ops_bit_exact():
    bits = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4])
    assert diff(imageops.posterize(X, bits),
                [ImageOps.posterize(p, int(b)) for p, b in zip(pil(X), bits)]).max() == 0
    black = imageops.posterize(X, torch.zeros(12, dtype=torch.long))
    assert black.max() == 0  # 0 bits: black, as timm with Pillow < 11 (newer Pillow raises)
    thresh = torch.tensor([0, 26, 50, 100, 128, 200, 230, 255, 256, 26, 26, 90])
    assert diff(imageops.solarize(X, thresh),
                [ImageOps.solarize(p, int(t)) for p, t in zip(pil(X), thresh)]).max() == 0
    add = torch.tensor([0, 10, 50, 99, 110, 128, 5, 99, 99, 30, 0, 77])
    assert diff(imageops.solarize_add(X, add),
                [timm_aa.solarize_add(p, int(a)) for p, a in zip(pil(X), add)]).max() == 0


@pytest.mark.parametrize("name,enhance", [("color", ImageEnhance.Color),
                                          ("contrast", ImageEnhance.Contrast),
                                          ("brightness", ImageEnhance.Brightness),
                                          ("sharpness", ImageEnhance.Sharpness)])
def test_enhance_ops_bit_exact(name, enhance):
    ours = getattr(imageops, name)(X, F)
    assert diff(ours, [enhance(p).enhance(float(f)) for p, f in zip(pil(X), F)]).max() == 0


def _geometric_refs(name, values, images):
    fn = {"ShearX": timm_aa.shear_x, "ShearY": timm_aa.shear_y,
          "TranslateXRel": timm_aa.translate_x_rel, "TranslateYRel": timm_aa.translate_y_rel,
          "Rotate": timm_aa.rotate}[name]
    return [fn(p, float(v), fillcolor=FILL, resample=Image.BICUBIC) for p, v in zip(images, values)]


@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_one_axis_warps_match_pil(name):
    """Shear and translate use PIL's own bicubic kernel: exact but for float32 rounding."""
    rng = np.random.default_rng(2)
    values = rng.uniform(-0.45, 0.45, 12) if "Translate" in name else rng.uniform(-0.3, 0.3, 12)
    v = torch.tensor(values)
    zero, fill = torch.zeros(12), torch.tensor(FILL, dtype=torch.uint8)
    axis = 3 if name.endswith(("X", "XRel")) else 2
    if name == "ShearX" or name == "ShearY":
        ours = imageops.shift_rows(X, axis, v, zero, fill)
    else:
        ours = imageops.shift_rows(X, axis, zero, v * (X.shape[axis]), fill)
    d = diff(ours, _geometric_refs(name, values, pil(X)))
    assert d.max() <= 1 and (d > 0).float().mean() < 0.005


def test_rotation_close_to_pil():
    """Rotation samples at PIL's coordinates with PIL's fill and truncation but torch's bicubic
    kernel (a = -0.75 vs PIL's -1). Bilinear would match PIL exactly (same coordinates), so
    the residual is the kernel alone: ~0.5 grey levels on average on these noisy images."""
    degrees = np.random.default_rng(3).uniform(-30, 30, 12)
    from fastdeit.data.augment.randaug import _rotation
    ours = imageops.affine(X, _rotation(torch.tensor(degrees), 43, 57), torch.tensor(FILL))
    d = diff(ours, _geometric_refs("Rotate", degrees, pil(X)))
    assert d.float().mean() < 1.0 and (d > 16).float().mean() < 1e-3


def test_full_randaugment_matches_timm_on_same_choices(monkeypatch):
    """Run our batch, then replay every image's own draws (ops, magnitudes, signs) through
    timm's AugmentOp functions in PIL and compare image by image."""
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    ra = BatchRandAugment(spec, FILL)
    images = photos(64, 40, 48, seed=5)
    plan = ra.sample(64, 40, 48, torch.Generator().manual_seed(7))
    ours = ra.apply(images.clone(), plan)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    draws = plan.draws
    hparams = dict(translate_const=100, img_mean=FILL, interpolation=Image.BICUBIC)
    sign = {"value": 1.0}
    monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v: v * sign["value"])
    worst_rotate = 0.0
    for i, img in enumerate(pil(images)):
        rotated = False
        for j in range(spec.num_ops):
            if not draws["applied"][j, i]:
                continue
            name = spec.ops[int(draws["op"][j, i])]
            sign["value"] = float(draws["sign"][j, i])
            level_fn = timm_aa.LEVEL_TO_ARG[name]
            args = level_fn(float(draws["magnitude"][j, i]), hparams) if level_fn else ()
            if name.startswith("Posterize") and args[0] <= 0:
                img = Image.new("RGB", img.size)       # Pillow < 11 behaviour (see randaug.py)
            else:
                img = timm_aa.NAME_TO_OP[name](img, *args, fillcolor=FILL, resample=Image.BICUBIC)
            rotated |= name == "Rotate"
        d = diff(ours[i:i + 1], [img])
        if rotated:
            worst_rotate = max(worst_rotate, d.float().mean().item())
        else:  # a 1-level rounding difference can grow through a following op (e.g. contrast)
            assert (d > 1).float().mean() < 0.01, (i, d.max())
    assert worst_rotate < 2.0


def test_sampling_statistics():
    """Per image and slot: op uniform over timm's increasing set (with replacement), applied
    with p 0.5, magnitude ~ N(9, 0.5) clipped to [0, 10], sign +-1 evenly."""
    ra = BatchRandAugment(parse_rand_augment("rand-m9-mstd0.5-inc1"), FILL)
    assert ra.names == tuple(timm_aa._RAND_INCREASING_TRANSFORMS) == RAND_INCREASING_TRANSFORMS
    d = ra.sample(20000, 8, 8, torch.Generator().manual_seed(0)).draws
    counts = torch.bincount(d["op"].flatten(), minlength=15).float() / d["op"].numel()
    assert (counts - 1 / 15).abs().max() < 0.01
    assert abs(d["applied"].double().mean().item() - 0.5) < 0.01
    mag = d["magnitude"]
    assert mag.min() >= 0 and mag.max() <= 10
    # E[min(X, 10)] for X ~ N(9, 0.5): 9 - (0.5 phi(2) - (1 - Phi(2))) = 8.99576
    phi, tail = math.exp(-2) / math.sqrt(2 * math.pi), 0.5 * math.erfc(2 / math.sqrt(2))
    assert abs(mag.mean().item() - (9 - (0.5 * phi - tail))) < 0.01
    assert abs((mag == 10).double().mean().item() - 0.0228) < 0.004  # P(N(9, .5) > 10)
    assert abs(mag[mag < 10].std().item() - 0.5) < 0.05
    assert abs((d["sign"] < 0).double().mean().item() - 0.5) < 0.01


def test_same_generator_same_output_and_plan_is_position_independent():
    ra = BatchRandAugment(parse_rand_augment("rand-m9-mstd0.5-inc1"), FILL)
    a = ra(X.clone(), torch.Generator().manual_seed(3))
    b = ra(X.clone(), torch.Generator().manual_seed(3))
    c = ra(X.clone(), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_parse_rand_augment():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == RandAugmentSpec(9, 2, 0.5, True)
    assert parse_rand_augment("rand-n3-m7-inc0") == RandAugmentSpec(7, 3, 0.0, False)
    assert parse_rand_augment("rand-m10") == RandAugmentSpec(10, 2, 0.0, False)
    assert parse_rand_augment("rand-m9-p0.3-mmax12") == RandAugmentSpec(9, 2, 0.0, False, 0.3, 12)
    assert parse_rand_augment("rand-m9-mstd101").magnitude_std == math.inf  # timm: uniform
    assert parse_rand_augment("rand-m9-inc1").ops == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert parse_rand_augment("rand-m9").ops == tuple(timm_aa._RAND_TRANSFORMS)


@pytest.mark.parametrize("spec", ["augmix-m5", "rand", "rand-n2", "rand-m9.5", "rand-m11",
                                  "rand-m9-w0", "rand-m9-tweights", "rand-m9-inc2",
                                  "rand-m9-mstd-1", "rand-m9-foo", "rand-mx", "rand-m9-m8",
                                  "rand-m9-p2"])
def test_parse_rand_augment_rejects(spec):
    with pytest.raises(ValueError, match="RandAugment"):
        parse_rand_augment(spec)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    """The same plan on the GPU gives the CPU's images (up to float rounding in the warps)."""
    ra = BatchRandAugment(parse_rand_augment("rand-m9-mstd0.5-inc1"), FILL)
    images = photos(64, 40, 48, seed=6)
    plan = ra.sample(64, 40, 48, torch.Generator().manual_seed(1))
    cpu = ra.apply(images.clone(), plan)
    gpu = ra.apply(images.cuda(), plan.to(torch.device("cuda"))).cpu()
    d = (cpu.int() - gpu.int()).abs()
    assert (d > 1).float().mean() < 1e-3
