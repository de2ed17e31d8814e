"""The sharded, epoch-aware loader the trainer iterates: DALI pipeline + sampler + bookkeeping.

Train batches: DALI decodes, crops, resizes and flips (pipeline.py) into uint8 NHWC on its
device; then, on the training device, the batched RandAugment (randaug.py) and one normalising
pass turn them into float32 [B, 3, S, S] in channels-last memory.

Determinism and resume: a train epoch is fully described by (seed, epoch, rank, world):
`set_epoch(e)` computes this rank's index order from (seed, e) (sampler.py) and builds a fresh
DALI pipeline whose random seed is derived from (seed, e, rank); RandAugment's draws for batch
i come from a torch.Generator seeded by (seed, e, rank, i), never from the global RNG. Nothing
carries over from earlier epochs, so a run resumed at an epoch boundary reads the same batches,
bit for bit on the same placement and thread settings, as an uninterrupted one.
`set_epoch(e, skip_batches=k)` resumes mid-epoch: DALI's random crop/flip state can only be
advanced by running it, so the first k batches are decoded and discarded inside DALI's own
pipeline (about k/len of an epoch's data-loading time, with no RandAugment, normalisation or
training step) and iteration yields batches k, k+1, ... bit-identical to those of an
uninterrupted epoch. The old pipeline is released before the new one is built.

Train and val differ in order, graph and what follows DALI (TrainLoader, ValLoader, over the
shared Loader). Val is unshuffled and seedless: one pipeline is kept across evaluations and
rebuilt only if an evaluation was abandoned part way (DALI cannot rewind a reader mid-epoch).

Sources: `cfg.root` is a class-folder tree (folder.FolderSource: DALI's file reader) or, when it
holds a manifest, a packed one (shards.ShardSource: positioned reads from tar shards); both give
the sampler the same indices and labels and DALI the same bytes, so batches are the same.
"""
from __future__ import annotations

import dataclasses
import math
import os
import traceback
from typing import Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from fastdeit.threads import RuntimeConfig, ThreadBudget, rank_budget
from fastdeit.errors import BadImageError, ConfigError, DataError

from ..augment import imageops
from ..config import DataConfig
from . import shards
from .folder import FolderSource, exclusion_list, find_classes, read_exclusions, read_file_list, scan_image_folder
from .host import BackgroundBatches, resize_crops
from .pipeline import READER_NAME, Placement, build_train_pipeline, build_val_pipeline
from ..augment.randaug import BatchRandAugment, parse_rand_augment
from .sampler import effective_repeats, train_indices, val_indices
from .schedule import SizeSchedule, size_schedule
from ..augment.threeaug import ThreeAugment
from ..transfer import pins_for, to_device

SPLITS = ("train", "val")


def build_loader(cfg: DataConfig, split: str, batch_size: int, rank: int, world_size: int,
                 seed: int, device: torch.device,
                 threads: Optional[ThreadBudget] = None) -> "Loader":
    """Scan `cfg.root/<split folder>` (or open it, packed) and return this rank's loader: a
    TrainLoader for "train", a ValLoader for "val".

    batch_size is the per-rank micro batch. `device` is where batches are delivered; DALI runs
    on that GPU when cfg.device is "gpu", or "auto" with CUDA available and a CUDA `device`.
    cfg.num_threads / cfg.host_threads left at None come from `threads`, the rank's budget
    (fastdeit.threads.thread_budget; derived here from the environment when not given). `seed`
    is the train order's and augmentation's; val has no randomness and ignores it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    name = cfg.train_split if split == "train" else cfg.val_split
    folder, train_folder = os.path.join(cfg.root, name), os.path.join(cfg.root, cfg.train_split)
    file_list = cfg.train_list if split == "train" else cfg.val_list
    excluded = None
    if shards.is_packed(cfg.root):  # python -m fastdeit.data.pack output (shards.py)
        if cfg.exclude_list:
            raise ConfigError(f"data.exclude_list={cfg.exclude_list}: {cfg.root} is packed, and the "
                              "packer refuses files that don't decode: nothing to exclude")
        source = shards.open_split(cfg.root, name, file_list)
        train_classes = shards.split_classes(cfg.root, cfg.train_split)
    else:
        files, labels, classes = (read_file_list(file_list, folder) if file_list
                                  else scan_image_folder(folder))
        files, labels, excluded = _exclude(cfg, files, labels)
        source = FolderSource(files, labels, classes)
        train_classes = find_classes(train_folder) if os.path.isdir(train_folder) else None
    if split == "val" and train_classes is not None and train_classes != source.classes:
        # Same index <-> name mapping or every val label would be silently wrong.
        raise DataError(f"class folders of {folder} differ from those of {train_folder}")
    placement = resolve_placement(cfg, device)
    if cfg.num_threads is None or cfg.host_threads is None:
        threads = threads or rank_budget(RuntimeConfig(), placement.gpu, device.type)
        cfg = dataclasses.replace(cfg, num_threads=cfg.num_threads or threads.dali,
                                  host_threads=cfg.host_threads or threads.host)
    shard = Shard(rank, world_size)
    loader = (TrainLoader(cfg, source, batch_size, shard, device, placement, seed) if split == "train"
              else ValLoader(cfg, source, batch_size, shard, device, placement))
    loader.excluded = excluded      # for the run's log: (files left out, the list) or None
    return loader


def _exclude(cfg: DataConfig, files: List[str], labels: List[int]):
    """Leave out the files of the exclusion list (data.exclude_list, or the verifier's list in
    the root): (files, labels, (how many left out, the list) or None)."""
    list_path = exclusion_list(cfg.root, cfg.exclude_list)
    if list_path is None:
        return files, labels, None
    skip = read_exclusions(list_path, cfg.root)
    keep = [i for i, path in enumerate(files) if path not in skip]
    return [files[i] for i in keep], [labels[i] for i in keep], (len(files) - len(keep), list_path)


def resolve_placement(cfg: DataConfig, device: torch.device) -> Placement:
    """cfg.device -> Placement. "auto" also requires a CUDA target device: a CPU run on a GPU
    host should not decode on the GPU only to copy every batch back."""
    if cfg.device not in ("auto", "gpu", "cpu"):
        raise ConfigError(f"data.device must be auto|gpu|cpu, got {cfg.device!r}")
    want_gpu = cfg.device == "gpu" or (
        cfg.device == "auto" and device.type == "cuda" and torch.cuda.is_available())
    if not want_gpu:
        return Placement(None)
    if not torch.cuda.is_available():
        raise ConfigError("data.device is 'gpu' but CUDA is not available")
    if device.type == "cuda" and device.index is not None:
        return Placement(device.index)
    return Placement(torch.cuda.current_device())


def dali_seed(seed: int, epoch: int, rank: int) -> int:
    """DALI pipeline seed for one (seed, epoch, rank): independent streams per rank and epoch."""
    state = np.random.SeedSequence([seed, epoch, rank, 0xDA11]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


def augment_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """RandAugment generator seed for one train batch: a function of its position only, so a
    resumed epoch draws the same choices without replaying the skipped batches."""
    state = np.random.SeedSequence([seed, epoch, rank, batch, 0xA06]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


class Shard(NamedTuple):
    """Which part of the data this process reads: rank `rank` of `world_size`."""
    rank: int = 0
    world_size: int = 1


class Loader:
    """What the train and val loaders share: the source, the DALI pipeline and its iterator,
    the copy to the training device, closing, and the error that names a bad file.

    Yields (images float32 [B,3,S,S] channels-last, labels int64 [B]) on `device`, one rank.
    Subclasses say how an epoch's order and graph are made (`_open`) and what happens to a
    batch on the training device (`_finish`).
    """

    split = ""          # "train" / "val": for messages and the run's log
    _last_batch = ""    # DALI's LastBatchPolicy member for the iterator

    def __init__(self, cfg: DataConfig, source, batch_size: int, shard: Shard, device: torch.device,
                 placement: Placement):
        self.cfg, self.batch_size, self.shard = cfg, batch_size, shard
        self.rank, self.world_size = shard
        self.device, self.placement = device, placement
        self.classes = list(source.classes)
        self.num_classes = len(self.classes)
        self._source = source   # folder.FolderSource or shards.ShardSource
        self._pipe = None
        self._it = None                 # DALIGenericIterator (GPU layout, val)
        self._order: Optional[np.ndarray] = None  # indices the current pipeline reads
        self._skip = 0
        self._num_batches = 0
        self.num_samples = 0
        self.excluded = None

    def __len__(self) -> int:
        """Batches in a full epoch."""
        return self._num_batches

    def _batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self._skip, self._num_batches):
            try:
                images, labels = self._next(step)
            except RuntimeError as e:
                self._fail(step, e)
            if images.device != self.device:
                # CPU pipeline feeding a GPU run: uint8 from pinned memory, without blocking;
                # GPU pipeline feeding a CPU run: a blocking copy (never read before it lands)
                images = to_device(images, self.device)
                labels = to_device(labels, self.device)
            yield self._finish(images, step), labels

    def _next(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batch `step` as (images NCHW in channels-last memory, labels)."""
        images, labels = self._run_dali(step)
        return images.permute(0, 3, 1, 2), labels   # DALI's HWC batch viewed as NCHW, no copy

    def _finish(self, images: torch.Tensor, step: int) -> torch.Tensor:
        return images

    def _run_dali(self, step: int):
        """One DALI batch: (images [B, H, W, 3], labels [B]) from the iterator, or the raw
        pipeline outputs of the CPU train graph. Raises DALI's RuntimeError as is: callers in
        the training thread turn it into one naming the file (_fail); in the producer thread
        it travels to the training thread first."""
        if self._it is not None:
            try:
                out = next(self._it)[0]
            except StopIteration:  # cannot happen with a consistent epoch size; never hang
                raise RuntimeError(f"DALI ended the {self.split} epoch after {step} of "
                                   f"{self._num_batches} batches") from None
            return out["images"], out["labels"].view(-1)
        return self._pipe.run()

    def close(self) -> None:
        """Release the DALI pipeline (and its threads and buffers)."""
        self._it = None
        self._pipe = None
        self._source.close()  # a packed source's read-ahead threads
        self._order = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- internals -------------------------------------------------------------------------

    def _inputs(self, order: np.ndarray):
        """(files, labels) for the pipeline: the ordered file list, or a packed split's feed."""
        return self._source.pipeline_input(order, self.batch_size, self.cfg.num_threads,
                                           self.cfg.prefetch)

    def _start(self, order: np.ndarray, build, *args, iterate: bool = True) -> None:
        """Build the graph `build(files, labels, *args)` over `order`; `iterate`: read it through
        DALI's iterator (else the caller runs the pipeline itself)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._order = order
        try:
            inputs = self._inputs(order)
            self._pipe = build(*inputs, *args)
            if not iterate:
                return
            # The iterator runs the first batches right away (prefetch), overlapping them with
            # whatever the trainer does between set_epoch and the first step.
            # A packed feed (files not a list) sizes its own epoch: the iterator reads it to
            # StopIteration, its last val batch already partial.
            self._it = DALIGenericIterator(
                [self._pipe], ["images", "labels"],
                reader_name=READER_NAME if isinstance(inputs[0], list) else None,
                last_batch_policy=getattr(LastBatchPolicy, self._last_batch),
                auto_reset=self._last_batch == "PARTIAL")
        except RuntimeError as e:
            self._fail(0, e)

    def _fail(self, step: int, error: RuntimeError):
        """Turn a DALI pipeline error into one naming the bad file, then stop.

        Policy for corrupt/truncated/non-image files: the epoch stops with an error naming the
        file (never a skipped sample or a shifted label). DALI's message names only the
        operator, so we re-decode with PIL the files DALI may have been working on: the failing
        batch and the ones prefetched after it (for shards: the members, named with their
        shard). A shard read error (shards.ShardError) already names the file.
        """
        order = self._order if self._order is not None else np.arange(0)
        lo = step * self.batch_size
        hi = (step + self.cfg.prefetch + 2) * self.batch_size
        candidates = order[lo:hi]
        self.close()
        # The error's finished frames (DALI's run, the feeder's read) hold the pipeline: cleared,
        # so that it goes now rather than with a later garbage collection (pack.py's note).
        traceback.clear_frames(error.__traceback__)
        if isinstance(error, shards.ShardError):
            raise error
        bad = self._source.first_bad(candidates)
        if bad is not None:
            path, why = bad
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            dali = next((line for line in lines if line.startswith("Error in")),
                        lines[-1] if lines else "")
            raise BadImageError(f"cannot decode image {path}: {why} (DALI: {dali}); "
                                "`python -m fastdeit.data.verify ROOT` finds every such file "
                                "and keeps them out of training") from error
        raise RuntimeError(
            f"DALI {self.split} pipeline failed at batch {step}; the images it was reading "
            f"({len(candidates)} files from "
            f"{[self._source.describe(i) for i in candidates[:1]]}) decode fine with PIL") from error


class TrainLoader(Loader):
    """The train split: call set_epoch(e[, skip_batches]) before each epoch. Every rank has the
    same len() (the batches of a full epoch; after skip_batches=k, iteration yields len() - k
    of them); the last partial batch is dropped. Batches leave augmented (RandAugment or
    3-Augment) and normalised, at the side `sizes(epoch)` gives.
    """

    split = "train"
    _last_batch = "DROP"

    def __init__(self, cfg: DataConfig, source, batch_size: int, shard: Shard, device: torch.device,
                 placement: Placement, seed: int):
        super().__init__(cfg, source, batch_size, shard, device, placement)
        self.seed = seed
        self._sizes: Optional[SizeSchedule] = None   # see `sizes`
        self.img_size = cfg.img_size    # the current epoch's side (set_epoch)
        self._background: Optional[BackgroundBatches] = None   # CPU layout
        self._ready = False   # set_epoch built a pipeline not yet iterated
        self._epoch = 0
        self._delivered = 0   # batches of the current epoch handed out (skipped ones included)
        self._ahead: Optional[int] = None   # the epoch the CPU feeder goes on into (set_epoch's `then`)
        self._feeding = None  # feeder thread only: (epoch, its DALI pipeline, its side)
        self._normalize = imageops.Normalize(cfg.mean, cfg.std)  # constants kept on the device
        # CPU placement feeding a device: host batches are made in pinned memory (transfer.py)
        self._pin = pins_for(device)
        self.repeats = effective_repeats(cfg.repeated_aug, self.world_size,
                                         cfg.repeated_aug_single_process)
        # The batched augmentation (same sample/apply interface): 3-Augment or RandAugment.
        self.randaug = ThreeAugment.from_config(cfg)
        if self.randaug is None and cfg.rand_augment:
            # timm/DeiT fill the warps with the mean pixel: round(255 * mean)
            fill = [min(255, round(255 * m)) for m in cfg.mean]
            self.randaug = BatchRandAugment(parse_rand_augment(cfg.rand_augment), fill)
        # Same count on every rank (sampler.py), so the same number of batches.
        per_rank = len(train_indices(len(source), self.rank, self.world_size, seed, 0, self.repeats))
        self._num_batches = per_rank // batch_size
        if self._num_batches == 0:
            raise DataError(
                f"train split has {len(source)} images: {per_rank} per rank, fewer than "
                f"batch_size {batch_size}, so an epoch would have no batches")
        self.num_samples = self._num_batches * batch_size

    @property
    def sizes(self) -> SizeSchedule:
        """The side per epoch (schedule.py), an int for every epoch. The composition root sets
        the one rounded to the student's patch size (built after the loader, which tells it the
        class count); until then, and for a loader used on its own, data.size_schedule rounded
        to data.size_multiple or 32."""
        if self._sizes is None:
            self._sizes = size_schedule(self.cfg)
        return self._sizes

    @sizes.setter
    def sizes(self, schedule: SizeSchedule) -> None:
        self._sizes = schedule

    def set_epoch(self, epoch: int, skip_batches: int = 0, then: Optional[int] = None) -> None:
        """Prepare epoch `epoch` at side `sizes(epoch)`; iteration then yields its batches
        skip_batches, skip_batches + 1, ..., len() - 1, identical to those of an uninterrupted
        epoch.

        Skipped batches are decoded and discarded by DALI (its random crop and flip state
        only advances by running), at the cost of that much data loading. The DALI graph is
        built per epoch anyway, so a new size costs nothing extra.

        `then`: the epoch that follows this one (the trainer passes epoch + 1 unless this is the
        last). On the CPU layout its batches are produced ahead: the feeder builds its pipeline
        and goes on into it as soon as it has read this epoch's last batch, while the trainer
        still takes the last ones. They are the batches set_epoch(then) would make (everything
        in them is a function of (seed, epoch, rank, batch)); if the next call asks for anything
        else, or this epoch was not read to its end, they are dropped and it starts afresh.
        """
        if not 0 <= skip_batches <= self._num_batches:
            raise ValueError(f"skip_batches must be in [0, {self._num_batches}], got {skip_batches}")
        if (self._background is not None and self._ahead == epoch and skip_batches == 0
                and self._delivered == self._num_batches):
            self._enter(epoch, 0)               # its batches are on their way already
            self._plan_after(then)
            return
        self.close()
        self._enter(epoch, skip_batches)
        # Ragged crops on the CPU layout (pipeline.py): the pipeline is run directly.
        self._start(self._order, build_train_pipeline, *self._graph(epoch, self.img_size),
                    iterate=self.placement.gpu_layout)
        for step in range(skip_batches):  # decode and discard: see the module docstring
            try:
                self._run_dali(step)
            except RuntimeError as e:
                self._fail(step, e)
        if self._it is None:  # CPU: produce the coming batches in the background (host.py)
            self._feeding, self._pipe = (epoch, self._pipe, self.img_size), None   # the feeder's now
            self._background = BackgroundBatches(
                self._read_host, self._finish_host, [(epoch, s) for s in range(skip_batches, self._num_batches)],
                depth=self.cfg.prefetch, workers=self.cfg.host_threads, open=True)
            self._plan_after(then)
        self._ready = True

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's indices for `epoch` (sampler.py), cut to whole batches."""
        return train_indices(len(self._source), self.rank, self.world_size, self.seed, epoch,
                             self.repeats)[: self.num_samples]

    def _graph(self, epoch: int, size: int) -> tuple:
        """build_train_pipeline's arguments after the inputs, for `epoch` at side `size`."""
        return self.cfg, self.batch_size, dali_seed(self.seed, epoch, self.rank), self.placement, size

    def _enter(self, epoch: int, skip_batches: int) -> None:
        """The consumer's side of a new epoch: its order (for naming a bad file), side, skip."""
        self._order = self._epoch_order(epoch)
        self.img_size = self.sizes(epoch)
        self._epoch, self._skip = epoch, skip_batches
        self._delivered = skip_batches
        self._ready = True

    def _plan_after(self, then: Optional[int]) -> None:
        """Plan epoch `then`'s batches after the current ones (None: the plan ends here)."""
        self._ahead = None
        if then is None:
            self._background.end_plan()
        elif self._background.extend([(then, s) for s in range(self._num_batches)]):
            self._ahead = then

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if not self._ready:
            # Iterating twice would silently replay (or skip) an epoch's data order.
            raise RuntimeError("TrainLoader.set_epoch(epoch) must be called before each epoch")
        self._ready = False
        return self._batches()

    def _next(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        batch = self._background.get() if self._background is not None else super()._next(step)
        self._delivered = step + 1
        return batch

    def _finish(self, images: torch.Tensor, step: int) -> torch.Tensor:
        # Still uint8: not yet augmented (the CPU layout augments CPU batches in its pool).
        return self._augment(images, self._epoch, step) if images.dtype == torch.uint8 else images

    def _augment(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> RandAugment -> normalised float32, on the images' device."""
        if self.randaug is not None:
            gen = torch.Generator().manual_seed(
                augment_seed(self.seed, epoch, self.rank, step))
            b, _, h, w = images.shape
            plan = self.randaug.sample(b, h, w, gen).to(images.device)
            images = self.randaug.apply(images, plan)
        return self._normalize(images)

    def _read_host(self, key: Tuple[int, int], run_all) -> Tuple[torch.Tensor, torch.Tensor]:
        """CPU placement, feeder thread: DALI's crops for batch `key` = (epoch, step), resized and
        flipped (uint8 NCHW in channels-last memory) before DALI's next run reuses their buffers;
        the resizes are shared out over this thread and the host pool (host_threads slices), so
        that no single thread carries them as a serial stage while DALI decodes the next batches.
        The first batch of a planned next epoch builds that epoch's pipeline here, once the
        previous one has given its last batch (and is released first)."""
        epoch, step = key
        if self._feeding[0] != epoch:
            self._feeding = None          # the finished epoch's pipeline goes first ...
            self._source.close()          # ... and a packed source's read-ahead for it
            size = self.sizes(epoch)
            pipe = build_train_pipeline(*self._inputs(self._epoch_order(epoch)), *self._graph(epoch, size))
            self._feeding = (epoch, pipe, size)
        _, pipe, size = self._feeding
        crops, labels, flips = pipe.run()
        images = resize_crops(crops, flips.as_array(), size, pin=self._pin,
                              slices=self.cfg.host_threads, run_all=run_all)
        labels = torch.from_numpy(labels.as_array().reshape(-1))
        return images.permute(0, 3, 1, 2), (labels.pin_memory() if self._pin else labels)

    def _finish_host(self, key: Tuple[int, int], batch):
        """CPU placement, pool thread: RandAugment + normalisation when the batches are for the
        CPU (for a GPU they are augmented there, in the training thread)."""
        images, labels = batch
        if self.device.type == "cpu":
            images = self._augment(images, *key)
        return images, labels

    def close(self) -> None:
        if self._background is not None:
            self._background.close()
            self._background = None
        self._feeding = None
        self._ahead = None
        super().close()
        self._ready = False


class ValLoader(Loader):
    """The val split: unshuffled and seedless, at data.img_size; each sample is seen exactly
    once over all ranks; the last batch may be partial. One pipeline is kept across
    evaluations and rebuilt only if an evaluation was abandoned part way (DALI cannot rewind a
    reader mid-epoch). set_epoch is accepted and does nothing (no randomness)."""

    split = "val"
    _last_batch = "PARTIAL"

    def __init__(self, cfg: DataConfig, source, batch_size: int, shard: Shard, device: torch.device,
                 placement: Placement):
        super().__init__(cfg, source, batch_size, shard, device, placement)
        self.repeats = 1
        self.num_samples = len(val_indices(len(source), self.rank, self.world_size))
        self._num_batches = math.ceil(self.num_samples / batch_size)
        self._clean = False   # the kept pipeline sits at an epoch start

    def set_epoch(self, epoch: int, skip_batches: int = 0, then: Optional[int] = None) -> None:
        """Nothing to do: val order and transforms do not depend on the epoch (the signature is
        the train loader's, so that code walking both needs no branch)."""
        if skip_batches:
            raise ValueError("skip_batches applies to the train loader only")

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.num_samples == 0:
            return iter(())
        if not self._clean:
            self.close()
            order = val_indices(len(self._source), self.rank, self.world_size)
            self._start(order, build_val_pipeline, self.cfg, self.batch_size, self.placement)
        self._clean = False
        return self._epoch_to_end()

    def _epoch_to_end(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        yield from self._batches()
        try:  # run the iterator to its end so it auto-resets for the next evaluation
            next(self._it)
        except StopIteration:
            self._clean = True

    def close(self) -> None:
        super().close()
        self._clean = False
