"""Synthetic, learnable class-folder JPEG datasets for tests, smoke runs and pipeline benchmarks.

    python -m fastdeit.data.synthetic --out DIR --classes 10 --train-per-class 120 \
        --val-per-class 30 --min-size 56 --max-size 96 --seed 0 [--quality 90]

writes DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg. Output is a function of the arguments
only (per-image RNG seeded by (seed, split, class, index)), and a finished tree is recorded in
DIR/.synthetic.json so a second call with the same arguments skips the work.

Why it is learnable under RandomResizedCrop + hflip: the class signal is spread over the whole
image and is invariant to both. Each class owns
  * a colour palette: foreground hue c/C (classes evenly spaced round the hue circle) on a
    background of the complementary hue, with per-image jitter well inside the spacing;
  * a stripe texture: an orientation family (horizontal, vertical or diagonal, where a
    diagonal's sign is random per image, so a flip maps the family to itself) and a period band.
Per image: random size and aspect ratio, stripe phase, jittered period, pixel noise and a few
random-colour distractor ellipses, so the task is not a lookup of one pixel.
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


def class_name(c: int) -> str:
    return f"class_{c:03d}"  # zero padded: sorted names == class indices


def render(c: int, num_classes: int, rng: np.random.Generator, min_size: int,
           max_size: int) -> np.ndarray:
    """One uint8 HWC image of class c."""
    w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    hue = c / num_classes + rng.uniform(-0.25, 0.25) / num_classes
    fg = np.array(colorsys.hsv_to_rgb(hue % 1, rng.uniform(0.6, 0.95), rng.uniform(0.75, 1.0)))
    bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1, rng.uniform(0.3, 0.6),
                                      rng.uniform(0.25, 0.55)))
    family = _ORIENTATIONS[c % len(_ORIENTATIONS)]
    lo, hi = _PERIOD_BANDS[(c // len(_ORIENTATIONS)) % len(_PERIOD_BANDS)]
    angle = {"horizontal": np.pi / 2, "vertical": 0.0,
             "diagonal": rng.choice([np.pi / 4, -np.pi / 4])}[family]
    angle += rng.uniform(-0.12, 0.12)
    period = rng.uniform(lo, hi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = (x * np.cos(angle) + y * np.sin(angle)) * (2 * np.pi / period) + rng.uniform(0, 2 * np.pi)
    mask = np.clip(0.5 + 0.8 * np.sin(phase), 0.0, 1.0)[..., None]  # soft-edged stripes
    img = (mask * fg + (1 - mask) * bg) * 255.0
    img += rng.normal(0.0, 10.0, size=img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(0, 4))):  # distractors: random colour, at most ~1/5 side
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(2, w / 5), rng.uniform(2, h / 5)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry],
                     fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    return np.asarray(pil)


def _write_one(job: Tuple[str, str, int, int, int, int, int, int, int]) -> None:
    path, split, c, i, num_classes, min_size, max_size, seed, quality = job
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], c, i]))
    img = render(c, num_classes, rng, min_size, max_size)
    Image.fromarray(img).save(path, format="JPEG", quality=quality)


def generate(out: str, classes: int = 10, train_per_class: int = 120, val_per_class: int = 30,
             min_size: int = 56, max_size: int = 96, seed: int = 0, quality: int = 90,
             workers: Optional[int] = 1, verbose: bool = False) -> str:
    """Write the tree under `out` (if not already complete) and return `out`.

    A tree is complete when its marker records the same parameters; a marker with different
    parameters is an error rather than a silent mix of two datasets. Files without a marker
    (an interrupted run) are overwritten.
    """
    if classes < 1 or train_per_class < 0 or val_per_class < 0:
        raise ValueError("need classes >= 1 and non-negative per-class counts")
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    params = dict(classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                  min_size=min_size, max_size=max_size, seed=seed, quality=quality, version=1)
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
                jobs.append((path, split, c, i, classes, min_size, max_size, seed, quality))
    if workers is not None and workers > 1 and len(jobs) > 200:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=64))
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
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=120)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--min-size", type=int, default=56)
    p.add_argument("--max-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    generate(a.out, a.classes, a.train_per_class, a.val_per_class, a.min_size, a.max_size,
             a.seed, a.quality, workers=a.workers, verbose=True)


if __name__ == "__main__":
    main()
