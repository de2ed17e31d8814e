"""Class-folder dataset scan: `<root>/<class>/**/<image>` -> (files, labels, classes); the file
lists that select images (data.train_list / val_list) and the exclusion list that leaves bad
ones out (written by fastdeit.data.verify).

Label indices are the sorted class-folder names, exactly as torchvision's ImageFolder assigns
them, so checkpoints and class lists interoperate with timm/torchvision tooling. FolderSource is
the loader's view of such a tree; shards.ShardSource, beside it, is the same for a packed one.
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

from ...errors import DataError
from ..imagecheck import check_image_file

# Extensions we hand to the DALI decoders; compared case-insensitively (ImageNet uses .JPEG).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The exclusion list `python -m fastdeit.data.verify ROOT` writes into ROOT; loaders of ROOT
# leave its files out unless data.exclude_list names another list.
EXCLUDE_FILE = "verify_excluded.txt"


def scan_image_folder(root: str) -> Tuple[List[str], List[int], List[str]]:
    """Return (files, labels, classes) for a class-folder tree.

    Files are absolute paths in ImageFolder's order: classes sorted, then each class folder walked
    (following links) with directories and file names sorted. Non-image files are ignored.
    Raises ValueError naming the path for a missing root, a root without class folders, or a
    class folder without images: each of those would otherwise surface much later as a wrong
    `num_classes` or a silently shifted label.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"image folder does not exist or is not a directory: {root}")
    classes = find_classes(root)
    files: List[str] = []
    labels: List[int] = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        count = 0
        for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(dirpath, fname))
                    labels.append(label)
                    count += 1
        if count == 0:
            raise DataError(
                f"class folder has no images ({', '.join(IMG_EXTENSIONS)}): {class_dir}")
    return files, labels, classes


def find_classes(root: str) -> List[str]:
    """Sorted class-folder names under `root` (no file walk); ValueError if there are none."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"image folder does not exist or is not a directory: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f"no class folders found in {root}")
    return classes


def list_entries(list_path: str, root: str) -> Iterator[Tuple[str, List[str]]]:
    """The entries of a list file (a file list, an exclusion list): one path per line relative
    to ``root``; blank lines and lines starting with '#' skipped. Yields (where, parts): where
    is "<list>:<line>: '<entry>'" for messages, parts the normalised path's components. A path
    that is absolute or leaves ``root`` is a DataError naming the list and line."""
    with open(os.path.expanduser(list_path)) as f:
        for number, line in enumerate(f, start=1):
            rel = line.strip()
            if not rel or rel.startswith("#"):
                continue
            where = f"{list_path}:{number}: {rel!r}"
            parts = os.path.normpath(rel).split(os.sep)
            if os.path.isabs(rel) or parts[0] == os.pardir:
                raise DataError(f"{where}: need a path relative to {root}")
            yield where, parts


def read_file_list(list_path: str, root: str) -> Tuple[List[str], List[int], List[str]]:
    """(files, labels, classes) for the images named in a text file, relative to `root`.

    One path per line ("<class folder>/.../<file>"; blank lines and lines starting with '#'
    are skipped), kept in the list's order. Labels are the index of each path's class folder
    among the sorted class folders of `root`, exactly as scan_image_folder (ImageFolder) would
    assign them, so a list naming a subset trains with the full tree's label indices. A line
    that is absolute, escapes `root`, names no class folder, or names a missing file is a
    ValueError naming the list and line: a wrong or missing image must never become a label.
    """
    root = os.path.abspath(os.path.expanduser(root))
    classes = find_classes(root)
    index = {name: i for i, name in enumerate(classes)}
    files: List[str] = []
    labels: List[int] = []
    for where, parts in list_entries(list_path, root):
        if len(parts) < 2:
            raise DataError(f"{where}: need a path inside a class folder of {root}")
        if parts[0] not in index:
            raise DataError(f"{where}: {parts[0]!r} is not a class folder of {root}")
        path = os.path.join(root, *parts)
        if not os.path.isfile(path):
            raise DataError(f"{where}: no such file {path}")
        files.append(path)
        labels.append(index[parts[0]])
    if not files:
        raise DataError(f"file list {list_path} names no images")
    return files, labels, classes


class FolderSource:
    """The loader's view of a class-folder tree (or file list): labels and classes for the
    sampler, the ordered file list DALI's file reader takes, and the error path's re-check.
    Packed splits have the same interface (shards.ShardSource)."""

    def __init__(self, files: List[str], labels: List[int], classes: List[str]):
        self.files = np.asarray(files, dtype=object)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.files)

    def pipeline_input(self, order: np.ndarray, batch_size: int, threads: int, prefetch: int):
        """(files, labels) for pipeline.py, in reading order (DALI's reader does the I/O)."""
        return self.files[order].tolist(), self.labels[order].tolist()

    def first_bad(self, indices: Sequence[int]) -> Optional[Tuple[str, str]]:
        """(path, reason) of the first of these images that does not decode, else None."""
        for path in self.files[np.asarray(indices, dtype=np.int64)].tolist():
            why = check_image_file(path)
            if why is not None:
                return path, why
        return None

    def describe(self, i: int) -> str:
        return str(self.files[i])

    def close(self) -> None:
        pass


def exclusion_list(root: str, configured: Optional[str]) -> Optional[str]:
    """The exclusion list a loader of ``root`` uses: the configured one, else ROOT's own if any."""
    if configured:
        if not os.path.isfile(configured):
            raise DataError(f"data.exclude_list={configured}: no such file")
        return configured
    default = os.path.join(root, EXCLUDE_FILE)
    return default if os.path.isfile(default) else None


def read_exclusions(list_path: str, root: str) -> Set[str]:
    """Absolute paths of the files a list names (relative to ``root``); a line that is absolute
    or leaves ``root`` is a DataError naming the list and the line."""
    root = os.path.abspath(os.path.expanduser(root))
    return {os.path.join(root, *parts) for _, parts in list_entries(list_path, root)}
