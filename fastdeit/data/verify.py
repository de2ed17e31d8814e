"""Decode every image of a dataset once, before training, so no bad file stops a run hours in.

    python -m fastdeit.data.verify /data/imagenet            # train/ and val/, all cores
    python -m fastdeit.data.verify /data/imagenet --workers 16 --out /tmp/excluded.txt

Every file the loader would read (the class-folder scan of each split, fastdeit.data.loading.folder) is
fully decoded by the one check the loader and the shard packer use (imagecheck.py), in
parallel over the cores, with a progress bar. The bad ones are printed with the reason and
written to an exclusion list, by default ``ROOT/verify_excluded.txt``: the loader leaves its
files out of both splits (``data.exclude_list``; the list in ROOT is picked up by itself). The
list is rewritten on every run, so files repaired since drop out of it.

Format: one path per line, relative to ROOT (``train/n01440764/x.JPEG``); lines starting with
'#' are comments (the first ones say when and what was checked).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import multiprocessing
import os
import sys
from typing import Iterable, List, Optional, Tuple

from ..errors import DataError
from .loading.folder import EXCLUDE_FILE, scan_image_folder
from .imagecheck import check_image_file


def _check(path: str) -> Tuple[str, Optional[str]]:
    return path, check_image_file(path)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def find_bad(root: str, splits: Iterable[str] = ("train", "val"), workers: Optional[int] = None,
             progress: bool = True) -> Tuple[int, List[Tuple[str, str]]]:
    """(files checked, [(path relative to root, reason), ...] sorted) over the splits' folders."""
    from tqdm import tqdm

    root = os.path.abspath(os.path.expanduser(root))
    files: List[str] = []
    for split in splits:
        files += scan_image_folder(os.path.join(root, split))[0]
    workers = max(1, min(workers or default_workers(), len(files)))
    bad = []
    gc.collect()        # nothing for the forked workers to finalise (fastdeit.data.pack._run_pool)
    with multiprocessing.get_context("fork").Pool(workers) as pool, \
            tqdm(total=len(files), desc=f"decoding ({workers} workers)", unit="img", disable=not progress,
                 file=sys.stderr, mininterval=1.0) as bar:
        # Large chunks keep the queue traffic small next to the decode; unordered for speed.
        for path, reason in pool.imap_unordered(_check, files, chunksize=max(1, min(256, len(files) // (8 * workers)))):
            bar.update()
            if reason is not None:
                bad.append((os.path.relpath(path, root), reason))
    return len(files), sorted(bad)


def write_exclusions(path: str, bad: List[Tuple[str, str]], checked: int, splits: Iterable[str]) -> None:
    """The exclusion list (see the module docstring), written atomically."""
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    lines = [f"# fastdeit.data.verify {stamp}: {checked} files of {', '.join(splits)} decoded, "
             f"{len(bad)} excluded", "# one path per line, relative to the dataset root"]
    for rel, reason in bad:
        lines += [f"# {reason}".replace("\n", " "), rel]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdeit.data.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="dataset root holding the split folders (data.root)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="split folders (default: train val)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: every core)")
    parser.add_argument("--out", help=f"exclusion list to write (default: ROOT/{EXCLUDE_FILE}, which the "
                                      "loader reads by itself)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        checked, bad = find_bad(args.root, args.splits, args.workers, progress=not args.no_progress)
    except DataError as e:
        print(f"fastdeit: error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.root, EXCLUDE_FILE)
    for rel, reason in bad:
        print(f"{rel}: {reason}")
    write_exclusions(out, bad, checked, args.splits)
    verdict = "all decode" if not bad else f"{len(bad)} do not decode and are listed"
    print(f"{checked} files in {', '.join(args.splits)} of {args.root}: {verdict} in {out}"
          + ("" if args.out is None or not bad else " (train with data.exclude_list=" + out + ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
