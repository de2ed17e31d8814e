"""Data staged to node-local disk (``data.stage_to``): one copy per node, checked, then trained from.

On a shared filesystem the shards are read over the network every epoch by every rank; NVIDIA
measured DALI at 2.1-2.5x over a PyTorch loader reading from a shared filesystem and 4.8-5x after
staging the data to local NVMe. With ``data.stage_to: /local/path`` training reads
``/local/path/<name of data.root>`` instead:

* Local rank 0 of each node copies; the node's other ranks, and every other node, wait for all
  copies in one barrier (below). The copy holds a packed root's ``manifest.json``, the train
  and val splits' ``index.npz`` and shards, and ``verify_excluded.txt`` when there is one; of a
  class-folder root, the two split folders and that list. The manifest is copied last.
* Checked: a packed root's manifest lists a sha256 per file (``pack.py`` writes them; an older
  manifest has none, then sizes are checked and the log says how to add them:
  ``python -m fastdeit.data.stage ROOT --add-checksums``). Each file is hashed as it is written
  and compared with the manifest before it takes its final name. A mismatch is copied once more
  (a flaky network read); a second mismatch means the source differs from its pack, and stops
  the run with one line naming the file: copying it again cannot help.
* Reused and resumed: each file is written to ``<name>.partial``, flushed, and renamed; a journal
  (``.fastdeit-stage/journal.jsonl`` in the copy) records it with its size, sha256 and both
  mtimes. At the next start a file is kept when its journal line still matches the source
  (size, mtime, manifest sha256) and the copy on disk (size, mtime); anything else is copied
  again: a file torn by a crash, truncated or rewritten since. A ``.partial`` left by a killed
  copy is resumed from its length (its bytes are hashed first, so a damaged prefix fails the
  checksum and is copied whole). An intact complete copy costs one stat per file.
* What a quick check cannot see: a local file whose bytes change without its size or mtime
  changing. The loader checks each image's tar header against the index on every read, which
  catches misplaced bytes but not flipped pixels.
* The copy's time, size and rate are printed by the node that made it.

``data.stage_to`` may name environment variables (``$SLURM_TMPDIR/imagenet``, ``/scratch/$USER``),
expanded on each node: per-job local folders, and in the tests two "nodes" on one host.

The barrier: every rank adds itself to a counter in the job's rendezvous store (the store the
process group was created from) once its node's copy is done, and polls it until all have.
It is not a collective, so a copy longer than ``distributed.timeout_minutes`` does not time out
(a dead copier is still reported by the heartbeat); a copier that fails publishes its message
there, and every rank stops with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import ConfigError, DataError, FastDeitError
from .loading.folder import EXCLUDE_FILE
from .loading.shards import INDEX, MANIFEST

STATE = ".fastdeit-stage"           # inside the copy: journal, source record, lock
CHUNK = 8 << 20
THREADS = 8                         # copies in flight: latency-bound on a network filesystem
FSYNC_BYTES = 1 << 20               # shards and indexes are flushed before their rename; small images are not
STORE_PREFIX = "fastdeit/stage/"


# --------------------------------------------------------------------------- checksums


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                return h.hexdigest()
            h.update(block)


def sha256_files(paths: Sequence[str], threads: int = THREADS) -> List[str]:
    """sha256 of each file, several at once (hashlib releases the GIL on large blocks)."""
    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as pool:
        return list(pool.map(sha256_file, paths))


def manifest_checksums(root: str, splits: Iterable[str]) -> Dict[str, Dict[str, str]]:
    """{split: {file name: sha256}} of each split's index and shards: what pack.py puts in the
    manifest (``splits.<split>.sha256``)."""
    import numpy as np

    names = {}
    for split in splits:
        with np.load(os.path.join(root, split, INDEX), allow_pickle=False) as z:
            names[split] = [INDEX, *(str(n) for n in z["shard_names"])]
    flat = [(s, n) for s, ns in names.items() for n in ns]
    digests = sha256_files([os.path.join(root, s, n) for s, n in flat])
    out: Dict[str, Dict[str, str]] = {s: {} for s in names}
    for (s, n), d in zip(flat, digests):
        out[s][n] = d
    return out


def add_checksums(root: str) -> dict:
    """Write the sha256 of every index and shard into ROOT's manifest (packed before pack.py
    recorded them). Rewritten whole, atomically; loaders that do not know the key ignore it."""
    path = os.path.join(root, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    for split, sums in manifest_checksums(root, manifest["splits"]).items():
        manifest["splits"][split]["sha256"] = sums
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return manifest


# --------------------------------------------------------------------------- what to copy


@dataclass(frozen=True)
class Item:
    rel: str                        # path inside the root, '/'-separated
    size: int
    mtime_ns: int                   # the source's
    sha256: Optional[str]           # from the manifest; None: sizes only


def destination(root: str, stage_to: str, environ=os.environ) -> str:
    """``stage_to`` with its variables expanded here, plus the root's folder name."""
    expanded = os.path.expanduser(_expand(stage_to, environ))
    if "$" in expanded:
        raise ConfigError(f"data.stage_to={stage_to}: {expanded!r} still holds a '$': a variable it names is not "
                          "set in this environment (it is expanded on each node)")
    src = os.path.abspath(root)
    dest = os.path.join(os.path.abspath(expanded), os.path.basename(os.path.normpath(src)))
    if _inside(dest, src) or _inside(src, dest):
        raise ConfigError(f"data.stage_to={stage_to}: the copy {dest} and data.root {src} overlap")
    return dest


def _expand(text: str, environ) -> str:
    """$VAR and ${VAR} from ``environ``; unset ones stay as written (and are reported)."""
    import re

    return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: environ.get(m.group(1) or m.group(2), m.group(0)), text)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def listing(root: str, splits: Sequence[str]) -> Tuple[List[Item], bool]:
    """The files to stage (the manifest last) and whether the manifest had checksums for them."""
    from .loading.shards import is_packed, read_manifest

    root = os.path.abspath(root)
    rels: List[str] = []
    sums: Dict[str, str] = {}
    checked = True
    try:
        packed = is_packed(root)
    except ValueError as e:
        raise DataError(str(e)) from None
    if packed:
        manifest = read_manifest(root)
        import numpy as np

        for split in dict.fromkeys(splits):
            entry = manifest["splits"].get(split)
            if entry is None:
                continue                            # the loader reports a missing split
            with np.load(os.path.join(root, split, INDEX), allow_pickle=False) as z:
                names = [INDEX, *(str(n) for n in z["shard_names"])]
            recorded = entry.get("sha256") or {}
            checked &= all(n in recorded for n in names)
            for n in names:
                rels.append(f"{split}/{n}")
                if n in recorded:
                    sums[f"{split}/{n}"] = recorded[n]
    else:
        if not os.path.isdir(root):
            raise DataError(f"data.root={root}: no such folder to stage")
        checked = False
        for split in dict.fromkeys(splits):
            top = os.path.join(root, split)
            for folder, dirs, files in os.walk(top):
                dirs.sort()
                rels += [os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/") for f in sorted(files)]
    if os.path.isfile(os.path.join(root, EXCLUDE_FILE)):
        rels.append(EXCLUDE_FILE)
    if packed:
        rels.append(MANIFEST)                       # last: the copy is a packed root only once whole
    with ThreadPoolExecutor(16) as pool:           # stat calls: latency-bound on network storage
        stats = list(pool.map(lambda r: os.stat(os.path.join(root, r)), rels))
    items = [Item(r, s.st_size, s.st_mtime_ns, sums.get(r)) for r, s in zip(rels, stats)]
    return items, checked


# --------------------------------------------------------------------------- the copy


@dataclass
class Staged:
    source: str
    dest: str
    files: int = 0
    bytes: int = 0
    copied: int = 0
    copied_bytes: int = 0
    resumed: int = 0
    kept: int = 0
    retried: int = 0
    seconds: float = 0.0
    checksums: bool = True

    def describe(self, node: str) -> str:
        rate = self.copied_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        how = "sha256 against the manifest" if self.checksums else (
            "sizes only (the manifest has no checksums: python -m fastdeit.data.stage "
            f"{self.source} --add-checksums)" if os.path.isfile(os.path.join(self.source, MANIFEST))
            else "sizes only (a class-folder root)")
        return (f"data staged on {node}: {self.source} -> {self.dest} in {self.seconds:.1f} s: {self.files} files, "
                f"{self.bytes / 1e9:.3g} GB; copied {self.copied} ({self.copied_bytes / 1e9:.3g} GB, {rate:.3g} GB/s, "
                f"{self.resumed} resumed from a partial copy, {self.retried} copied twice), reused {self.kept}; "
                f"checked by {how}")


class _Journal:
    """One JSON line per finished file (appended after its rename); the last line per file wins."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.entries: Dict[str, dict] = {}
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self.entries[entry["rel"]] = entry
                    except (ValueError, KeyError, TypeError):
                        continue                    # a line torn by a crash: its file is re-copied
        self.file = open(path, "a")

    def add(self, entry: dict) -> None:
        with self.lock:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def _unchanged(item: Item, entry: Optional[dict], dest_path: str) -> bool:
    if entry is None:
        return False
    try:
        st = os.stat(dest_path)
    except OSError:
        return False
    return (st.st_size == item.size == entry.get("size") and st.st_mtime_ns == entry.get("dst_mtime_ns")
            and entry.get("src_mtime_ns") == item.mtime_ns
            and (item.sha256 is None or entry.get("sha256") == item.sha256))


def _copy(src: str, dst: str, item: Item, resume: bool) -> Tuple[str, bool]:
    """Copy into ``dst.partial`` (resuming it when asked and it is a prefix), hash what is
    written, rename when it matches. Returns (sha256, resumed); raises _Mismatch."""
    partial = dst + ".partial"
    h = hashlib.sha256()
    start = 0
    if resume and os.path.isfile(partial) and 0 < os.path.getsize(partial) <= item.size:
        with open(partial, "rb") as f:
            while True:
                block = f.read(CHUNK)
                if not block:
                    break
                h.update(block)
                start += len(block)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src, "rb") as fin, open(partial, "ab" if start else "wb") as fout:
        fin.seek(start)
        done = start
        while True:
            block = fin.read(CHUNK)
            if not block:
                break
            h.update(block)
            fout.write(block)
            done += len(block)
        if done != item.size:
            raise DataError(f"{src}: {done} bytes read while staging, {item.size} when listed: it changed during "
                            "the copy; stage again when it is settled")
        digest = h.hexdigest()
        if item.sha256 is not None and digest != item.sha256:
            raise _Mismatch(digest, resumed=start > 0)
        if item.size >= FSYNC_BYTES:
            fout.flush()
            os.fsync(fout.fileno())
    os.replace(partial, dst)
    return digest, start > 0


class _Mismatch(Exception):
    def __init__(self, digest: str, resumed: bool):
        super().__init__(digest)
        self.digest, self.resumed = digest, resumed


def stage(root: str, dest: str, splits: Sequence[str], threads: int = THREADS) -> Staged:
    """Make ``dest`` a checked copy of what training reads from ``root`` (see the module doc)."""
    import fcntl

    t0 = time.perf_counter()
    root = os.path.abspath(root)
    items, checked = listing(root, splits)
    state = os.path.join(dest, STATE)
    try:
        os.makedirs(state, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.stage_to: cannot create {state}: {e.strerror}") from None
    with open(os.path.join(state, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)            # another job on this node staging the same copy
        _claim(state, root, dest)
        journal = _Journal(os.path.join(state, "journal.jsonl"))
        try:
            result = Staged(root, dest, files=len(items), bytes=sum(i.size for i in items), checksums=checked)
            todo = [i for i in items if not _unchanged(i, journal.entries.get(i.rel), os.path.join(dest, i.rel))]
            result.kept = len(items) - len(todo)
            _check_space(dest, todo)
            last = [i for i in todo if i.rel == MANIFEST]
            rest = [i for i in todo if i.rel != MANIFEST]

            def one(item: Item) -> None:
                src, dst = os.path.join(root, item.rel), os.path.join(dest, item.rel)
                try:
                    digest, resumed = _copy(src, dst, item, resume=True)
                except _Mismatch:
                    # Once more from the start: a flaky read, or a damaged partial prefix.
                    try:
                        digest, resumed = _copy(src, dst, item, resume=False)
                    except _Mismatch as again:
                        _remove(dst + ".partial")
                        raise DataError(
                            f"{src}: sha256 {again.digest[:16]}... does not match {os.path.join(root, MANIFEST)} "
                            f"({item.sha256[:16]}...), read twice: the file differs from its pack (damaged, or "
                            "changed since packing); restore it or re-pack") from None
                    with journal.lock:
                        result.retried += 1
                st = os.stat(dst)
                journal.add({"rel": item.rel, "size": item.size, "src_mtime_ns": item.mtime_ns,
                             "dst_mtime_ns": st.st_mtime_ns, "sha256": digest})
                with journal.lock:
                    result.copied += 1
                    result.copied_bytes += item.size
                    result.resumed += int(resumed)

            if rest:
                with ThreadPoolExecutor(max(1, min(threads, len(rest)))) as pool:
                    for _ in pool.map(one, rest):
                        pass
            for item in last:
                one(item)
        except OSError as e:
            raise DataError(f"data.stage_to: staging {root} to {dest} failed: {e}") from None
        finally:
            journal.close()
    result.seconds = time.perf_counter() - t0
    return result


def _claim(state: str, root: str, dest: str) -> None:
    """The copy names its source: a folder holding a copy of another root is not overwritten."""
    path = os.path.join(state, "source.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                source = json.load(f).get("source")
        except (OSError, ValueError, AttributeError):
            source = None
        if source is not None and source != root:
            raise DataError(f"data.stage_to: {dest} holds a copy of {source}, not of data.root={root}: set another "
                            "data.stage_to, or delete that copy")
    with open(path + ".tmp", "w") as f:
        json.dump({"source": root}, f)
    os.replace(path + ".tmp", path)


def _check_space(dest: str, todo: Sequence[Item]) -> None:
    need = sum(i.size for i in todo)
    free = shutil.disk_usage(dest).free
    if need > free:
        raise DataError(f"data.stage_to: {dest} has {free / 1e9:.3g} GB free, the copy needs {need / 1e9:.3g} GB more")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# --------------------------------------------------------------------------- in a run


def stage_data(cfg, env, store=None, log=None):
    """``cfg`` (a DataConfig) with ``root`` pointing at this node's staged copy, or ``cfg`` as it
    is when ``data.stage_to`` is unset. Local rank 0 copies; every rank returns only when every
    node's copy is done (the barrier of the module doc)."""
    if not cfg.stage_to:
        return cfg
    dest = destination(cfg.root, cfg.stage_to)
    node = node_name()
    error: Optional[BaseException] = None
    if env.local_rank == 0:
        try:
            result = stage(cfg.root, dest, (cfg.train_split, cfg.val_split))
            (log or _print)(result.describe(node))
        except BaseException as e:              # every rank must hear of it, then this one re-raises
            error = e
    if env.world_size > 1:
        _barrier(env, store, error, node)
    if error is not None:
        raise error
    return dataclasses.replace(cfg, root=dest)


def node_name(environ=os.environ) -> str:
    """The node as the scheduler names it (SLURM's node name; two slurmd on one host differ),
    else the host name."""
    return environ.get("SLURMD_NODENAME") or socket.gethostname()


def _print(message: str) -> None:
    print(message, flush=True)


def _barrier(env, store, error: Optional[BaseException], node: str, poll: float = 0.5) -> None:
    import torch.distributed as dist

    if store is None:
        # Our own client of the job's rendezvous store (as the heartbeat opens one): no collective.
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False,
                              timeout=datetime.timedelta(minutes=5))
    try:
        if error is not None:
            message = str(error) if isinstance(error, FastDeitError) else f"{type(error).__name__}: {error}"
            store.set(STORE_PREFIX + "error", f"rank {env.rank} on {node}: {message}")
            return                                  # the others stop at their next poll
        store.add(STORE_PREFIX + "ready", 1)
        while True:
            if store.check([STORE_PREFIX + "error"]):
                raise DataError(f"data.stage_to: {store.get(STORE_PREFIX + 'error').decode()}")
            if store.add(STORE_PREFIX + "ready", 0) >= env.world_size:
                return
            time.sleep(poll)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the store lives in rank 0's process
        raise DataError(f"data.stage_to: the rendezvous store went away while rank {env.rank} waited for the "
                        f"staged copies ({type(e).__name__}): another rank failed, and its message says why") from None


# --------------------------------------------------------------------------- the command


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdeit.data.stage",
                                description="Stage a data root to local disk as data.stage_to does, or add "
                                            "checksums to an older packed root's manifest.")
    p.add_argument("root", help="data.root: a packed root or a class-folder tree")
    p.add_argument("stage_to", nargs="?", help="local folder; the copy goes to STAGE_TO/<name of ROOT>")
    p.add_argument("--splits", default="train,val")
    p.add_argument("--add-checksums", action="store_true", help="write sha256 of each index and shard into ROOT's manifest")
    args = p.parse_args(argv)
    try:
        if args.add_checksums:
            manifest = add_checksums(args.root)
            print(f"{os.path.join(args.root, MANIFEST)}: sha256 of "
                  f"{sum(len(e['sha256']) for e in manifest['splits'].values())} files added")
            return 0
        if not args.stage_to:
            p.error("STAGE_TO is required (or --add-checksums)")
        result = stage(args.root, destination(args.root, args.stage_to), args.splits.split(","))
        print(result.describe(socket.gethostname()))
        return 0
    except FastDeitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
