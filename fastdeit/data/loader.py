"""The sharded, epoch-aware loader the trainer iterates: DALI pipeline + sampler + bookkeeping.

Determinism and resume: a train epoch is fully described by (seed, epoch, rank, world):
`set_epoch(e)` computes this rank's index order from (seed, e) (sampler.py) and builds a fresh
DALI pipeline whose random seed is derived from (seed, e, rank). Nothing carries over from
earlier epochs, so a run resumed at an epoch boundary reads the same batches, bit for bit on
the same placement and thread settings, as an uninterrupted one. The old pipeline is released
before the new one is built.

Val is unshuffled and seedless: one pipeline is kept across evaluations and rebuilt only if an
evaluation was abandoned part way (DALI cannot rewind a reader mid-epoch).
"""
from __future__ import annotations

import math
import os
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from .config import DataConfig
from .folder import find_classes, read_file_list, scan_image_folder
from .pipeline import READER_NAME, Placement, build_train_pipeline, build_val_pipeline
from .sampler import effective_repeats, train_indices, val_indices

SPLITS = ("train", "val")


def build_loader(cfg: DataConfig, split: str, batch_size: int, rank: int, world_size: int,
                 seed: int, device: torch.device) -> "Loader":
    """Scan `cfg.root/<split folder>` and return this rank's loader for `split`.

    batch_size is the per-rank micro batch. `device` is where batches are delivered; DALI runs
    on that GPU when cfg.device is "gpu", or "auto" with CUDA available and a CUDA `device`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    folder = os.path.join(cfg.root, cfg.train_split if split == "train" else cfg.val_split)
    file_list = cfg.train_list if split == "train" else cfg.val_list
    if file_list:
        files, labels, classes = read_file_list(file_list, folder)
    else:
        files, labels, classes = scan_image_folder(folder)
    if split == "val":
        train_folder = os.path.join(cfg.root, cfg.train_split)
        if os.path.isdir(train_folder) and find_classes(train_folder) != classes:
            # Same index <-> name mapping or every val label would be silently wrong.
            raise ValueError(f"class folders of {folder} differ from those of {train_folder}")
    return Loader(cfg, split, files, labels, classes, batch_size, rank, world_size, seed,
                  device, resolve_placement(cfg, device))


def resolve_placement(cfg: DataConfig, device: torch.device) -> Placement:
    """cfg.device -> Placement. "auto" also requires a CUDA target device: a CPU run on a GPU
    host should not decode on the GPU only to copy every batch back."""
    if cfg.device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"data.device must be auto|gpu|cpu, got {cfg.device!r}")
    want_gpu = cfg.device == "gpu" or (
        cfg.device == "auto" and device.type == "cuda" and torch.cuda.is_available())
    if not want_gpu:
        return Placement(None)
    if not torch.cuda.is_available():
        raise ValueError("data.device is 'gpu' but CUDA is not available")
    if device.type == "cuda" and device.index is not None:
        return Placement(device.index)
    return Placement(torch.cuda.current_device())


def dali_seed(seed: int, epoch: int, rank: int) -> int:
    """DALI pipeline seed for one (seed, epoch, rank): independent streams per rank and epoch."""
    state = np.random.SeedSequence([seed, epoch, rank, 0xDA11]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


class Loader:
    """Yields (images float32 [B,3,S,S], labels int64 [B]) on `device` for one rank.

    Train: call set_epoch(e) before each epoch; every rank has the same len(); the last
    partial batch is dropped. Val: set_epoch is optional (no randomness); each sample is seen
    exactly once over all ranks; the last batch may be partial.
    """

    def __init__(self, cfg: DataConfig, split: str, files: List[str], labels: List[int],
                 classes: List[str], batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device, placement: Placement):
        self.cfg, self.split, self.batch_size = cfg, split, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device, self.placement = device, placement
        self.classes = list(classes)
        self.num_classes = len(classes)
        self._files = np.asarray(files, dtype=object)
        self._labels = np.asarray(labels, dtype=np.int64)
        self._pipe = None
        self._it = None
        self._order: Optional[np.ndarray] = None  # indices the current pipeline reads
        self._ready = False   # train: set_epoch built a pipeline not yet iterated
        self._clean = False   # val: the kept pipeline sits at an epoch start
        if split == "train":
            self.repeats = effective_repeats(cfg.repeated_aug, world_size,
                                             cfg.repeated_aug_single_process)
            # Same count on every rank (sampler.py), so the same number of batches.
            per_rank = len(train_indices(len(files), rank, world_size, seed, 0, self.repeats))
            self._num_batches = per_rank // batch_size
            if self._num_batches == 0:
                raise ValueError(
                    f"train split has {len(files)} images: {per_rank} per rank, fewer than "
                    f"batch_size {batch_size}, so an epoch would have no batches")
            self.num_samples = self._num_batches * batch_size
        else:
            self.repeats = 1
            self.num_samples = len(val_indices(len(files), rank, world_size))
            self._num_batches = math.ceil(self.num_samples / batch_size)

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        if self.split != "train":
            return  # val order and transforms do not depend on the epoch
        self.close()
        order = train_indices(len(self._files), self.rank, self.world_size, self.seed, epoch,
                              self.repeats)[: self.num_samples]
        pipe_args = (self._files[order].tolist(), self._labels[order].tolist(), self.cfg,
                     self.batch_size, dali_seed(self.seed, epoch, self.rank), self.placement)
        self._start(order, build_train_pipeline, pipe_args)
        self._ready = True

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.split == "train":
            if not self._ready:
                # Iterating twice would silently replay (or skip) an epoch's data order.
                raise RuntimeError("Loader.set_epoch(epoch) must be called before each epoch")
            self._ready = False
        else:
            if self.num_samples == 0:
                return iter(())
            if not self._clean:
                self.close()
                order = val_indices(len(self._files), self.rank, self.world_size)
                self._start(order, build_val_pipeline,
                            (self._files[order].tolist(), self._labels[order].tolist(),
                             self.cfg, self.batch_size, self.placement))
            self._clean = False
        return self._batches()

    def _batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        it = self._it
        for step in range(self._num_batches):
            try:
                out = next(it)[0]
            except StopIteration:  # cannot happen with a consistent epoch size; never hang
                raise RuntimeError(f"DALI ended the {self.split} epoch after {step} of "
                                   f"{self._num_batches} batches") from None
            except RuntimeError as e:
                self._fail(step, e)
            images, labels = out["images"], out["labels"].view(-1)
            if images.device != self.device:  # CPU pipeline feeding a GPU run
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels
        if self.split == "val":
            try:  # run the iterator to its end so it auto-resets for the next evaluation
                next(it)
            except StopIteration:
                self._clean = True

    def close(self) -> None:
        """Release the DALI pipeline (and its threads and buffers)."""
        self._it = None
        self._pipe = None
        self._order = None
        self._ready = False
        self._clean = False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- internals -------------------------------------------------------------------------

    def _start(self, order: np.ndarray, build, args) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._order = order
        try:
            self._pipe = build(*args)
            # The iterator runs the first batches right away (prefetch), overlapping them with
            # whatever the trainer does between set_epoch and the first step.
            self._it = DALIGenericIterator(
                [self._pipe], ["images", "labels"], reader_name=READER_NAME,
                last_batch_policy=(LastBatchPolicy.DROP if self.split == "train"
                                   else LastBatchPolicy.PARTIAL),
                auto_reset=self.split == "val")
        except RuntimeError as e:
            self._fail(0, e)

    def _fail(self, step: int, error: RuntimeError):
        """Turn a DALI pipeline error into one naming the bad file, then stop.

        Policy for corrupt/truncated/non-image files: the epoch stops with an error naming the
        file (never a skipped sample or a shifted label). DALI's message names only the
        operator, so we re-decode with PIL the files DALI may have been working on: the failing
        batch and the ones prefetched after it.
        """
        order = self._order if self._order is not None else np.arange(0)
        lo = step * self.batch_size
        hi = (step + self.cfg.prefetch + 2) * self.batch_size
        candidates = self._files[order[lo:hi]].tolist()
        self.close()
        bad = _first_undecodable(candidates)
        if bad is not None:
            path, why = bad
            raise RuntimeError(f"cannot decode image {path}: {why} (DALI: "
                               f"{str(error).strip().splitlines()[-1]})") from error
        raise RuntimeError(
            f"DALI {self.split} pipeline failed at batch {step}; the images it was reading "
            f"({len(candidates)} files from {candidates[:1]}) decode fine with PIL") from error


def _first_undecodable(paths: List[str]) -> Optional[Tuple[str, str]]:
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()  # a full decode: truncation only shows up here
        except Exception as e:  # any failure is a reason DALI may have failed too
            return path, f"{type(e).__name__}: {e}"
    return None
