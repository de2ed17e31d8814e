"""Synthetic class-folder JPEG datasets for tests, smoke runs and pipeline benchmarks.

Two modes, both writing DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg:

    # learnable: small images whose class survives RandomResizedCrop + hflip (tests, demo)
    python -m fastdeit.data.synthetic --out DIR --classes 10 --train-per-class 120 \
        --val-per-class 30 --min-size 56 --max-size 96 --seed 0 [--quality 90] [--difficulty 0.5]

    # ImageNet-like files for data-pipeline benchmarks: sizes, JPEG qualities and file sizes
    # distributed like ImageNet's (median 500x375, quality ~90, ~110 KB)
    python -m fastdeit.data.synthetic --mode imagenet --out DIR --classes 100 \
        --train-per-class 50 --val-per-class 10 [--workers N]

Output is a function of the arguments only (per-image RNG seeded by (seed, split, class, index)),
and a finished tree is recorded in DIR/.synthetic.json so a second call with the same arguments
skips the work. Images are written by a process pool (`--workers`, default all cores).

Demo mode, why it is learnable under RandomResizedCrop + hflip: the class signal is spread over
the whole image and is invariant to both. Each class owns
  * a colour palette: foreground hue c/C (classes evenly spaced round the hue circle) on a
    background of the complementary hue, with per-image jitter;
  * a stripe texture: an orientation family (horizontal, vertical or diagonal, where a
    diagonal's sign is random per image, so a flip maps the family to itself) and a period band.
Per image: random size and aspect ratio, stripe phase, jittered period, pixel noise and a few
random-colour distractor ellipses, so the task is not a lookup of one pixel. `difficulty`
(0..1, default 0) widens the hue jitter past the class spacing, fades the stripes into stronger
noise and adds larger distractors, so a small model no longer reaches 100% and teacher/student
differences show.

ImageNet mode: content is 1/f ("pink") noise, the amplitude spectrum of natural images, in a
correlated luminance/chroma colour space around a per-class mean colour; it compresses like a
photograph, which is what decoding cost depends on. Sizes: 70% have a 500-pixel long side (most
of ImageNet), the rest a log-uniform long side in 150..1000; aspect 4:3 most often, landscape
78%. Quality ~ N(90, 3) in [75, 98]. Measured: median 500x375, ~110 KB.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

_MARKER = ".synthetic.json"
_SPLIT_CODES = {"train": 0, "val": 1}
_ORIENTATIONS = ("horizontal", "vertical", "diagonal")
_PERIOD_BANDS = ((4.0, 6.0), (8.0, 11.0), (14.0, 19.0))  # stripe period in pixels
MODES = ("demo", "imagenet")


def class_name(c: int) -> str:
    return f"class_{c:03d}"  # zero padded: sorted names == class indices


def render(c: int, num_classes: int, rng: np.random.Generator, min_size: int,
           max_size: int, difficulty: float = 0.0) -> np.ndarray:
    """One uint8 HWC demo image of class c. difficulty 0 is the original (version 1) look."""
    d = float(difficulty)
    w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    # Hue jitter of +-0.25 class spacings at d=0 up to +-1.25 at d=1: neighbours overlap.
    hue = c / num_classes + rng.uniform(-0.25, 0.25) * (1 + 4 * d) / num_classes
    fg = np.array(colorsys.hsv_to_rgb(hue % 1, rng.uniform(0.6, 0.95) * (1 - 0.5 * d),
                                      rng.uniform(0.75, 1.0)))
    bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1, rng.uniform(0.3, 0.6) * (1 - 0.5 * d),
                                      rng.uniform(0.25, 0.55)))
    family = _ORIENTATIONS[c % len(_ORIENTATIONS)]
    lo, hi = _PERIOD_BANDS[(c // len(_ORIENTATIONS)) % len(_PERIOD_BANDS)]
    angle = {"horizontal": np.pi / 2, "vertical": 0.0,
             "diagonal": rng.choice([np.pi / 4, -np.pi / 4])}[family]
    angle += rng.uniform(-0.12, 0.12) * (1 + 2 * d)
    period = rng.uniform(lo, hi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = (x * np.cos(angle) + y * np.sin(angle)) * (2 * np.pi / period) + rng.uniform(0, 2 * np.pi)
    mask = np.clip(0.5 + 0.8 * (1 - 0.75 * d) * np.sin(phase), 0.0, 1.0)[..., None]  # soft stripes
    img = (mask * fg + (1 - mask) * bg) * 255.0
    img += rng.normal(0.0, 10.0 + 30.0 * d, size=img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    reach = 5 - 2.5 * d  # distractor radius up to side/5 (d=0) .. side/2.5 (d=1)
    for _ in range(int(rng.integers(0, 4 + round(4 * d)))):  # random-colour distractors
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(2, w / reach), rng.uniform(2, h / reach)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry],
                     fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    return np.asarray(pil)


def imagenet_size(rng: np.random.Generator) -> Tuple[int, int]:
    """(width, height) drawn like ImageNet's: median 500x375 (see the module docstring)."""
    if rng.random() < 0.7:
        long_side = 500
    else:
        long_side = int(round(np.exp(rng.uniform(np.log(150), np.log(1000)))))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, rng.uniform(1.0, 2.0)], p=[0.55, 0.2, 0.08, 0.17])
    short_side = max(1, int(round(long_side / aspect)))
    return (long_side, short_side) if rng.random() < 0.78 else (short_side, long_side)


def imagenet_quality(rng: np.random.Generator) -> int:
    return int(np.clip(round(rng.normal(90.0, 3.0)), 75, 98))


def _pink_noise(rng: np.random.Generator, h: int, w: int, alpha: float) -> np.ndarray:
    """Unit-variance noise with a 1/f^alpha amplitude spectrum (alpha ~1: natural images)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** -alpha
    amp[0, 0] = 0.0
    shape = (h, w // 2 + 1)
    out = np.fft.irfft2(amp * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)), s=(h, w))
    return out / max(float(out.std()), 1e-12)


def render_imagenet_like(c: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 HWC photograph-like image of class c (ImageNet size distribution)."""
    w, h = imagenet_size(rng)
    hue = c / num_classes + rng.uniform(-0.3, 0.3) / num_classes
    mean = np.array(colorsys.hsv_to_rgb(hue % 1, rng.uniform(0.2, 0.6), rng.uniform(0.35, 0.65)))
    lum = _pink_noise(rng, h, w, 1.0)
    c1 = _pink_noise(rng, h, w, 1.3)
    c2 = _pink_noise(rng, h, w, 1.3)
    # luminance shared by R, G, B plus weaker, smoother chroma: strongly correlated channels
    img = np.stack([lum + 0.3 * c1, lum - 0.2 * c1 + 0.2 * c2, lum - 0.3 * c2], axis=-1)
    img = img * rng.uniform(42.0, 58.0) + mean * 255.0
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_one(job) -> None:
    path, split, c, i, num_classes, mode, min_size, max_size, seed, quality, difficulty = job
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], c, i]))
    if mode == "imagenet":
        img = render_imagenet_like(c, num_classes, rng)
        quality = imagenet_quality(rng)
    else:
        img = render(c, num_classes, rng, min_size, max_size, difficulty)
    Image.fromarray(img).save(path, format="JPEG", quality=quality)


def _init_worker() -> None:
    # One process per core already: keep numpy's FFT/BLAS from oversubscribing the cores.
    os.environ["OMP_NUM_THREADS"] = "1"


def generate(out: str, classes: int = 10, train_per_class: int = 120, val_per_class: int = 30,
             min_size: int = 56, max_size: int = 96, seed: int = 0, quality: int = 90,
             workers: Optional[int] = 1, verbose: bool = False, mode: str = "demo",
             difficulty: float = 0.0) -> str:
    """Write the tree under `out` (if not already complete) and return `out`.

    mode "demo" uses min_size/max_size/quality/difficulty; mode "imagenet" draws sizes and
    qualities per image and ignores them. A tree is complete when its marker records the same
    parameters; a marker with different parameters is an error rather than a silent mix of two
    datasets. Files without a marker (an interrupted run) are overwritten.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if classes < 1 or train_per_class < 0 or val_per_class < 0:
        raise ValueError("need classes >= 1 and non-negative per-class counts")
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    if mode == "demo":
        params = dict(classes=classes, train_per_class=train_per_class,
                      val_per_class=val_per_class, min_size=min_size, max_size=max_size,
                      seed=seed, quality=quality, version=1)
        if difficulty:  # absent at 0, so markers written before the knob existed still match
            params["difficulty"] = difficulty
    else:
        params = dict(mode=mode, classes=classes, train_per_class=train_per_class,
                      val_per_class=val_per_class, seed=seed, version=1)
    marker = os.path.join(out, _MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            existing = json.load(f)
        if existing == params:
            if verbose:
                print(f"synthetic dataset already complete at {out}; skipping")
            return out
        raise ValueError(f"{out} holds a synthetic dataset with other parameters "
                         f"({existing}); choose another --out or delete it")
    jobs = []
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(out, split, class_name(c))
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                path = os.path.join(folder, f"{split}_{c:03d}_{i:05d}.jpg")
                jobs.append((path, split, c, i, classes, mode, min_size, max_size, seed,
                             quality, difficulty))
    cheap = mode == "demo" and len(jobs) <= 200  # a pool costs more than it saves here
    if workers is not None and workers > 1 and not cheap and len(jobs) > 1:
        chunk = max(1, min(64, len(jobs) // (4 * workers)))
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            list(pool.map(_write_one, jobs, chunksize=chunk))
    else:
        for job in jobs:
            _write_one(job)
    with open(marker, "w") as f:  # written last: its presence means the tree is complete
        json.dump(params, f)
    if verbose:
        print(f"wrote {len(jobs)} images to {out}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=MODES, default="demo",
                   help="demo: small learnable images; imagenet: ImageNet-like files for benchmarks")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=120)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--min-size", type=int, default=56, help="demo mode only")
    p.add_argument("--max-size", type=int, default=96, help="demo mode only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90, help="demo mode only")
    p.add_argument("--difficulty", type=float, default=0.0,
                   help="demo mode only: 0 (easy) .. 1 (classes overlap)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    generate(a.out, a.classes, a.train_per_class, a.val_per_class, a.min_size, a.max_size,
             a.seed, a.quality, workers=a.workers, verbose=True, mode=a.mode,
             difficulty=a.difficulty)


if __name__ == "__main__":
    main()
