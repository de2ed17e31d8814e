"""DALI graphs for the train and eval transforms (DESIGN.md "augmentation" and "eval" rows).

One graph definition serves both placements: on GPU the JPEG decode runs on the "mixed" backend
(nvJPEG, partly on the hardware decoder) and every later op follows its input onto the GPU; on
CPU every op runs on "cpu" and the pipeline has no device. Outputs: images float32 [3,H,W]
normalised with mean/std, labels int64 scalars.

Inputs come from `fn.readers.file` with an explicit, already ordered and sharded `files` list:
the sampler (sampler.py) decides the order in Python, and the reader does the file I/O in
DALI's own threads with prefetching, so no Python callback sits in the hot path (an
`external_source` feeding bytes would read files on the Python thread that also drives the
training step). The reader is told not to shuffle and not to shard. Its order is fixed when the
pipeline is built, so the loader builds one pipeline per train epoch (cheap next to an epoch).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline

from .config import DataConfig
from .randaug import DALI_MAGNITUDE_BINS, parse_rand_augment

READER_NAME = "reader"  # the iterator asks this reader for the epoch size

# nvJPEG buffer preallocation for the mixed decoder: sized so that ImageNet's largest images
# (about 6k x 6.4k) never trigger a reallocation mid-epoch, which would stall the pipeline.
_DEVICE_MEMORY_PADDING = 211 * 2**20
_HOST_MEMORY_PADDING = 140 * 2**20
_PREALLOC_WIDTH_HINT = 5980
_PREALLOC_HEIGHT_HINT = 6430

# timm's translate ops shift by up to 45% of the image side at full magnitude.
_RAND_AUG_MAX_TRANSLATE_REL = 0.45


@dataclass(frozen=True)
class Placement:
    """Where DALI runs: device_id None means a CPU-only pipeline."""
    device_id: Optional[int]

    @property
    def gpu(self) -> bool:
        return self.device_id is not None


def _decoder_kwargs(cfg: DataConfig, placement: Placement) -> dict:
    if not placement.gpu:
        return dict(device="cpu")
    kw = dict(device="mixed", hw_decoder_load=cfg.hw_decoder_load)
    if cfg.decoder_preallocate:
        kw.update(device_memory_padding=_DEVICE_MEMORY_PADDING,
                  host_memory_padding=_HOST_MEMORY_PADDING,
                  preallocate_width_hint=_PREALLOC_WIDTH_HINT,
                  preallocate_height_hint=_PREALLOC_HEIGHT_HINT)
    return kw


def _read(files: List[str], labels: List[int], placement: Placement, pad_last_batch: bool):
    jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                   pad_last_batch=pad_last_batch, name=READER_NAME)
    # int32 [1] per sample from the reader -> int64 as the loss wants; on GPU the labels
    # travel with the images so the trainer never copies them host-to-device.
    label = fn.cast(label, dtype=types.INT64)
    return jpegs, (label.gpu() if placement.gpu else label)


def _normalize(images, cfg: DataConfig, mirror=None):
    # mean/std are on the 0-1 scale in the config; the images are still uint8 0-255 here.
    kw = dict(dtype=types.FLOAT, output_layout="CHW",
              mean=[255.0 * m for m in cfg.mean], std=[255.0 * s for s in cfg.std])
    if mirror is not None:
        kw["mirror"] = mirror
    return fn.crop_mirror_normalize(images, **kw)


def build_train_pipeline(files: List[str], labels: List[int], cfg: DataConfig, batch_size: int,
                         seed: int, placement: Placement) -> Pipeline:
    """Train graph: decode fused with RandomResizedCrop -> bicubic resize -> RandAugment ->
    hflip + normalise. `files` is this rank's epoch order; its length must be a multiple of
    batch_size (the loader drops the partial batch before building)."""
    ra = parse_rand_augment(cfg.rand_augment) if cfg.rand_augment else None
    size = cfg.img_size

    @pipeline_def(enable_conditionals=ra is not None)  # rand_augment picks ops with `if`
    def graph():
        jpegs, label = _read(files, labels, placement, pad_last_batch=False)
        # Fused decode + crop: only the crop window is decoded (RandomResizedCrop semantics,
        # with DALI's default 10 attempts and a centre-crop fallback like torchvision's).
        images = fn.decoders.image_random_crop(
            jpegs, output_type=types.RGB, random_area=list(cfg.scale),
            random_aspect_ratio=list(cfg.ratio), **_decoder_kwargs(cfg, placement))
        images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC)
        if ra is not None:
            from nvidia.dali.auto_aug import rand_augment
            images = rand_augment.rand_augment(
                images, n=ra.num_ops, m=ra.magnitude, num_magnitude_bins=DALI_MAGNITUDE_BINS,
                monotonic_mag=ra.increasing, shape=[size, size],
                max_translate_rel=_RAND_AUG_MAX_TRANSLATE_REL)
        # The flip comes after RandAugment here (timm flips before it); the ops' random signs
        # make the two orders equal in distribution, and fusing the flip into the normalise
        # saves a pass over the image.
        mirror = fn.random.coin_flip(probability=cfg.hflip) if cfg.hflip > 0 else None
        return _normalize(images, cfg, mirror=mirror), label

    return _make(graph, batch_size, cfg, seed, placement)


def build_val_pipeline(files: List[str], labels: List[int], cfg: DataConfig, batch_size: int,
                       placement: Placement) -> Pipeline:
    """Eval graph: bicubic resize of the shorter side to int(img_size / eval_crop_pct) (sizes
    exactly as torchvision computes them), centre crop img_size, normalise. The reader pads the
    last batch; the iterator trims it."""
    size = cfg.img_size
    resize_to = int(size / cfg.eval_crop_pct)

    @pipeline_def
    def graph():
        jpegs, label = _read(files, labels, placement, pad_last_batch=True)
        images = fn.decoders.image(jpegs, output_type=types.RGB, **_decoder_kwargs(cfg, placement))
        # torchvision's Resize(int) (used by timm's eval transform) truncates the long side:
        # long = int(resize_to * long / short). DALI's resize_shorter rounds it instead, which
        # shifts the centre crop by up to half a pixel and rescales by one pixel. Compute the
        # reference sizes from the JPEG header with exact integer floor division instead.
        shape = fn.peek_image_shape(jpegs)  # [H, W, C] int64, read from the header (CPU)
        height, width = shape[0], shape[1]
        short = dmath.min(height, width)
        out_h = fn.cast(height * resize_to // short, dtype=types.FLOAT)
        out_w = fn.cast(width * resize_to // short, dtype=types.FLOAT)
        images = fn.resize(images, resize_x=out_w, resize_y=out_h, interp_type=types.INTERP_CUBIC)
        # Centre crop with torchvision's anchor int(round((side - size) / 2)): Python rounds
        # halves to even, DALI's crop_pos=0.5 rounds them up, a one-pixel shift for odd margins.
        top = _round_half_even_halves(height * resize_to // short - size)
        left = _round_half_even_halves(width * resize_to // short - size)
        images = fn.slice(images, start=fn.stack(top, left), shape=[size, size], axes=[0, 1])
        return _normalize(images, cfg), label

    return _make(graph, batch_size, cfg, 0, placement)  # no random ops: the seed is unused


def _round_half_even_halves(margin):
    """round(margin / 2) with ties to even, in DALI integer arithmetic, as an int32 anchor.

    margin // 2 is k; for an odd margin the tie goes to k + 1 only when k is odd.
    """
    k = margin // 2
    odd_margin = margin - 2 * k
    odd_k = k - 2 * (k // 2)
    return fn.cast(k + odd_margin * odd_k, dtype=types.INT32)  # slice wants start and shape alike


def _make(graph, batch_size: int, cfg: DataConfig, seed: int, placement: Placement) -> Pipeline:
    with warnings.catch_warnings():
        # DALI's auto_aug module calls its own deprecated aliases (fn.experimental.*) and forces
        # those warnings on with a filter of its own, so a filter here cannot hide them; they
        # are DALI-internal and would repeat on every per-epoch rebuild, so drop them at display.
        warnings.showwarning = _hide_dali_alias_warnings(warnings.showwarning)
        pipe = graph(batch_size=batch_size, num_threads=cfg.num_threads,
                     device_id=placement.device_id, seed=seed,
                     prefetch_queue_depth=cfg.prefetch)
        pipe.build()
    return pipe


def _hide_dali_alias_warnings(show):
    def quiet(message, category, *args, **kwargs):
        if issubclass(category, DeprecationWarning) and "nvidia.dali.fn.experimental" in str(message):
            return
        show(message, category, *args, **kwargs)
    return quiet
