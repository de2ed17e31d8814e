"""python -m fastdeit.data.convert: each published format, written small in its real encoding
(pickles as CIFAR's, JSON, .mat by scipy.io.savemat, parquet by pyarrow), converted, and the
result checked against a reading with the format's own library: torchvision's CIFAR readers,
scipy.io.loadmat, pyarrow; pixels with PIL. Labels as fastdeit's loader will see them: the
class-folder scan (folder.py) or the packed index (shards.py)."""
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from fastdeit.data import convert
from fastdeit.data.loading.folder import scan_image_folder
from fastdeit.data.loading.shards import PackedSplit
from fastdeit.errors import DataError


def _tree(out, split):
    files, labels, classes = scan_image_folder(os.path.join(out, split))
    return {os.path.basename(f): (f, l) for f, l in zip(files, labels)}, classes


def _pixels(data_or_path):
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


def _jpeg(seed, size=(12, 9)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# -- CIFAR --------------------------------------------------------------------------------------

def _cifar_batch(path, n, num_classes, seed, labels_key="labels"):
    rng = np.random.default_rng(seed)
    labels = [(seed * 7 + i) % num_classes for i in range(n)]
    entry = {"batch_label": "b", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             labels_key: labels, "filenames": [f"x_{seed}_{i}.png" for i in range(n)]}
    if labels_key == "fine_labels":
        entry["coarse_labels"] = [l // 5 for l in labels]
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)      # as the published files (Python 2 pickles)


def make_cifar10(root, per_batch=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _cifar_batch(folder / f"data_batch_{i}", per_batch, 10, i)
    _cifar_batch(folder / "test_batch", 10, 10, 0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, f, protocol=2)
    return folder


@pytest.fixture
def tv_cifar(monkeypatch):
    """torchvision's CIFAR readers on our tiny files: their md5 check is of the real archives."""
    from torchvision.datasets import CIFAR10, CIFAR100

    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    return CIFAR10, CIFAR100


def _check_against(reference, out, split):
    found, classes = _tree(out, split)
    assert classes == reference.classes
    assert len(found) == len(reference)
    for i in range(len(reference)):
        image, label = reference[i]
        path, ours = found[f"{split}_{i:05d}.png"]
        assert ours == label
        assert np.array_equal(_pixels(path), np.asarray(image))       # lossless


def test_cifar10_folders_equal_torchvisions_reading(tmp_path, tv_cifar):
    CIFAR10, _ = tv_cifar
    make_cifar10(tmp_path / "src")
    record = convert.convert("cifar10", str(tmp_path / "src"), str(tmp_path / "out"))
    assert record["splits"] == {"train": {"images": 15}, "val": {"images": 10}}
    _check_against(CIFAR10(str(tmp_path / "src"), train=True), tmp_path / "out", "train")
    _check_against(CIFAR10(str(tmp_path / "src"), train=False), tmp_path / "out", "val")
    # a rerun of the same command is a no-op; another conversion into OUT is refused
    assert convert.convert("cifar10", str(tmp_path / "src"), str(tmp_path / "out")) == record
    with pytest.raises(DataError, match="holds another conversion"):
        convert.convert("cifar100", str(tmp_path / "src"), str(tmp_path / "out"))


def test_cifar100_packed_equals_torchvisions_reading(tmp_path, tv_cifar):
    _, CIFAR100 = tv_cifar
    folder = tmp_path / "src" / "cifar-100-python"
    folder.mkdir(parents=True)
    _cifar_batch(folder / "train", 130, 100, 1, "fine_labels")
    _cifar_batch(folder / "test", 100, 100, 2, "fine_labels")
    # fine_label_names out of alphabetical order: folders are then numbered in label order
    names = [f"c{(37 * i) % 100:02d}" for i in range(100)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": [f"s{i}" for i in range(20)]}, f, protocol=2)
    manifest = convert.convert("cifar100", str(folder), str(tmp_path / "out"), pack=True,
                               shard_size=64 * 1024, workers=1, progress=False)
    assert not (tmp_path / "out" / convert.TREE).exists()
    assert manifest["converted"] == {"kind": "cifar100", "classes": names}
    for split, train in (("train", True), ("val", False)):
        reference = CIFAR100(str(tmp_path / "src"), train=train)
        packed = PackedSplit(str(tmp_path / "out"), split)
        assert packed.classes == [f"{i:02d}_{n}" for i, n in enumerate(names)]
        assert packed.shard_paths and len(packed.shard_paths) > 1
        by_name = {os.path.basename(p): k for k, p in enumerate(packed.paths)}
        assert len(by_name) == len(reference)
        for i in range(len(reference)):
            image, label = reference[i]
            k = by_name[f"{split}_{i:05d}.png"]
            assert packed.labels[k] == label
            assert np.array_equal(_pixels(packed.read(k)), np.asarray(image))
    # the loader reads the packed PNGs: val in index order, the labels and (at the native 32 px,
    # nothing resized or cropped away) the pixels torchvision reads
    import torch
    from fastdeit.data import DataConfig, build_loader

    cfg = DataConfig(root=str(tmp_path / "out"), img_size=32, eval_crop_pct=1.0, rand_augment=None,
                     device="cpu", num_threads=1, repeated_aug=1)
    loader = build_loader(cfg, "val", 50, 0, 1, 0, torch.device("cpu"))
    xs, ys = zip(*loader)
    loader.close()
    packed = PackedSplit(str(tmp_path / "out"), "val")
    assert torch.cat(ys).tolist() == packed.labels.tolist()
    std, mean = torch.tensor(cfg.std).view(1, 3, 1, 1), torch.tensor(cfg.mean).view(1, 3, 1, 1)
    pixels = ((torch.cat(xs).float() * std + mean) * 255).round().permute(0, 2, 3, 1)
    expect = torch.stack([torch.from_numpy(_pixels(packed.read(k)).copy()) for k in range(len(packed))]).float()
    assert (pixels - expect).abs().max() <= 1


@pytest.mark.parametrize("damage, match", [
    (lambda d: os.remove(d / "data_batch_3"), "missing CIFAR file .*data_batch_3"),
    (lambda d: _cifar_batch(d / "data_batch_2", 3, 11, 3), r"data_batch_2: label 10 of item \d+ is out of range"),
    (lambda d: (d / "test_batch").write_bytes((d / "test_batch").read_bytes()[:100]),
     "test_batch: not a readable CIFAR pickle"),
    (lambda d: os.remove(d / "batches.meta"), "missing CIFAR file .*batches.meta"),
])
def test_cifar_bad_inputs_name_the_file(tmp_path, damage, match):
    folder = make_cifar10(tmp_path / "src")
    damage(folder)
    with pytest.raises(DataError, match=match):
        convert.convert("cifar10", str(folder), str(tmp_path / "out"))


def test_command_line_error_is_one_line(tmp_path, capsys):
    folder = make_cifar10(tmp_path / "src")
    os.remove(folder / "test_batch")
    with pytest.raises(SystemExit) as info:
        convert.main(["cifar10", str(folder), str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastdeit.data.convert: error: missing CIFAR file {folder / 'test_batch'}"]


# -- iNaturalist ----------------------------------------------------------------------------------

def reference_inat_samples(root, train, year, category="name"):
    """facebookresearch/deit datasets.py INatDataset.__init__, re-implemented from the source
    (its targeter and samples; the transform and loader left out)."""
    with open(os.path.join(root, f'{"train" if train else "val"}{year}.json')) as f:
        data = json.load(f)
    with open(os.path.join(root, "categories.json")) as f:
        data_catg = json.load(f)
    with open(os.path.join(root, f"train{year}.json")) as f:
        data_for_targeter = json.load(f)
    targeter, indexer = {}, 0
    for elem in data_for_targeter["annotations"]:
        king = [data_catg[int(elem["category_id"])][category]]
        if king[0] not in targeter.keys():
            targeter[king[0]] = indexer
            indexer += 1
    samples = []
    for elem in data["images"]:
        cut = elem["file_name"].split("/")
        target_current = int(cut[2])
        path_current = os.path.join(root, cut[0], cut[2], cut[3])
        samples.append((path_current, targeter[data_catg[target_current][category]]))
    return samples, len(targeter)


def make_inat(root, year=2018, flat=True):
    """Categories whose names do not sort in first-appearance order; the reference's
    flattened tree (<folder>/<category id>/<file>) or the published one (with supercategory)."""
    names = ["Zostera marina", "Abies alba", "Mus musculus"]
    supers = ["Plantae", "Plantae", "Mammalia"]
    cats = [{"id": i, "name": n, "supercategory": s, "kingdom": "k"} for i, (n, s) in enumerate(zip(names, supers))]
    (root).mkdir(parents=True)
    (root / "categories.json").write_text(json.dumps(cats))
    image_id = 0
    for split, order in (("train", [2, 0, 1, 2, 0, 1]), ("val", [1, 2, 0])):
        images, anns = [], []
        for k, cid in enumerate(order):
            rel = f"train_val{year}/{supers[cid]}/{cid}/{split}{k:03d}.jpg"
            disk = root / (f"train_val{year}/{cid}/{split}{k:03d}.jpg" if flat else rel)
            disk.parent.mkdir(parents=True, exist_ok=True)
            disk.write_bytes(_jpeg(image_id))
            images.append({"id": image_id, "file_name": rel, "width": 12, "height": 9})
            anns.append({"id": image_id, "image_id": image_id, "category_id": cid})
            image_id += 1
        (root / f"{split}{year}.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                              "categories": cats}))
    return root


@pytest.mark.parametrize("year, flat", [(2018, True), (2019, False)])
def test_inat_labels_are_the_references(tmp_path, year, flat):
    src = make_inat(tmp_path / "src", year, flat)
    out = tmp_path / "out"
    convert.convert(f"inat{year}", str(src), str(out))
    for split in ("train", "val"):
        found, classes = _tree(out, split)
        # the reference's order: first appearance among the train annotations (category 2 first)
        assert classes == ["0_Mus musculus", "1_Zostera marina", "2_Abies alba"]
        if flat:
            samples, nb_classes = reference_inat_samples(str(src), split == "train", year)
            assert nb_classes == 3 and len(found) == len(samples)
            for path, target in samples:
                ours, label = found[os.path.basename(path)]
                assert label == target
                assert open(ours, "rb").read() == open(path, "rb").read()   # bytes as they were
        else:
            assert len(found) == {"train": 6, "val": 3}[split]


def test_inat_missing_image_names_the_file(tmp_path):
    src = make_inat(tmp_path / "src")
    victim = src / "train_val2018" / "1" / "val000.jpg"
    os.remove(victim)
    with pytest.raises(DataError, match="missing image file .*train_val2018/Plantae/1/val000.jpg"):
        convert.convert("inat2018", str(src), str(tmp_path / "out"))
    os.remove(src / "val2018.json")
    with pytest.raises(DataError, match="missing annotation file .*val2018.json"):
        convert.convert("inat2018", str(src), str(tmp_path / "out2"))


# -- Flowers-102 and Stanford Cars (.mat) ------------------------------------------------------

def make_flowers(root):
    import scipy.io

    (root / "jpg").mkdir(parents=True)
    n = 3 * 102
    labels = np.array([[(i * 5) % 102 + 1 for i in range(n)]], dtype=np.uint8)   # 1-based, as published
    for i in range(1, n + 1):
        (root / "jpg" / f"image_{i:05d}.jpg").write_bytes(_jpeg(i, (6, 5)))
    ids = np.arange(1, n + 1)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": labels})
    scipy.io.savemat(root / "setid.mat", {"trnid": ids[None, 0:102], "valid": ids[None, 102:204],
                                          "tstid": ids[None, 204:]})
    return root


def test_flowers102_split_and_labels_against_scipy(tmp_path):
    import scipy.io

    src = make_flowers(tmp_path / "src")
    out = tmp_path / "out"
    record = convert.convert("flowers102", str(src), str(out))
    assert record["splits"] == {"train": {"images": 204}, "val": {"images": 102}}
    labels = scipy.io.loadmat(src / "imagelabels.mat")["labels"][0]
    setid = scipy.io.loadmat(src / "setid.mat")
    for split, ids in (("train", np.concatenate([setid["trnid"][0], setid["valid"][0]])),
                       ("val", setid["tstid"][0])):
        found, classes = _tree(out, split)
        assert classes == [f"{c:03d}" for c in range(1, 103)]
        assert sorted(found) == sorted(f"image_{i:05d}.jpg" for i in ids)
        for i in ids:
            path, label = found[f"image_{i:05d}.jpg"]
            assert label == labels[i - 1] - 1
            assert open(path, "rb").read() == (src / "jpg" / f"image_{i:05d}.jpg").read_bytes()


def test_flowers102_bad_id_names_the_file(tmp_path):
    import scipy.io

    src = make_flowers(tmp_path / "src")
    scipy.io.savemat(src / "setid.mat", {"trnid": np.array([[1, 999]]), "valid": np.array([[2]]),
                                         "tstid": np.array([[3]])})
    with pytest.raises(DataError, match=r"setid.mat: image id 999 is not in 1..306"):
        convert.convert("flowers102", str(src), str(tmp_path / "out"))


CAR_NAMES = ["Zeta Roadster 2012", "Alpha Sedan 2010", "Mid Coupe 2011"]


def _struct(rows, fields):
    arr = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    for k, row in enumerate(rows):
        for f, v in zip(fields, row):
            arr[0, k][f] = np.array([[v]]) if isinstance(v, (int, np.integer)) else v
    return arr


def test_cars_full_archive_against_scipy(tmp_path):
    import scipy.io

    src = tmp_path / "src"
    (src / "car_ims").mkdir(parents=True)
    rows = []
    for k in range(12):
        rel = f"car_ims/{k + 1:06d}.jpg"
        (src / rel).write_bytes(_jpeg(k))
        rows.append((rel, 1, 2, 10, 8, k % 3 + 1, int(k >= 6)))
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    names = np.empty((1, 3), dtype=object)
    names[0, :] = CAR_NAMES
    scipy.io.savemat(src / "cars_annos.mat", {"annotations": _struct(rows, fields), "class_names": names})
    out = tmp_path / "out"
    convert.convert("cars", str(src), str(out))
    mat = scipy.io.loadmat(src / "cars_annos.mat")
    ann = mat["annotations"][0]
    for split, test in (("train", 0), ("val", 1)):
        found, classes = _tree(out, split)
        assert classes == [f"{i}_{n}" for i, n in enumerate(str(n[0]) for n in mat["class_names"][0])]
        expect = {os.path.basename(str(a["relative_im_path"][0])): int(a["class"][0, 0]) - 1
                  for a in ann if int(a["test"][0, 0]) == test}
        assert {name: label for name, (_, label) in found.items()} == expect


def test_cars_devkit_and_unlabelled_test_annotations(tmp_path):
    import scipy.io

    src = tmp_path / "src"
    (src / "devkit").mkdir(parents=True)
    names = np.empty((1, 3), dtype=object)
    names[0, :] = CAR_NAMES
    scipy.io.savemat(src / "devkit" / "cars_meta.mat", {"class_names": names})
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    rows = {}
    for split, folder in (("train", "cars_train"), ("test", "cars_test")):
        (src / folder).mkdir()
        rows[split] = []
        for k in range(6):
            (src / folder / f"{k + 1:05d}.jpg").write_bytes(_jpeg(k + (100 if split == "test" else 0)))
            rows[split].append((1, 2, 10, 8, (k + (split == "test")) % 3 + 1, f"{k + 1:05d}.jpg"))
    scipy.io.savemat(src / "devkit" / "cars_train_annos.mat", {"annotations": _struct(rows["train"], fields)})
    # the published cars_test_annos.mat has no class field: refused, naming the labelled file
    unlabelled = [r[:4] + r[5:] for r in rows["test"]]
    scipy.io.savemat(src / "devkit" / "cars_test_annos.mat",
                     {"annotations": _struct(unlabelled, [f for f in fields if f != "class"])})
    with pytest.raises(DataError, match="cars_test_annos.mat: annotations have no 'class'.*withlabels"):
        convert.convert("cars", str(src), str(tmp_path / "bad"))
    scipy.io.savemat(src / "devkit" / "cars_test_annos_withlabels.mat",
                     {"annotations": _struct(rows["test"], fields)})
    out = tmp_path / "out"
    convert.convert("cars", str(src), str(out))
    for split, mat in (("train", "cars_train_annos.mat"), ("val", "cars_test_annos_withlabels.mat")):
        ann = scipy.io.loadmat(src / "devkit" / mat)["annotations"][0]
        found, classes = _tree(out, split)
        assert classes == ["0_Zeta Roadster 2012", "1_Alpha Sedan 2010", "2_Mid Coupe 2011"]
        assert {n: l for n, (_, l) in found.items()} == {str(a["fname"][0]): int(a["class"][0, 0]) - 1 for a in ann}


# -- Hugging Face parquet --------------------------------------------------------------------------

HF_NAMES = ["tench", "goldfish", "great white shark"]


def _image_bytes(k):
    """JPEGs mostly, one PNG and one WebP (neither JPEG nor PNG: written as a lossless PNG)."""
    if k % 5 == 3:
        buf = io.BytesIO()
        Image.fromarray(np.full((7, 9, 3), 40 * (k % 6), np.uint8)).save(buf, "PNG")
        return buf.getvalue()
    if k % 5 == 4:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (7, 9, 3), dtype=np.uint8)).save(
            buf, "WEBP", lossless=True)
        return buf.getvalue()
    return _jpeg(k)


def _write_parquet(path, rows, names=HF_NAMES):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.array([{"bytes": b, "path": f"img{k}.JPEG"} for k, (b, _) in enumerate(rows)],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "label": pa.array([l for _, l in rows], type=pa.int64())})
    if names is not None:   # what datasets writes: the DatasetInfo's features as JSON
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)


def make_parquet(root, names=HF_NAMES):
    k = 0
    for rel, n in (("data/train-00000-of-00002.parquet", 7), ("data/train-00001-of-00002.parquet", 6),
                   ("data/validation-00000-of-00001.parquet", 5)):
        rows = []
        for i in range(n):
            rows.append((_image_bytes(k), i % 3))
            k += 1
        _write_parquet(root / rel, rows, names)
    _write_parquet(root / "data/test-00000-of-00001.parquet", [(_jpeg(99), -1)], names)   # hidden labels
    return root


def _parquet_rows(root, split):
    """(file stem, row, bytes, label) of a split, read back with pyarrow."""
    import pyarrow.parquet as pq

    out = []
    for f in sorted((root / "data").glob("train-*" if split == "train" else "validation-*")):
        table = pq.read_table(f)
        for row, (image, label) in enumerate(zip(table.column("image").to_pylist(), table.column("label").to_pylist())):
            out.append((f"data_{f.stem}", row, image["bytes"], label))
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_hf_parquet_bytes_copied_labels_and_names(tmp_path, pack):
    import pyarrow.parquet as pq

    src = make_parquet(tmp_path / "src")
    out = tmp_path / "out"
    convert.convert("hf-parquet", str(src), str(out), pack=pack, shard_size=16 * 1024, workers=1, progress=False)
    names = json.loads(pq.read_schema(src / "data/train-00000-of-00002.parquet").metadata[b"huggingface"])
    assert names["info"]["features"]["label"]["names"] == HF_NAMES
    for split in ("train", "val"):
        rows = _parquet_rows(src, split)
        if pack:
            packed = PackedSplit(str(out), split)
            classes = packed.classes
            by_name = {os.path.basename(p): (packed.read(k), packed.labels[k]) for k, p in enumerate(packed.paths)}
        else:
            found, classes = _tree(out, split)
            by_name = {n: (open(p, "rb").read(), l) for n, (p, l) in found.items()}
        assert classes == ["0_tench", "1_goldfish", "2_great white shark"]
        assert len(by_name) == len(rows) == {"train": 13, "val": 5}[split]   # test left out
        for stem, row, data, label in rows:
            ext = {b"\xff\xd8": ".jpg", b"\x89P": ".png"}.get(data[:2], ".png")
            ours, ours_label = by_name[f"{stem}.row{row:07d}{ext}"]
            assert ours_label == label
            if data[:2] in (b"\xff\xd8", b"\x89P"):
                assert ours == data                                   # JPEG/PNG bytes as they were
            else:
                assert ours[:4] == b"\x89PNG" and np.array_equal(_pixels(ours), _pixels(data))   # lossless


def test_hf_parquet_without_names_and_bad_rows(tmp_path):
    src = make_parquet(tmp_path / "src", names=None)
    convert.convert("hf-parquet", str(src), str(tmp_path / "out"))
    assert _tree(tmp_path / "out", "train")[1] == ["0", "1", "2"]
    bad = src / "data/validation-00000-of-00001.parquet"
    _write_parquet(bad, [(_jpeg(1), 0), (_jpeg(2)[:60], 1), (_jpeg(3), 2)])
    # corrupt bytes: named by the file whose name carries the parquet file and row, in both modes
    with pytest.raises(DataError, match=r"1 of 16 images do not decode: .*/val/1_goldfish/"
                                        r"data_validation-00000-of-00001\.row0000001\.jpg: "):
        convert.convert("hf-parquet", str(src), str(tmp_path / "out2"), workers=1, progress=False)
    with pytest.raises(DataError, match=r"1 images do not decode: .*"
                                        r"data_validation-00000-of-00001\.row0000001\.jpg: "):
        convert.convert("hf-parquet", str(src), str(tmp_path / "out2p"), pack=True, workers=1, progress=False)
    _write_parquet(bad, [(_jpeg(1), 0), (_jpeg(2), 7)])
    with pytest.raises(DataError, match=r"validation-00000-of-00001.parquet: row 1: label 7 is out of range for 3"):
        convert.convert("hf-parquet", str(src), str(tmp_path / "out3"))
    os.remove(bad)
    with pytest.raises(DataError, match="no val parquet files in"):
        convert.convert("hf-parquet", str(src), str(tmp_path / "out4"))


def test_converted_tree_refuses_a_foreign_out(tmp_path):
    src = make_flowers(tmp_path / "src")
    (tmp_path / "out" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="already holds train/ not written by this command"):
        convert.convert("flowers102", str(src), str(tmp_path / "out"))
