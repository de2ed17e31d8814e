"""Convert a dataset in its published format into class folders, or packed shards, once.

    python -m fastdeit.data.convert KIND SRC OUT [--pack [--shard-size 1GB] [--workers N]]

    KIND        SRC holds
    cifar10     the python pickles: data_batch_1..5, test_batch, batches.meta (cifar-10-batches-py/)
    cifar100    the python pickles: train, test, meta (cifar-100-python/)
    inat2018    train2018.json, val2018.json, categories.json and the image tree they name
    inat2019    train2019.json, val2019.json, categories.json and the image tree
    flowers102  imagelabels.mat, setid.mat, jpg/image_NNNNN.jpg
    cars        cars_annos.mat + car_ims/ (the full archive), or the devkit: cars_meta.mat,
                cars_train_annos.mat, cars_test_annos_withlabels.mat + cars_train/, cars_test/
    hf-parquet  Hugging Face `datasets` parquet files (any depth) with an `image` struct
                (`bytes`, `path`) and a `label` column; the split is the file's name or folder
                (train*, validation*/valid*/val*; test* is left out: its labels are hidden)

writes OUT/train/<class>/<image> and OUT/val/<class>/<image> (fastdeit's folder layout:
folder.py), or with --pack the packed splits of pack.py in OUT, ready for `data.root: OUT`.

- Bytes are never re-encoded where they already are a JPEG or PNG: iNaturalist, Flowers and
  Cars files are hard-linked (copied across filesystems) into the tree, parquet bytes are
  written as they are. CIFAR's pixel arrays become lossless PNGs; parquet images in another
  format (WebP, BMP, ...) are decoded and written as lossless PNGs, the loader reading JPEG and
  PNG only.
- Labels keep the source's indices. Class folders are named after the classes (CIFAR's
  label_names / fine_label_names, the iNat category `name`, Cars' class_names, the parquet
  schema's ClassLabel names); where those names do not sort in label order (fastdeit, like
  ImageFolder, numbers the sorted folder names) each is prefixed with its zero-padded index,
  so folder i is label i. Flowers-102 ships no names: folders 001..102 are its labels 1..102.
- The splits are the ones the DeiT paper's transfer experiments use (its table of datasets:
  CIFAR 50,000 / 10,000; Flowers-102 2,040 / 6,149; Cars 8,144 / 8,041; iNat-2018
  437,513 / 24,426; iNat-2019 265,240 / 3,003): Flowers-102 trains on trnid + valid and
  validates on tstid (torchvision's Flowers102 calls them train, val, test); Cars on its
  train / test halves; iNaturalist as the DeiT reference's INatDataset (datasets.py): train{year}.json / val{year}.json, classes the categories' `name`
  numbered in order of first appearance among the train annotations.
- With --pack the tree is built in OUT/.convert-tree (symlinks to the source files, so these
  are read once, by the packer; CIFAR's PNGs and the parquet bytes written as files, which
  needs their size in free space until the pack is done), packed by pack.pack (every image
  verified as it is packed) and removed. A rerun of the same command resumes the pack.
- iNaturalist images are looked up at their file_name (the published
  train_val{year}/<supercategory>/<id>/ tree), else at the reference's
  train_val{year}/<id>/<file> (datasets.py drops the supercategory).
- Folder output ends with OUT/.convert.json; a rerun of the same command is then a no-op, and a
  different one into the same OUT an error.

Every image is decoded once before the result counts as complete (verify.py's check on every
core for folders, `--no-verify` to skip; the packer's own check with --pack). Bad or partial
inputs (a missing batch, annotation or image file, a label out of range, bytes that do not
decode) are a DataError naming the file (and parquet row), printed in one line.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..errors import DataError
from .imagecheck import check_image_bytes

KINDS = ("cifar10", "cifar100", "inat2018", "inat2019", "flowers102", "cars", "hf-parquet")
SPLITS = ("train", "val")
MARKER = ".convert.json"
TREE = ".convert-tree"          # --pack: the tree handed to the packer, removed after


@dataclass
class Item:
    """One image of a split: its label, its file name inside the class folder, and where its
    bytes come from: a source file (linked/copied as is) or the bytes themselves."""
    label: int
    name: str
    path: Optional[str] = None
    data: Optional[bytes] = None


@dataclass
class Dataset:
    classes: List[str]                                   # label order
    splits: Dict[str, Callable[[], Iterator[Item]]]      # split -> items (generated lazily)


# -- readers, one per KIND ---------------------------------------------------------------------

def _find(src: str, names: Sequence[str], subdirs: Sequence[str] = ("",)) -> Optional[str]:
    for sub in subdirs:
        for name in names:
            path = os.path.join(src, sub, name)
            if os.path.isfile(path):
                return path
    return None


def _unpickle(path: str) -> dict:
    """A CIFAR batch as torchvision reads it (pickle, latin1 strings)."""
    if not os.path.isfile(path):
        raise DataError(f"missing CIFAR file {path}")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as e:  # truncated or not a pickle: name the file, not the pickle frame
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR batch (a {type(entry).__name__}, not a dict)")
    return entry


def read_cifar(src: str, hundred: bool) -> Dataset:
    base = "cifar-100-python" if hundred else "cifar-10-batches-py"
    if os.path.isdir(os.path.join(src, base)):
        src = os.path.join(src, base)
    if hundred:
        files = {"train": ["train"], "val": ["test"]}
        meta, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
    else:
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
        meta, names_key, labels_key = "batches.meta", "label_names", "labels"
    meta_path = os.path.join(src, meta)
    entry = _unpickle(meta_path)
    if names_key not in entry:
        raise DataError(f"{meta_path}: no {names_key!r} (keys: {sorted(entry)})")
    classes = [str(n) for n in entry[names_key]]
    for split in files:   # every batch present before anything is written
        for name in files[split]:
            if not os.path.isfile(os.path.join(src, name)):
                raise DataError(f"missing CIFAR file {os.path.join(src, name)}")

    def items(split: str) -> Iterator[Item]:
        index = 0
        for name in files[split]:
            path = os.path.join(src, name)
            batch = _unpickle(path)
            if "data" not in batch or labels_key not in batch:
                raise DataError(f"{path}: no 'data' or {labels_key!r} (keys: {sorted(batch)})")
            data = np.asarray(batch["data"], dtype=np.uint8)
            labels = np.asarray(batch[labels_key], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
                raise DataError(f"{path}: data {data.shape} and {len(labels)} labels are not "
                                f"N x 3072 pixels and N labels")
            _check_labels(labels, len(classes), path)
            # torchvision's reading: planes R, G, B of 32x32, row-major -> HWC
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for image, label in zip(images, labels.tolist()):
                yield Item(label, f"{split}_{index:05d}.png", data=_png(image))
                index += 1

    return Dataset(classes, {s: (lambda s=s: items(s)) for s in SPLITS})


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")    # lossless
    return buf.getvalue()


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(f"{where}: label {int(labels[bad[0]])} of item {int(bad[0])} is out of "
                        f"range for {num_classes} classes")


def _load_json(path: str) -> object:
    if not os.path.isfile(path):
        raise DataError(f"missing annotation file {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None


def read_inat(src: str, year: int) -> Dataset:
    """The DeiT reference's INatDataset (datasets.py): class = the category's `name`
    (--inat-category default), numbered in order of first appearance among train{year}.json's
    annotations; an image's category is the third component of its file_name
    (train_val2018/<supercategory>/<category id>/<file>)."""
    train_json = os.path.join(src, f"train{year}.json")
    data = {"train": _load_json(train_json), "val": _load_json(os.path.join(src, f"val{year}.json"))}
    cat_path = os.path.join(src, "categories.json")
    if os.path.isfile(cat_path):
        cats = _load_json(cat_path)
    else:   # the reference needs categories.json (the released, un-obfuscated names); the
            # annotations' own list has the same ids, its names obfuscated in the 2019 release
        cat_path = train_json
        cats = data["train"].get("categories") if isinstance(data["train"], dict) else None
        if cats is None:
            raise DataError(f"missing {os.path.join(src, 'categories.json')} (and {train_json} "
                            f"has no 'categories')")
    if not isinstance(cats, list):
        raise DataError(f"{cat_path}: categories must be a list")
    # The reference indexes the list by id (data_catg[id]); by the entries' own ids where they
    # have them, which is the same for the published files (ids 0..N-1 in order).
    by_id = {int(c.get("id", i)): c for i, c in enumerate(cats)}

    def category(cid: int, where: str) -> str:
        if cid not in by_id or "name" not in by_id[cid]:
            raise DataError(f"{where}: category {cid} is not in {cat_path} (or has no 'name')")
        return str(by_id[cid]["name"])

    targeter: Dict[str, int] = {}
    for k in ("annotations", "images"):
        if not isinstance(data["train"], dict) or k not in data["train"]:
            raise DataError(f"{train_json}: no {k!r} list")
    for ann in data["train"]["annotations"]:
        targeter.setdefault(category(int(ann["category_id"]), train_json), len(targeter))
    classes = list(targeter)

    def items(split: str) -> Iterator[Item]:
        where = os.path.join(src, f"{split}{year}.json")
        if not isinstance(data[split], dict) or "images" not in data[split]:
            raise DataError(f"{where}: no 'images' list")
        for number, image in enumerate(data[split]["images"]):
            rel = str(image["file_name"])
            cut = rel.split("/")
            if len(cut) != 4 or not cut[2].isdigit():
                raise DataError(f"{where}: images[{number}] file_name {rel!r} is not "
                                f"<folder>/<supercategory>/<category id>/<file>")
            name = category(int(cut[2]), f"{where}: images[{number}]")
            if name not in targeter:
                raise DataError(f"{where}: images[{number}] is of category {name!r}, which no "
                                f"train{year}.json annotation has")
            # the published tree (file_name as is), else the reference's flattened one
            path = os.path.join(src, rel)
            if not os.path.isfile(path):
                flat = os.path.join(src, cut[0], cut[2], cut[3])
                path = flat if os.path.isfile(flat) else path
            yield Item(targeter[name], cut[3], path=path)

    return Dataset(classes, {s: (lambda s=s: items(s)) for s in SPLITS})


def _loadmat(path: str) -> dict:
    import scipy.io

    if not os.path.isfile(path):
        raise DataError(f"missing label file {path}")
    try:
        return scipy.io.loadmat(path, squeeze_me=True)
    except Exception as e:  # scipy raises several types for a bad file
        raise DataError(f"{path}: not a readable .mat file ({type(e).__name__}: {e})") from None


def _mat_field(mat: dict, key: str, path: str) -> np.ndarray:
    if key not in mat:
        raise DataError(f"{path}: no {key!r} (has {sorted(k for k in mat if not k.startswith('__'))})")
    return np.atleast_1d(mat[key])


def read_flowers(src: str) -> Dataset:
    """imagelabels.mat `labels` (1..102, image i+1 at index i) and setid.mat's trnid, valid,
    tstid (1-based image ids). train = trnid + valid (2,040), val = tstid (6,149): the sizes
    of the DeiT paper's table of transfer datasets."""
    labels_path, setid_path = os.path.join(src, "imagelabels.mat"), os.path.join(src, "setid.mat")
    labels = _mat_field(_loadmat(labels_path), "labels", labels_path).astype(np.int64)
    setid = _loadmat(setid_path)
    ids = {"train": np.concatenate([_mat_field(setid, "trnid", setid_path),
                                    _mat_field(setid, "valid", setid_path)]),
           "val": _mat_field(setid, "tstid", setid_path)}
    _check_labels(labels - 1, 102, labels_path)

    def items(split: str) -> Iterator[Item]:
        for i in ids[split].astype(np.int64).tolist():
            if not 1 <= i <= len(labels):
                raise DataError(f"{setid_path}: image id {i} is not in 1..{len(labels)} "
                                f"({labels_path} has {len(labels)} labels)")
            name = f"image_{i:05d}.jpg"
            yield Item(int(labels[i - 1]) - 1, name, path=os.path.join(src, "jpg", name))

    return Dataset([f"{c:03d}" for c in range(1, 103)], {s: (lambda s=s: items(s)) for s in SPLITS})


def read_cars(src: str) -> Dataset:
    """Stanford Cars: cars_annos.mat (annotations: relative_im_path, class 1..196, test 0/1;
    class_names) with car_ims/, or the devkit's cars_meta.mat, cars_train_annos.mat and
    cars_test_annos_withlabels.mat (annotations: fname, class) with cars_train/, cars_test/.
    train = the 8,144 train images, val = the 8,041 test images."""
    full = _find(src, ["cars_annos.mat"], ("", "devkit"))
    if full is not None:
        mat = _loadmat(full)
        classes = [str(n) for n in _mat_field(mat, "class_names", full)]
        ann = _mat_field(mat, "annotations", full)
        for field in ("relative_im_path", "class", "test"):
            if field not in (ann.dtype.names or ()):
                raise DataError(f"{full}: annotations have no {field!r} field")
        labels = ann["class"].astype(np.int64) - 1
        _check_labels(labels, len(classes), full)
        test = ann["test"].astype(bool)
        paths = [os.path.join(src, str(p)) for p in ann["relative_im_path"]]
        sel = {"train": np.flatnonzero(~test), "val": np.flatnonzero(test)}

        def items(split: str) -> Iterator[Item]:
            for k in sel[split].tolist():
                yield Item(int(labels[k]), os.path.basename(paths[k]), path=paths[k])

        return Dataset(classes, {s: (lambda s=s: items(s)) for s in SPLITS})

    meta = _find(src, ["cars_meta.mat"], ("devkit", ""))
    if meta is None:
        raise DataError(f"no cars_annos.mat or devkit/cars_meta.mat in {src}")
    classes = [str(n) for n in _mat_field(_loadmat(meta), "class_names", meta)]
    parts = {}
    for split, names, folder in (("train", ["cars_train_annos.mat"], "cars_train"),
                                 ("val", ["cars_test_annos_withlabels.mat", "cars_test_annos.mat"],
                                  "cars_test")):
        path = _find(src, names, ("devkit", ""))
        if path is None:
            raise DataError(f"no {names[0]} in {src} or {os.path.join(src, 'devkit')}")
        ann = _mat_field(_loadmat(path), "annotations", path)
        if "class" not in (ann.dtype.names or ()):
            raise DataError(f"{path}: annotations have no 'class' (the test annotations without "
                            f"labels): use cars_test_annos_withlabels.mat")
        labels = ann["class"].astype(np.int64) - 1
        _check_labels(labels, len(classes), path)
        parts[split] = [(int(label), os.path.join(src, folder, str(f)))
                        for label, f in zip(labels.tolist(), ann["fname"])]

    def items_devkit(split: str) -> Iterator[Item]:
        for label, path in parts[split]:
            yield Item(label, os.path.basename(path), path=path)

    return Dataset(classes, {s: (lambda s=s: items_devkit(s)) for s in SPLITS})


_PARQUET_SPLITS = (("train", "train"), ("validation", "val"), ("valid", "val"), ("val", "val"),
                   ("test", None))


def _parquet_split(rel: str) -> Optional[str]:
    """train / val / None (test, or unknown: left out) from a parquet file's path."""
    parts = rel.replace(os.sep, "/").split("/")
    for part in reversed(parts):           # the file's own name first, then its folders
        stem = part.lower()
        for prefix, split in _PARQUET_SPLITS:
            if re.match(rf"{prefix}(?![a-z])", stem):
                return split
    return None


def _sniff(data: bytes) -> Optional[str]:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    return None


def read_hf_parquet(src: str) -> Dataset:
    """Parquet files as `datasets` writes them (`push_to_hub`, the Hub's parquet conversion):
    `image` a struct of `bytes` and `path`, `label` an integer; the ClassLabel names from the
    schema's b'huggingface' metadata (info.features.label.names) when there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files: Dict[str, List[str]] = {"train": [], "val": []}
    for dirpath, dirnames, fnames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(fnames):
            if f.endswith(".parquet"):
                path = os.path.join(dirpath, f)
                split = _parquet_split(os.path.relpath(path, src))
                if split is not None:
                    files[split].append(path)
    for split in SPLITS:
        if not files[split]:
            raise DataError(f"no {split} parquet files in {src} (names or folders starting "
                            f"with {'train' if split == 'train' else 'validation, valid or val'})")
    names: Optional[List[str]] = None
    max_label = -1
    for split in SPLITS:
        for path in files[split]:
            try:
                meta = pq.ParquetFile(path)
            except Exception as e:
                raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
            schema = meta.schema_arrow
            for col in ("image", "label"):
                if col not in schema.names:
                    raise DataError(f"{path}: no {col!r} column (columns: {schema.names})")
            image_type = schema.field("image").type
            if not (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0):
                raise DataError(f"{path}: column 'image' is {image_type}, not the struct of "
                                f"'bytes' and 'path' that datasets' Image feature writes")
            found = _label_names(schema.metadata or {}, path)
            if found is not None:
                if names is not None and found != names:
                    raise DataError(f"{path}: its label names differ from the other files'")
                names = found
            labels = meta.read(columns=["label"]).column("label").to_numpy(zero_copy_only=False)
            if len(labels):
                max_label = max(max_label, int(labels.max()))
    if names is None:
        width = len(str(max(max_label, 0)))
        names = [f"{c:0{width}d}" for c in range(max_label + 1)]

    def items(split: str) -> Iterator[Item]:
        for path in files[split]:
            stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.relpath(path, src)[:-len(".parquet")])
            table_file = pq.ParquetFile(path)
            row = 0
            for batch in table_file.iter_batches(batch_size=256, columns=["image", "label"]):
                images = batch.column("image")
                labels = batch.column("label").to_pylist()
                datas = images.field("bytes").to_pylist()
                for data, label in zip(datas, labels):
                    where = f"{path}: row {row}"
                    if label is None or not 0 <= label < len(names):
                        raise DataError(f"{where}: label {label} is out of range for "
                                        f"{len(names)} classes")
                    if not data:
                        raise DataError(f"{where}: no image bytes")
                    ext = _sniff(data)
                    if ext is None:      # neither JPEG nor PNG: the loader reads those only
                        why = check_image_bytes(data)
                        if why is not None:
                            raise DataError(f"{where}: image bytes do not decode ({why})")
                        data, ext = _to_png(data), ".png"
                    # JPEG/PNG bytes are decoded once, in parallel, after writing (verify/pack);
                    # the file name carries the parquet file and row for the error
                    yield Item(int(label), f"{stem}.row{row:07d}{ext}", data=data)
                    row += 1

    return Dataset(names, {s: (lambda s=s: items(s)) for s in SPLITS})


def _label_names(metadata: dict, path: str) -> Optional[List[str]]:
    raw = metadata.get(b"huggingface")
    if raw is None:
        return None
    try:
        info = json.loads(raw)
        features = info.get("info", info).get("features", {})
        label = features.get("label", {})
        names = label.get("names")
    except (ValueError, AttributeError) as e:
        raise DataError(f"{path}: unreadable b'huggingface' schema metadata ({e})") from None
    return [str(n) for n in names] if names else None


def _to_png(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue()


READERS: Dict[str, Callable[[str], Dataset]] = {
    "cifar10": lambda src: read_cifar(src, hundred=False),
    "cifar100": lambda src: read_cifar(src, hundred=True),
    "inat2018": lambda src: read_inat(src, 2018),
    "inat2019": lambda src: read_inat(src, 2019),
    "flowers102": read_flowers,
    "cars": read_cars,
    "hf-parquet": read_hf_parquet,
}


# -- writing -----------------------------------------------------------------------------------

def folder_names(classes: Sequence[str]) -> List[str]:
    """A folder name per class whose sorted order is the label order (see the module doc)."""
    clean = [re.sub(r"[/\\\x00]", "_", c).strip() for c in classes]
    plain = all(c and c not in (".", "..") and not c.startswith(".") for c in clean)
    if plain and len(set(clean)) == len(clean) and clean == sorted(clean):
        return clean
    width = len(str(len(classes) - 1))
    return [f"{i:0{width}d}_{c}" if c else f"{i:0{width}d}" for i, c in enumerate(clean)]


def _place(item: Item, dest: str, link: bool) -> None:
    """Put one image at dest: its bytes written, or its source file linked (symlink for the
    packer's tree; else a hard link, a copy across filesystems)."""
    if item.data is not None:
        tmp = dest + ".tmp"
        with open(tmp, "wb") as f:
            f.write(item.data)
        os.replace(tmp, dest)
        return
    if not os.path.isfile(item.path):
        raise DataError(f"missing image file {item.path}")
    if os.path.lexists(dest):
        os.remove(dest)
    if link:
        os.symlink(os.path.abspath(item.path), dest)
        return
    try:
        os.link(item.path, dest)
    except OSError:
        shutil.copyfile(item.path, dest)


def write_tree(dataset: Dataset, out: str, link: bool, where: str) -> Dict[str, dict]:
    """Write every split's class folders under out; returns per split {images, per_class}."""
    names = folder_names(dataset.classes)
    counts: Dict[str, dict] = {}
    for split in SPLITS:
        made = set()
        per_class = np.zeros(len(names), dtype=np.int64)
        seen = set()
        for item in dataset.splits[split]():
            folder = os.path.join(out, split, names[item.label])
            if item.label not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(item.label)
            key = (item.label, item.name)
            if key in seen:
                raise DataError(f"{where}: two {split} images named {item.name!r} in class "
                                f"{dataset.classes[item.label]!r}")
            seen.add(key)
            _place(item, os.path.join(folder, item.name), link)
            per_class[item.label] += 1
        missing = np.flatnonzero(per_class == 0)
        if len(missing):
            raise DataError(f"{where}: the {split} split has no image of class "
                            f"{dataset.classes[missing[0]]!r} ({len(missing)} classes without "
                            f"images); fastdeit needs every class in both splits")
        counts[split] = {"images": int(per_class.sum())}
    return counts


def _verify(out: str, workers: Optional[int], progress: bool, where: str) -> None:
    """Decode every image of the written tree once, on every core (verify.py's check, as the
    packer does for --pack): a file that does not decode is an error naming it (file names of
    parquet images carry their parquet file and row)."""
    from .verify import find_bad

    checked, bad = find_bad(out, SPLITS, workers, progress)
    if bad:
        rel, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{where}: {len(bad)} of {checked} images do not decode: "
                        f"{os.path.join(out, rel)}: {why}{more}")


def convert(kind: str, src: str, out: str, pack: bool = False, shard_size: int = 10**9,
            workers: Optional[int] = None, progress: bool = True, verify: bool = True) -> dict:
    """Convert; returns the record written to OUT/.convert.json (folders) or the manifest.
    Every image is decoded once before the result is complete (verify=False skips it for
    folders; the packer always checks)."""
    if kind not in READERS:
        raise DataError(f"unknown dataset kind {kind!r}; one of {', '.join(KINDS)}")
    src, out = os.path.abspath(os.path.expanduser(src)), os.path.abspath(os.path.expanduser(out))
    if not os.path.isdir(src):
        raise DataError(f"source folder does not exist: {src}")
    params = {"kind": kind, "source": src, "pack": pack}
    marker = os.path.join(out, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if {k: done.get(k) for k in params} == params:
            return done
        raise DataError(f"{out} holds another conversion ({done.get('kind')} of "
                        f"{done.get('source')}); choose another OUT or delete it")
    dataset = READERS[kind](src)
    where = f"{kind} {src}"
    if not pack:
        partial = marker + ".partial"
        ours = False
        if os.path.isfile(partial):
            with open(partial) as f:
                ours = json.load(f) == params
        present = [s for s in SPLITS if os.path.isdir(os.path.join(out, s))]
        if present and not ours:
            raise DataError(f"{out} already holds {'/ and '.join(present)}/ not written by this "
                            f"command; convert into a new or empty folder")
        for split in present:   # an interrupted run of this same command: start over
            shutil.rmtree(os.path.join(out, split))
        os.makedirs(out, exist_ok=True)
        with open(partial, "w") as f:
            json.dump(params, f)
        counts = write_tree(dataset, out, link=False, where=where)
        if verify:
            _verify(out, workers, progress, where)
        record = {**params, "classes": dataset.classes,
                  "folders": folder_names(dataset.classes), "splits": counts,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(marker + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(marker + ".tmp", marker)   # last: its presence means the tree is complete
        os.remove(partial)
        return record

    from . import pack as packer

    tree = os.path.join(out, TREE)
    if os.path.isdir(tree):
        shutil.rmtree(tree)
    os.makedirs(out, exist_ok=True)
    write_tree(dataset, tree, link=True, where=where)
    try:
        manifest = packer.pack(tree, out, shard_size, workers, SPLITS, progress=progress)
    except ValueError as e:   # files that do not decode (all listed): one line naming the first
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if len(lines) > 1 and "do not decode" in lines[0]:
            more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
            raise DataError(f"{where}: {len(lines) - 1} images do not decode: {lines[1]}{more}; "
                            f"fix the source and rerun") from None
        raise DataError(f"{where}: {' '.join(lines)}") from None
    # what was converted, for whoever reads the manifest (the tree is gone)
    manifest["source"] = src
    manifest["converted"] = {"kind": kind, "classes": dataset.classes}
    packer._write_atomic(os.path.join(out, packer.MANIFEST), json.dumps(manifest, indent=1).encode())
    shutil.rmtree(tree)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdeit.data.convert",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\nwrites OUT")[0].split("\n", 2)[2])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("src", help="the dataset as published (see the list below)")
    p.add_argument("out", help="output folder: OUT/train/<class>/..., OUT/val/<class>/... or, "
                               "with --pack, packed shards")
    p.add_argument("--pack", action="store_true", help="write packed shards (pack.py) instead of folders")
    p.add_argument("--shard-size", default="1GB", help="with --pack: target shard size (default 1GB)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes decoding every image once (and writing shards with --pack); "
                        "default: the cores this process may use")
    p.add_argument("--no-verify", action="store_true",
                   help="folders only: skip decoding every image once (python -m fastdeit.data.verify OUT later)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from ..cli import reported   # here: it imports torch (rank lookup), the conversion does not
    from .pack import parse_size

    start = time.perf_counter()
    with reported("fastdeit.data.convert"):
        try:
            size = parse_size(args.shard_size)
        except ValueError as e:
            raise DataError(f"--shard-size: {e}") from None
        result = convert(args.kind, args.src, args.out, pack=args.pack, shard_size=size,
                         workers=args.workers, progress=not args.quiet, verify=not args.no_verify)
    for split, entry in result["splits"].items():
        print(f"{split}: {entry['images']} images")
    print(f"converted {args.kind} into {os.path.abspath(args.out)} in "
          f"{time.perf_counter() - start:.0f} s; set data.root to it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
