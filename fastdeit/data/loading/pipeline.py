"""DALI graphs for the train and eval transforms (docs/DESIGN.md, "train augmentation" and
"evaluation" rows).

One graph definition serves both placements: on GPU the JPEG decode runs on the "mixed" backend
(nvJPEG, partly on the hardware decoder) and every later op follows its input onto the GPU; on
CPU every op runs on "cpu" and the pipeline has no device. Outputs, HWC: train images uint8
[S,S,3] on GPU, or the unresized uint8 crops plus flip flags on CPU (see define_train_pipeline;
RandAugment and normalisation follow in torch, randaug.py), eval images float32 [S,S,3]
normalised with mean/std; labels int64 scalars. Placement.gpu_layout_on_cpu runs the GPU
train layout on CPU operators, so that CPU tests cover the GPU branch; the GPU graphs
themselves are defined and serialised in tests without a GPU (tests/test_data_gpu_graph.py).

Inputs come from `fn.readers.file` with an explicit, already ordered and sharded `files` list:
the sampler (sampler.py) decides the order in Python, and the reader does the file I/O in
DALI's own threads with prefetching, so no Python callback sits in the hot path (an
`external_source` feeding bytes would read files on the Python thread that also drives the
training step). The reader is told not to shuffle and not to shard. Its order is fixed when the
pipeline is built, so the loader builds one pipeline per train epoch (cheap next to an epoch).
A packed split (shards.py) feeds the same graph through `external_source` instead: its reads
run ahead in threads, so the graph and every random draw stay the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline

from ..config import IMAGENET_LARGEST_IMAGE, DataConfig

READER_NAME = "reader"  # the iterator asks this reader for the epoch size

# nvJPEG buffer preallocation for the GPU ("mixed") decoder of the train graph. Per decoder
# thread (the pipeline's num_threads) DALI reserves one device buffer of device_memory_padding
# bytes and two pinned host buffers of host_memory_padding bytes (double buffering), plus the
# hardware decoder's batch of preallocate_{width,height}_hint images, so that no image of the
# data set makes nvJPEG reallocate (a stall) mid-epoch. The buffers hold the whole image's
# bitstream, Huffman-decoded coefficients and planes, since the random crop is cut after
# entropy decoding: the largest *source* image bounds them, not data.img_size or data.scale.
# The defaults are NVIDIA's figures for ImageNet's largest image, 5980 x 6430 (their DALI
# ResNet-50 example): 211,025,920 device and 140,544,512 host bytes, about 5.5 and 3.7 bytes
# per pixel; data.decoder_max_image scales them to another data set's largest image.
# Reuse across epochs: DALI allocates these from its process-wide device and pinned pools
# (the decoder allocates them and hands them back to the pool as it is built), and a pipeline
# that is destroyed returns its buffers there, not to the driver; the loader releases each
# epoch's pipeline before it builds the next, so later epochs take the same blocks without a
# new cudaMalloc/cudaHostAlloc. Val decodes with DALI's small default paddings and lets its
# buffers grow on its own images (once, in the first evaluation, outside the train loop).
_DEVICE_BYTES_PER_PIXEL = 211_025_920 / (IMAGENET_LARGEST_IMAGE[0] * IMAGENET_LARGEST_IMAGE[1])
_HOST_BYTES_PER_PIXEL = 140_544_512 / (IMAGENET_LARGEST_IMAGE[0] * IMAGENET_LARGEST_IMAGE[1])


def nvjpeg_preallocation(cfg: DataConfig) -> dict:
    """The train decoder's preallocation arguments for images up to cfg.decoder_max_image."""
    width, height = cfg.decoder_max_image           # checked by DataConfig
    return dict(device_memory_padding=math.ceil(width * height * _DEVICE_BYTES_PER_PIXEL),
                host_memory_padding=math.ceil(width * height * _HOST_BYTES_PER_PIXEL),
                preallocate_width_hint=width, preallocate_height_hint=height)


def preallocated_bytes(cfg: DataConfig, num_threads: int) -> Tuple[int, int]:
    """(device bytes, pinned host bytes) that the train decoder reserves per rank on a GPU with
    ``num_threads`` DALI threads (data.num_threads, or the rank's thread budget): one device and
    two pinned buffers per thread; (0, 0) without preallocation."""
    if not cfg.decoder_preallocate:
        return 0, 0
    kw = nvjpeg_preallocation(cfg)
    return num_threads * kw["device_memory_padding"], num_threads * 2 * kw["host_memory_padding"]


@dataclass(frozen=True)
class Placement:
    """Where DALI runs, and which train graph layout it uses.

    device_id: the GPU (decode on the "mixed" backend, later ops follow onto the GPU), or None
    for a CPU-only pipeline, which never touches CUDA.
    gpu_layout_on_cpu: the GPU layout (resize and flip in the graph, fixed-size batches through
    DALI's iterator, loader.py) with device_id None: the same graph on CPU operators, only the
    decoder backend and the labels' device swapped. The tests run the loader's GPU branch this
    way where there is no GPU; the CPU placement proper hands DALI's raw crops to torch, whose
    resize is 8x faster on a CPU (build_train_pipeline).
    """
    device_id: Optional[int]
    gpu_layout_on_cpu: bool = False

    @property
    def gpu(self) -> bool:
        return self.device_id is not None

    @property
    def gpu_layout(self) -> bool:
        return self.gpu or self.gpu_layout_on_cpu


def _decoder_kwargs(cfg: DataConfig, placement: Placement, preallocate: bool = False) -> dict:
    """Decoder placement arguments; ``preallocate`` (the train graph) adds nvJPEG's buffers."""
    if not placement.gpu:
        return dict(device="cpu", adjust_orientation=cfg.exif_orientation)
    kw = dict(device="mixed", hw_decoder_load=cfg.hw_decoder_load, adjust_orientation=cfg.exif_orientation)
    if preallocate and cfg.decoder_preallocate:
        kw.update(nvjpeg_preallocation(cfg))
    return kw


def _read(files, labels: Optional[List[int]], placement: Placement, pad_last_batch: bool):
    """Encoded images and int32 [1] labels, in the loader's order. `files` is a list of paths
    (labels alongside), or a batch callback reading packed shards (shards.ShardFeed, labels
    None) whose last batch is already partial (the iterator then reads to StopIteration)."""
    if callable(files):
        # no_copy: the feed hands over tensors viewing its read buffers and keeps them alive
        # until DALI is done with them (a copy would cost the calling thread most of the read).
        jpegs, label = fn.external_source(source=files, num_outputs=2, batch=True,
                                          batch_info=True, dtype=[types.UINT8, types.INT32],
                                          no_copy=True)
    else:
        # An explicit seed (unused: no shuffling) so that the reader takes no slot of the
        # pipeline's seed sequence: DALI seeds the random ops in graph order, and the crop and
        # flip must draw the same numbers whichever source feeds them (tests/test_data_pack.py).
        jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                       pad_last_batch=pad_last_batch, name=READER_NAME, seed=0)
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
                         seed: int, placement: Placement, size: int) -> Pipeline:
    """The train graph (define_train_pipeline), built; `size`: this epoch's side."""
    return _build(define_train_pipeline(files, labels, cfg, batch_size, seed, placement, size))


def build_val_pipeline(files: List[str], labels: List[int], cfg: DataConfig, batch_size: int,
                       placement: Placement) -> Pipeline:
    """The eval graph (define_val_pipeline), built."""
    return _build(define_val_pipeline(files, labels, cfg, batch_size, placement))


_PLACEMENT = object()   # define_*_pipeline's device_id default: the placement's


def define_train_pipeline(files: List[str], labels: List[int], cfg: DataConfig, batch_size: int,
                          seed: int, placement: Placement, size: int,
                          device_id=_PLACEMENT) -> Pipeline:
    """Train graph, not built: decode fused with RandomResizedCrop, then the bicubic resize and
    hflip.

    GPU layout: outputs (images uint8 [S, S, 3], labels): the resize runs in the graph with the
    flip fused into it. CPU: outputs (crops uint8 [h, w, 3] of varying size, labels, flip int32):
    DALI's CPU cubic resampler costs about 1.6 ms per ImageNet crop, 8x torch's uint8
    antialiased bicubic (PIL's algorithm, vectorised), so the loader resizes and flips the
    crops in torch (loader.py). The random draws (crop windows, flips) are DALI's either way.
    RandAugment and normalisation follow on the loader's device in torch (randaug.py), as one
    batched pass instead of per-sample DALI ops. `files` is this rank's epoch order; its length
    must be a multiple of batch_size (the loader drops the partial batch before building).
    device_id: the pipeline's device, the placement's by default; None lets a GPU graph be
    serialised (pipe.serialize()) without a GPU: DALI looks for CUDA only when it creates the
    backend pipeline, at build or serialisation time. `size`: this epoch's output side
    (the loader's schedule, data.size_schedule)."""

    @pipeline_def
    def graph():
        jpegs, label = _read(files, labels, placement, pad_last_batch=False)
        # Fused decode + crop: only the crop window is decoded. RandomResizedCrop semantics
        # (area and log-uniform aspect ratio, 10 attempts, centre-crop fallback) match
        # torchvision's in distribution (tests/test_data_loader.py checks the statistics).
        images = fn.decoders.image_random_crop(
            jpegs, output_type=types.RGB, random_area=list(cfg.scale),
            random_aspect_ratio=list(cfg.ratio), **_decoder_kwargs(cfg, placement, preallocate=True))
        flip = fn.random.coin_flip(probability=cfg.hflip, dtype=types.INT32)
        if not placement.gpu_layout:
            return images, label, flip
        # timm flips before RandAugment too, so the order is the reference's.
        return resize_flip(images, size, flip), label

    return _make(graph, batch_size, cfg, seed, placement, device_id)


def resize_flip(images, size: int, flip):
    """Bicubic resize of HWC images to [size, size] with the horizontal flip fused in.

    A region of interest whose x runs from 1 to 0 is the mirrored image, resampled in the same
    pass: bit-identical to resize-then-flip (tests/test_data_gpu_graph.py checks it on DALI's
    CPU backend). flip: int32 0/1 per sample."""
    flip = fn.cast(flip, dtype=types.FLOAT)
    return fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC,
                     roi_start=fn.stack(0.0, flip), roi_end=fn.stack(1.0, 1.0 - flip),
                     roi_relative=True)


def define_val_pipeline(files: List[str], labels: List[int], cfg: DataConfig, batch_size: int,
                        placement: Placement, device_id=_PLACEMENT) -> Pipeline:
    """Eval graph, not built: bicubic resize of the shorter side to int(img_size /
    eval_crop_pct) (sizes exactly as torchvision computes them), centre crop img_size,
    normalise. The reader pads the last batch; the iterator trims it. device_id: as in
    define_train_pipeline."""
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
        # [H, W, C] int64, read from the header (CPU), oriented as the decoder orients
        shape = fn.peek_image_shape(jpegs, adjust_orientation=cfg.exif_orientation)
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

    return _make(graph, batch_size, cfg, 0, placement, device_id)  # no random ops: seed unused


def _round_half_even_halves(margin):
    """round(margin / 2) with ties to even, in DALI integer arithmetic, as an int32 anchor.

    margin // 2 is k; for an odd margin the tie goes to k + 1 only when k is odd.
    """
    k = margin // 2
    odd_margin = margin - 2 * k
    odd_k = k - 2 * (k // 2)
    return fn.cast(k + odd_margin * odd_k, dtype=types.INT32)  # slice wants start and shape alike


def _make(graph, batch_size: int, cfg: DataConfig, seed: int, placement: Placement,
          device_id) -> Pipeline:
    if device_id is _PLACEMENT:
        device_id = placement.device_id
    return graph(batch_size=batch_size, num_threads=cfg.num_threads, device_id=device_id,
                 seed=seed, prefetch_queue_depth=cfg.prefetch)


def _build(pipe: Pipeline) -> Pipeline:
    pipe.build()
    return pipe
