"""Packed splits: a class-folder tree stored as tar shards, read by index (pack.py writes them).

On cluster filesystems 1.28 M small-file opens per epoch load the metadata server long before
bandwidth runs out; a few hundred shards opened once per run do not. Layout of a packed root:

    manifest.json                   format and version, the splits; marks the folder as packed
    <split>/shard-000000.tar ...    plain tar (webdataset layout, so other tools read it too):
                                    <key>.jpg, the source file's bytes, and <key>.cls, the label
                                    in ASCII; key = the image's index in ImageFolder order (%08d)
    <split>/index.npz               per image: shard, data offset, size, label, source path; per
                                    shard: name and size; class names in ImageFolder order

Image i of a split is bytes [offset, offset + size) of its shard, so reading follows any order
the sampler decides, with one positioned read per image (never a scan), and the loader sees
the same images, labels and order as from the folder. The read includes the member's 512-byte
tar header, checked against the index on every read: an index that does not match its shards
fails naming both instead of feeding wrong bytes or labels.

Why not DALI's readers: `fn.readers.webdataset` reads each archive front to back (shuffling
only inside a buffer) and no DALI reader takes an explicit per-sample order over byte ranges.
DALI's parallel external source runs callbacks in worker processes started per pipeline, and
the loader builds a pipeline per epoch: fork is refused once CUDA is initialised, and spawn
re-imports the entry point (torch included), 20 s to the first batch on the 2-core dev box.
So the pipeline's `external_source` takes batches from ShardFeed, which reads them ahead in a
thread pool (os.preadv releases the GIL): the training thread only hands over finished reads.
"""
from __future__ import annotations

import collections
import json
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import DataError
from ..imagecheck import check_image_bytes
from .folder import list_entries

FORMAT = "fastdeit-shards"
VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.npz"
HEADER = 512            # a tar member header (ustar, short names: no extension headers)


class ShardError(DataError, RuntimeError):
    """A packed split is unreadable or inconsistent; the message names the file. Raised at start
    alike on every rank; raised by a read mid-epoch with every_rank=False (only the rank whose
    shard it is meets it, so that rank reports it)."""


def member_name(key: int, ext: str = "jpg") -> str:
    return f"{key:08d}.{ext}"


def is_packed(root: str) -> bool:
    """True if `root` holds a manifest (python -m fastdeit.data.pack output). A split folder
    with an index but no manifest is an unfinished pack: an error, not a class-folder tree."""
    if os.path.isfile(os.path.join(root, MANIFEST)):
        return True
    if os.path.isdir(root):
        for entry in os.scandir(root):
            if entry.is_dir() and os.path.isfile(os.path.join(entry.path, INDEX)):
                raise ValueError(f"{root} is an unfinished pack ({entry.path}/{INDEX} but no "
                                 f"{MANIFEST}): rerun python -m fastdeit.data.pack to finish it")
    return False


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path} is {FORMAT} version {manifest.get('version')}; this fastdeit "
                         f"reads version {VERSION}: re-pack with python -m fastdeit.data.pack")
    return manifest


def split_classes(root: str, split: str) -> Optional[List[str]]:
    """Class names of a packed split, None if the manifest has no such split."""
    entry = read_manifest(root)["splits"].get(split)
    return None if entry is None else list(entry["classes"])


class PackedSplit:
    """One split's index, checked against the manifest and the shards on disk (sizes by stat,
    no file opened), plus positioned reads of its images. Shards are opened on first use and
    kept open, so each process opens only the shards its images live in, once per run."""

    def __init__(self, root: str, split: str):
        manifest = read_manifest(root)
        entry = manifest["splits"].get(split)
        if entry is None:
            raise ShardError(f"{os.path.join(root, MANIFEST)} has no split {split!r} (it has "
                             f"{sorted(manifest['splits'])})")
        self.folder = os.path.join(root, split)
        self.index_path = os.path.join(self.folder, INDEX)
        try:
            with np.load(self.index_path, allow_pickle=False) as z:
                index = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ShardError(f"cannot read the index {self.index_path}: {e}") from None
        self._check_index(index, entry)
        self.classes = [str(c) for c in index["classes"]]
        self.shard_paths = [os.path.join(self.folder, str(n)) for n in index["shard_names"]]
        self.shard_bytes = index["shard_bytes"]
        self.shard, self.offset = index["shard"], index["offset"]
        self.size, self.labels = index["size"], index["label"]
        self._paths_blob = index["paths"]
        self._paths: Optional[List[str]] = None
        self._check_shards()
        self._fds: Dict[int, int] = {}
        self._lock = threading.Lock()
        weakref.finalize(self, _close_fds, self._fds)

    def _check_index(self, index: dict, entry: dict) -> None:
        where = self.index_path
        need = ("version", "classes", "shard_names", "shard_bytes", "shard", "offset", "size",
                "label", "paths")
        missing = [k for k in need if k not in index]
        if missing:
            raise ShardError(f"{where} lacks {missing}: not a {FORMAT} index")
        if int(index["version"]) != VERSION:
            raise ShardError(f"{where} is index version {int(index['version'])}, expected "
                             f"{VERSION}: re-pack")
        n = len(index["label"])
        if not all(len(index[k]) == n for k in ("shard", "offset", "size")):
            raise ShardError(f"{where}: per-image arrays of different lengths")
        if n != entry.get("images") or len(index["shard_names"]) != entry.get("shards"):
            raise ShardError(f"{where} ({n} images, {len(index['shard_names'])} shards) does not "
                             f"match the manifest ({entry.get('images')} images, "
                             f"{entry.get('shards')} shards)")
        if [str(c) for c in index["classes"]] != list(entry.get("classes", [])):
            raise ShardError(f"{where}: class names differ from the manifest's")
        shard = index["shard"]
        if n and (shard.min() < 0 or shard.max() >= len(index["shard_names"])):
            raise ShardError(f"{where}: an image points past the shard list")
        end = index["offset"] + index["size"]
        if n and (index["offset"].min() < HEADER or
                  (end > index["shard_bytes"][shard]).any()):
            raise ShardError(f"{where}: an image lies outside its shard")
        if n and (index["label"].min() < 0 or index["label"].max() >= len(index["classes"])):
            raise ShardError(f"{where}: a label outside the class list")

    def _check_shards(self) -> None:
        for path, expected in zip(self.shard_paths, self.shard_bytes):
            try:
                actual = os.stat(path).st_size
            except OSError as e:
                raise ShardError(f"shard missing or unreadable: {path} ({e.strerror}); the index "
                                 f"{self.index_path} lists it") from None
            if actual != expected:
                what = "truncated" if actual < expected else "longer than packed"
                raise ShardError(f"shard {path} is {what}: {actual} bytes, the index "
                                 f"{self.index_path} says {int(expected)}; re-pack it")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def paths(self) -> List[str]:
        """Source paths relative to the split folder (as packed), in index order."""
        if self._paths is None:
            self._paths = self._paths_blob.tobytes().decode("utf-8").split("\n")
        return self._paths

    def describe(self, i: int) -> str:
        return (f"{self.shard_paths[self.shard[i]]} member {member_name(i)} "
                f"(packed from {self.paths[i]})")

    def read(self, i: int) -> bytes:
        buf = bytearray(HEADER + int(self.size[i]))
        self.read_into(memoryview(buf), i)
        return bytes(buf[HEADER:])

    def read_into(self, view: memoryview, i: int) -> None:
        """Header + bytes of image i into `view` (HEADER + size bytes), the header checked."""
        shard = int(self.shard[i])
        start = int(self.offset[i]) - HEADER
        got = os.preadv(self._fd(shard), [view], start)
        if got != len(view):
            raise ShardError(f"short read from {self.shard_paths[shard]} at byte {start}: "
                             f"{got} of {len(view)} bytes (truncated since it was checked?)", every_rank=False)
        header = bytes(view[:HEADER])
        name = header[:100].split(b"\0", 1)[0]
        expected = member_name(i).encode()
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"-1", 8)
        except ValueError:
            size = -1
        if name != expected or size != len(view) - HEADER:
            raise ShardError(
                f"the index {self.index_path} does not match shard {self.shard_paths[shard]}: "
                f"at byte {start} it expects member {expected.decode()} of {len(view) - HEADER} "
                f"bytes, the shard has {name.decode(errors='replace')!r} of {size}; re-pack", every_rank=False)

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    path = self.shard_paths[shard]
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    except OSError as e:
                        raise ShardError(f"cannot open shard {path}: {e.strerror}", every_rank=False) from None
                    # Reads are random and exact: kernel read-ahead would fetch bytes of
                    # other images that are not wanted now.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    self._fds[shard] = fd
        return fd


def _close_fds(fds: Dict[int, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class ShardSource:
    """The loader's view of a packed split (or of the subset a file list names): labels and
    classes for the sampler, a DALI input per pipeline, and the error path's re-check."""

    def __init__(self, split: PackedSplit, keys: Optional[np.ndarray] = None):
        self.split = split
        self.keys = np.arange(len(split)) if keys is None else np.asarray(keys, dtype=np.int64)
        self.labels = split.labels[self.keys].astype(np.int64)
        self.classes = split.classes
        self._feeds: "weakref.WeakSet[ShardFeed]" = weakref.WeakSet()

    def __len__(self) -> int:
        return len(self.keys)

    def pipeline_input(self, order: np.ndarray, batch_size: int, threads: int, prefetch: int):
        """(files, labels) for pipeline.py: a ShardFeed for `order` in place of the file list,
        reading 2 batches further ahead than DALI's prefetch and holding what DALI reads."""
        feed = ShardFeed(self.split, self.keys[order], batch_size, threads,
                         read_ahead=prefetch + 2, keep=prefetch + 4)
        self._feeds.add(feed)
        return feed, None

    def first_bad(self, indices: Sequence[int]) -> Optional[Tuple[str, str]]:
        """(name, reason) of the first of these images that does not decode, else None."""
        for i in indices:
            key = int(self.keys[i])
            why = check_image_bytes(self.split.read(key))
            if why is not None:
                return self.split.describe(key), why
        return None

    def describe(self, i: int) -> str:
        return self.split.describe(int(self.keys[i]))

    def close(self) -> None:
        """Stop the read-ahead threads (open shards stay open for the next epoch)."""
        for feed in list(self._feeds):
            feed.close()


def open_split(root: str, split: str, file_list: Optional[str] = None) -> ShardSource:
    """The packed split `root/split`, all of it or the images `file_list` names (one path per
    line relative to the split folder, as for a class-folder tree; labels from the index)."""
    packed = PackedSplit(root, split)
    if not file_list:
        return ShardSource(packed)
    where_of = {p: i for i, p in enumerate(packed.paths)}
    keys = []
    for where, parts in list_entries(file_list, packed.folder):
        key = where_of.get("/".join(parts))       # the index holds the paths with '/'
        if key is None:
            raise DataError(f"{where} is not an image of the packed split {packed.folder}")
        keys.append(key)
    if not keys:
        raise DataError(f"file list {file_list} names no images")
    return ShardSource(packed, np.asarray(keys))


class ShardFeed:
    """DALI external_source callback (batch mode): batch `iteration` of `keys`, as (image bytes
    per sample, int32 labels [n, 1]), the same outputs as fn.readers.file's.

    Reads run `read_ahead` batches ahead of DALI's requests in `threads` threads, each image one
    positioned read into one buffer per batch. DALI asks for a batch `prefetch` iterations
    before the loader consumes it, so with read_ahead > prefetch the training thread does not
    wait on storage; the call itself only hands over ready DALI tensors that view the buffer
    (pipeline.py feeds them with no_copy: copying a 256-image batch cost ~20 ms of the calling
    thread, handing views over ~2 ms). The buffers of the last `keep` batches are held here
    until DALI is done with them. The last batch may be partial (val); after it every call
    raises StopIteration, and a new DALI epoch (val's auto reset) reads again from 0.
    """

    def __init__(self, split: PackedSplit, keys: np.ndarray, batch_size: int, threads: int,
                 read_ahead: int, keep: int):
        self.split, self.keys, self.batch_size = split, keys, batch_size
        self.num_batches = -(-len(keys) // batch_size)
        self.read_ahead = max(1, read_ahead)
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fastdeit-shards")
        self._pending: Dict[int, tuple] = {}
        self._fed: collections.deque = collections.deque(maxlen=max(2, keep))
        self._submit_upto(min(self.read_ahead, self.num_batches))

    def __call__(self, info) -> Tuple[list, np.ndarray]:
        i = info.iteration
        if i >= self.num_batches:
            raise StopIteration
        self._submit_upto(min(i + 1 + self.read_ahead, self.num_batches), start=i)
        buf, labels, tasks = self._pending.pop(i)
        # result() re-raises a read error (a ShardError names the file)
        images = [image for task in tasks for image in task.result()]
        self._fed.append((buf, images, labels))
        return images, labels

    def _submit_upto(self, stop: int, start: int = 0) -> None:
        for i in range(start, stop):
            if i not in self._pending:
                self._pending[i] = self._submit(i)

    def _submit(self, i: int) -> tuple:
        keys = self.keys[i * self.batch_size: (i + 1) * self.batch_size]
        sizes = self.split.size[keys]
        spans = sizes + HEADER
        starts = np.concatenate(([0], np.cumsum(spans)[:-1])).astype(np.int64)
        buf = np.empty(int(spans.sum()), dtype=np.uint8)
        labels = self.split.labels[keys].astype(np.int32).reshape(-1, 1)
        per = -(-len(keys) // self.threads)  # one task per thread: all of them read at once
        tasks = [self._pool.submit(_read_chunk, self.split, buf, keys[a:a + per],
                                   starts[a:a + per], sizes[a:a + per])
                 for a in range(0, len(keys), per)]
        return buf, labels, tasks

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._fed.clear()


def _read_chunk(split: PackedSplit, buf: np.ndarray, keys, starts, sizes) -> list:
    """Read images into their places in `buf`; DALI tensors viewing their bytes."""
    from nvidia.dali.tensors import TensorCPU

    view = memoryview(buf)
    images = []
    for key, start, size in zip(keys.tolist(), starts.tolist(), sizes.tolist()):
        split.read_into(view[start:start + HEADER + size], key)
        images.append(TensorCPU(buf[start + HEADER:start + HEADER + size]))
    return images
