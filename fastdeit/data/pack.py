"""Pack a class-folder tree into tar shards: python -m fastdeit.data.pack ROOT OUT.

    python -m fastdeit.data.pack /data/imagenet /data/imagenet-packed [--shard-size 1GB]
        [--workers N] [--splits train,val]

writes OUT/<split>/shard-NNNNNN.tar (webdataset layout), OUT/<split>/index.npz and, once every
split is complete, OUT/manifest.json (the format is described in shards.py). `data.root: OUT`
then trains and evaluates exactly as `data.root: ROOT` did (same images, labels and batches).

- Images keep ImageFolder's indices and labels (folder.scan_image_folder); their placement in
  the shards is a fixed shuffle, so that tools streaming the shards in order (webdataset, timm)
  see mixed classes. The file bytes are copied, never re-encoded.
- Every image is verified as it is packed (imagecheck.check_image_bytes, the loader's and the
  verifier's check): files that do not decode are listed together at the end, nothing is
  skipped, and no manifest is written until they are fixed.
- The manifest lists the sha256 of each split's index and shards (read back once at the end),
  which data.stage_to checks its node-local copies against; manifests from before have none and
  still load (python -m fastdeit.data.stage ROOT --add-checksums adds them).
- Shards are written by `--workers` processes, each into shard-NNNNNN.tar.partial, flushed to
  disk and then renamed. The layout is planned up front from the file sizes (index.npz is
  written first), so an interrupted run resumes: rerunning the same command keeps the
  finished shards and writes the rest. If the tree changed since an unfinished run, that
  split starts over; a finished pack of something else is never overwritten.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import multiprocessing
import os
import queue
import re
import sys
import tarfile
import time
import zipfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .loading.folder import scan_image_folder
from .imagecheck import check_image_bytes
from .loading.shards import FORMAT, HEADER, INDEX, MANIFEST, VERSION, member_name
from .stage import manifest_checksums

PLACEMENT_SEED = 0
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '512MiB' -> 2**29, '4096' -> 4096."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]I?)?B?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 1GB, 500MB, 256MiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if size < 4 * HEADER:
        raise ValueError(f"shard size {text!r} is too small")
    return size


def _padded(n):
    return (n + HEADER - 1) // HEADER * HEADER


def tar_bytes(content: int) -> int:
    """Size of a tar file whose members take `content` bytes: tarfile ends it with two zero
    blocks and pads it to a whole record."""
    return -(-(content + 2 * HEADER) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


@dataclass
class Plan:
    """Where every image of a split goes. Keys are ImageFolder indices."""
    folder: str
    classes: List[str]
    files: List[str]            # absolute source paths
    labels: np.ndarray          # int64 [N]
    size: np.ndarray            # int64 [N] file sizes
    shard: np.ndarray           # int32 [N]
    offset: np.ndarray          # int64 [N] data offset in the shard
    shard_bytes: np.ndarray     # int64 [S]
    members: List[np.ndarray]   # per shard: keys in write order

    def index_arrays(self) -> Dict[str, np.ndarray]:
        rel = [os.path.relpath(f, self.folder).replace(os.sep, "/") for f in self.files]
        return dict(
            version=np.int64(VERSION), classes=np.asarray(self.classes),
            shard_names=np.asarray([shard_name(s) for s in range(len(self.members))]),
            shard_bytes=self.shard_bytes, shard=self.shard, offset=self.offset, size=self.size,
            label=self.labels,
            paths=np.frombuffer("\n".join(rel).encode("utf-8"), dtype=np.uint8))


def shard_name(s: int) -> str:
    return f"shard-{s:06d}.tar"


def plan_split(folder: str, shard_size: int, threads: int = 16) -> Plan:
    files, labels, classes = scan_image_folder(folder)
    with ThreadPoolExecutor(threads) as pool:  # stat calls: latency-bound on network storage
        chunks = [files[i:i + 4096] for i in range(0, len(files), 4096)]
        size = np.fromiter((s for sizes in pool.map(_sizes, chunks) for s in sizes),
                           dtype=np.int64, count=len(files))
    n = len(files)
    placement = np.random.default_rng(PLACEMENT_SEED).permutation(n)
    # member = header + padded bytes, then the .cls member: header + one block
    span = (HEADER + _padded(size) + 2 * HEADER).tolist()
    shard = np.empty(n, dtype=np.int32)
    offset = np.empty(n, dtype=np.int64)
    members, shard_bytes, current, pos = [], [], [], 0
    for key in placement.tolist():
        if current and tar_bytes(pos + span[key]) > shard_size:
            members.append(np.asarray(current, dtype=np.int64))
            shard_bytes.append(tar_bytes(pos))
            current, pos = [], 0
        shard[key], offset[key] = len(members), pos + HEADER
        current.append(key)
        pos += span[key]
    members.append(np.asarray(current, dtype=np.int64))
    shard_bytes.append(tar_bytes(pos))
    return Plan(folder, classes, files, np.asarray(labels, dtype=np.int64), size, shard, offset,
                np.asarray(shard_bytes, dtype=np.int64), members)


def _sizes(paths: Sequence[str]) -> List[int]:
    return [os.stat(p).st_size for p in paths]


# -- writing one shard (in a worker process) ------------------------------------------------

_progress: Callable[[int], None] = lambda n: None


def _init_worker(q) -> None:
    global _progress
    _progress = q.put


def write_shard(path: str, members: List[Tuple[str, int, int, int, int]]) -> List[Tuple[str, str]]:
    """Write one shard: members are (source path, key, label, size, data offset). Returns the
    files that do not decode as [(path, reason)]: then no shard is left behind. Every file is
    checked even after a bad one, so that one run lists them all."""
    partial = path + ".partial"
    bad: List[Tuple[str, str]] = []
    try:
        with open(partial, "wb") as f:
            tar = tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT)
            for done, (src, key, label, size, offset) in enumerate(members, start=1):
                why, data = _load(src, size)
                if why is not None:
                    bad.append((src, why))
                elif not bad:
                    if tar.offset + HEADER != offset:
                        raise RuntimeError(f"internal: {path}: {src} at {tar.offset + HEADER}, "
                                           f"planned at {offset}")
                    _add(tar, member_name(key), data)
                    _add(tar, member_name(key, "cls"), str(label).encode())
                if done % 32 == 0 or done == len(members):
                    _progress(32 if done % 32 == 0 else done % 32)
            tar.close()
            f.flush()
            os.fsync(f.fileno())
        if not bad:
            os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return bad


def _load(src: str, size: int) -> Tuple[Optional[str], bytes]:
    try:
        with open(src, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"{type(e).__name__}: {e}", b""
    if len(data) != size:
        return f"changed while packing ({size} bytes when planned, {len(data)} now)", b""
    return check_image_bytes(data), data


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # byte-identical reruns
    tar.addfile(info, io.BytesIO(data))


# -- the whole pack -------------------------------------------------------------------------

def pack(root: str, out: str, shard_size: int = 10**9, workers: Optional[int] = None,
         splits: Sequence[str] = ("train", "val"), progress: bool = True) -> dict:
    """Pack ROOT/<split> for each split that exists into OUT; returns the manifest."""
    from tqdm import tqdm

    root, out = os.path.abspath(root), os.path.abspath(out)
    if not os.path.isdir(root):
        raise ValueError(f"not a folder: {root}")
    if os.path.isfile(os.path.join(root, MANIFEST)):
        raise ValueError(f"{root} is already packed")
    present = [s for s in splits if os.path.isdir(os.path.join(root, s))]
    if not present:
        raise ValueError(f"none of the split folders {list(splits)} exists in {root}")
    workers = workers or len(os.sched_getaffinity(0))
    finished = _finished_manifest(out)
    os.makedirs(out, exist_ok=True)

    plans = {s: plan_split(os.path.join(root, s), shard_size) for s in present}
    jobs, todo_images = [], 0
    for split, plan in plans.items():
        folder = os.path.join(out, split)
        os.makedirs(folder, exist_ok=True)
        _prepare_index(folder, plan, finished)
        for s, keys in enumerate(plan.members):
            path = os.path.join(folder, shard_name(s))
            if os.path.isfile(path) and os.path.getsize(path) == plan.shard_bytes[s]:
                continue  # finished by an earlier run (written whole, then renamed)
            members = [(plan.files[k], k, int(plan.labels[k]), int(plan.size[k]),
                        int(plan.offset[k])) for k in keys.tolist()]
            jobs.append((path, members))
            todo_images += len(members)
    total = sum(len(p.files) for p in plans.values())
    bad: List[Tuple[str, str]] = []
    with tqdm(total=total, initial=total - todo_images, unit="img", desc="packing",
              disable=not progress, smoothing=0.05) as bar:
        if workers == 1 or len(jobs) <= 1:
            global _progress
            _progress = bar.update
            try:
                for path, members in jobs:
                    bad += write_shard(path, members)
            finally:
                _progress = lambda n: None
        else:
            bad = _run_pool(jobs, workers, bar)
    if bad:
        listing = "\n".join(f"  {path}: {why}" for path, why in sorted(bad))
        raise ValueError(f"{len(bad)} files do not decode as images; fix or remove them and "
                         f"rerun (the finished shards are kept):\n{listing}")
    for split, plan in plans.items():  # every shard whole before the manifest says so
        for s, expected in enumerate(plan.shard_bytes):
            path = os.path.join(out, split, shard_name(s))
            if os.path.getsize(path) != expected:
                raise RuntimeError(f"{path} is {os.path.getsize(path)} bytes, planned {expected}")
    manifest = {
        "format": FORMAT, "version": VERSION, "source": root, "shard_size": shard_size,
        "placement_seed": PLACEMENT_SEED,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "splits": {},
    }
    if finished is not None and finished.get("version") == VERSION:  # splits packed before
        manifest["splits"].update({s: e for s, e in finished["splits"].items()
                                   if os.path.isfile(os.path.join(out, s, INDEX))})
    # sha256 of each index and shard: data.stage_to checks its copies against them (stage.py).
    sums = manifest_checksums(out, plans)
    manifest["splits"].update({
        split: {"images": len(plan.files), "shards": len(plan.members),
                "bytes": int(plan.shard_bytes.sum()), "classes": plan.classes,
                "index": f"{split}/{INDEX}", "sha256": sums[split]} for split, plan in plans.items()})
    _write_atomic(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def _run_pool(jobs, workers: int, bar) -> List[Tuple[str, str]]:
    # fork: the workers need nothing but this module's functions, and spawn would re-import
    # the package (torch and DALI come with fastdeit.data) in every worker.
    ctx = multiprocessing.get_context("fork")
    # Nothing left for the children's garbage collector: an object waiting in a reference cycle
    # with a finaliser that joins threads (a DALI pipeline kept by an error's traceback) would be
    # finalised in each child, where its threads were never copied, and hang it.
    gc.collect()
    updates = ctx.Queue()
    bad: List[Tuple[str, str]] = []
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(updates,)) as pool:
        pending = {pool.submit(write_shard, path, members) for path, members in jobs}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(updates, bar)
                for future in done:
                    bad += future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        _drain(updates, bar)
    return bad


def _drain(updates, bar) -> None:
    while True:
        try:
            bar.update(updates.get_nowait())
        except queue.Empty:
            return


def _finished_manifest(out: str) -> Optional[dict]:
    path = os.path.join(out, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest.get("splits"), dict):
            raise ValueError("no splits")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a readable manifest ({e}); pack into a new folder "
                         f"or delete it") from None
    return manifest


def _prepare_index(folder: str, plan: Plan, finished: Optional[dict]) -> None:
    """Write the split's index, or check that the one there describes this same plan."""
    path = os.path.join(folder, INDEX)
    arrays = plan.index_arrays()
    _remove(folder, r"shard-\d{6}\.tar\.partial")  # left by a killed run
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as z:
            same = set(z.files) == set(arrays) and all(
                np.array_equal(z[k], v) for k, v in arrays.items())
        if same:
            return
        if finished is not None:
            raise ValueError(f"{os.path.dirname(folder)} holds a finished pack of another tree "
                             f"or with another --shard-size ({path} differs); pack into a new "
                             f"folder or delete it")
        print(f"{folder}: the tree changed since the unfinished pack there; starting this "
              f"split over", file=sys.stderr)
    elif finished is not None and os.path.basename(folder) in finished.get("splits", {}):
        raise ValueError(f"{path} is missing from a finished pack; delete {folder} to repack it")
    _remove(folder, r"shard-\d{6}\.tar")  # shards of an older plan
    _write_atomic(path, _npz_bytes(arrays))


def _remove(folder: str, pattern: str) -> None:
    for entry in os.scandir(folder):
        if re.fullmatch(pattern, entry.name):
            os.remove(entry.path)


def _npz_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    """np.savez's layout (np.load reads it) with fixed timestamps: a rerun writes the same
    bytes, so packs of the same tree can be compared by checksum."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return buf.getvalue()


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdeit.data.pack",
                                description=__doc__.split("\n")[0])
    p.add_argument("root", help="folder holding <split>/<class>/<image>")
    p.add_argument("out", help="output folder (created; rerun the same command to resume)")
    p.add_argument("--shard-size", default="1GB", help="target shard size (default 1GB)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes writing shards (default: the cores this process may use)")
    p.add_argument("--splits", default="train,val",
                   help="comma-separated split folders to pack, those present (default train,val)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = pack(args.root, args.out, parse_size(args.shard_size), args.workers,
                        [s for s in args.splits.split(",") if s], progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['images']} images, {len(entry['classes'])} classes, "
              f"{entry['shards']} shards, {entry['bytes'] / 1e9:.2f} GB")
    print(f"packed into {os.path.abspath(args.out)} in {time.perf_counter() - start:.0f} s; "
          f"set data.root to it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
