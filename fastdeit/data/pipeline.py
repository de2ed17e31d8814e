"""DALI graphs for the train and eval transforms (DESIGN.md "augmentation" and "eval" rows).

One graph definition serves both placements: on GPU the JPEG decode runs on the "mixed" backend
(nvJPEG, partly on the hardware decoder) and every later op follows its input onto the GPU; on
CPU every op runs on "cpu" and the pipeline has no device. Outputs, HWC: train images uint8
[S,S,3] on GPU, or the unresized uint8 crops plus flip flags on CPU (see build_train_pipeline;
RandAugment and normalisation follow in torch, randaug.py), eval images float32 [S,S,3]
normalised with mean/std; labels int64 scalars.

Inputs come from `fn.readers.file` with an explicit, already ordered and sharded `files` list:
the sampler (sampler.py) decides the order in Python, and the reader does the file I/O in
DALI's own threads with prefetching, so no Python callback sits in the hot path (an
`external_source` feeding bytes would read files on the Python thread that also drives the
training step). The reader is told not to shuffle and not to shard. Its order is fixed when the
pipeline is built, so the loader builds one pipeline per train epoch (cheap next to an epoch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline

from .config import DataConfig

READER_NAME = "reader"  # the iterator asks this reader for the epoch size

# nvJPEG buffer preallocation for the mixed decoder: sized so that ImageNet's largest images
# (about 6k x 6.4k) never trigger a reallocation mid-epoch, which would stall the pipeline.
_DEVICE_MEMORY_PADDING = 211 * 2**20
_HOST_MEMORY_PADDING = 140 * 2**20
_PREALLOC_WIDTH_HINT = 5980
_PREALLOC_HEIGHT_HINT = 6430


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


def _normalize(images, cfg: DataConfig):
    # mean/std are on the 0-1 scale in the config; the images are still uint8 0-255 here.
    # HWC output: the loader views it as NCHW in channels-last memory, without a copy.
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC",
                                    mean=[255.0 * m for m in cfg.mean],
                                    std=[255.0 * s for s in cfg.std])


def build_train_pipeline(files: List[str], labels: List[int], cfg: DataConfig, batch_size: int,
                         seed: int, placement: Placement, size: Optional[int] = None) -> Pipeline:
    """Train graph: decode fused with RandomResizedCrop, then the bicubic resize and hflip.

    GPU: outputs (images uint8 [S, S, 3], labels): the resize runs in the graph with the flip
    fused into it. CPU: outputs (crops uint8 [h, w, 3] of varying size, labels, flip int32):
    DALI's CPU cubic resampler costs about 1.6 ms per ImageNet crop, 8x torch's uint8
    antialiased bicubic (PIL's algorithm, vectorised), so the loader resizes and flips the
    crops in torch (loader.py). The random draws (crop windows, flips) are DALI's either way.
    RandAugment and normalisation follow on the loader's device in torch (randaug.py), as one
    batched pass instead of per-sample DALI ops. `files` is this rank's epoch order; its length
    must be a multiple of batch_size (the loader drops the partial batch before building).
    `size`: this epoch's output side (data.size_schedule); default cfg.img_size."""
    size = size or cfg.img_size

    @pipeline_def
    def graph():
        jpegs, label = _read(files, labels, placement, pad_last_batch=False)
        # Fused decode + crop: only the crop window is decoded. RandomResizedCrop semantics
        # (area and log-uniform aspect ratio, 10 attempts, centre-crop fallback) match
        # torchvision's in distribution (tests/test_data_loader.py checks the statistics).
        images = fn.decoders.image_random_crop(
            jpegs, output_type=types.RGB, random_area=list(cfg.scale),
            random_aspect_ratio=list(cfg.ratio), **_decoder_kwargs(cfg, placement))
        flip = fn.random.coin_flip(probability=cfg.hflip, dtype=types.INT32)
        if not placement.gpu:
            return images, label, flip
        # The flip rides on the resize: a region of interest whose x runs from 1 to 0 is the
        # mirrored crop, resampled in the same pass (bit-identical to resize-then-flip).
        # timm flips before RandAugment too, so the order is the reference's.
        flip = fn.cast(flip, dtype=types.FLOAT)
        images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC,
                           roi_start=fn.stack(0.0, flip), roi_end=fn.stack(1.0, 1.0 - flip),
                           roi_relative=True)
        return images, label

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
    pipe = graph(batch_size=batch_size, num_threads=cfg.num_threads, device_id=placement.device_id,
                 seed=seed, prefetch_queue_depth=cfg.prefetch)
    pipe.build()
    return pipe
