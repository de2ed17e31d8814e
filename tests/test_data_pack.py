"""Packed splits (pack.py, shards.py): the shards against tarfile and the source files, the
loader's batches from shards against those from the folder, resume, bad input, the CLI."""
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch

from fastdeit.data import DataConfig, build_loader
from fastdeit.data import pack as packmod
from fastdeit.data.loading.folder import scan_image_folder
from fastdeit.data.loading.shards import ShardError, open_split

CPU = torch.device("cpu")
SHARD = "24KB"  # the synthetic tree (132 images of 2-5 KB) spreads over several shards


def cfg_for(root, **kw):
    base = dict(root=str(root), img_size=32, num_threads=2, device="cpu",
                rand_augment="rand-m9-mstd0.5-inc1", repeated_aug=3)
    base.update(kw)
    return DataConfig(**base)


def pack(root, out, *extra):
    assert packmod.main([str(root), str(out), "--shard-size", SHARD, "--quiet", *extra]) == 0
    return str(out)


@pytest.fixture(scope="module")
def packed(synthetic_tree, tmp_path_factory):
    return pack(synthetic_tree, tmp_path_factory.mktemp("packed") / "out", "--workers", "2")


def batches(root, split, rank, world, epoch=0, skip=0, batch=8, **kw):
    loader = build_loader(cfg_for(root, **kw), split, batch, rank, world, 3, CPU)
    loader.set_epoch(epoch, skip_batches=skip)
    out = list(loader)
    loader.close()
    return out


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for (x, y), (u, v) in zip(a, b):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_shards_are_plain_tars_of_the_source_bytes(synthetic_tree, packed):
    """Read back with tarfile (the reference): every image's bytes equal its source file's,
    its .cls is the ImageFolder label, the index offsets are tarfile's, shards respect the
    size; every image is in exactly one shard."""
    manifest = json.load(open(os.path.join(packed, "manifest.json")))
    assert manifest["format"] == "fastdeit-shards" and manifest["version"] == 1
    for split in ("train", "val"):
        files, labels, classes = scan_image_folder(os.path.join(synthetic_tree, split))
        source = open_split(packed, split)
        assert source.classes == classes == manifest["splits"][split]["classes"]
        assert source.labels.tolist() == labels and len(source) == len(files)
        idx = source.split
        assert idx.paths == [os.path.relpath(f, os.path.join(synthetic_tree, split)) for f in files]
        shards = sorted(p for p in os.listdir(os.path.join(packed, split)) if p.endswith(".tar"))
        assert len(shards) == manifest["splits"][split]["shards"] > 2
        seen = {}
        for s, name in enumerate(shards):
            path = os.path.join(packed, split, name)
            assert os.path.getsize(path) <= packmod.parse_size(SHARD)
            with tarfile.open(path) as tar:
                members = tar.getmembers()
                for m in members:
                    key, ext = m.name.split(".")
                    data = tar.extractfile(m).read()
                    if ext == "cls":
                        assert int(data) == labels[int(key)]
                        continue
                    assert ext == "jpg"
                    i = int(key)
                    assert data == open(files[i], "rb").read()      # copied, not re-encoded
                    assert (idx.shard[i], idx.offset[i], idx.size[i]) == (s, m.offset_data, m.size)
                    assert i not in seen
                    seen[i] = s
        assert sorted(seen) == list(range(len(files)))
    # the placement is shuffled: the first shard holds several classes
    first = open_split(packed, "train").split
    assert len(set(first.labels[first.shard == 0].tolist())) > 1


@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_from_shards_equal_batches_from_the_folder(synthetic_tree, packed, split):
    """Same seed: bit-identical batches from the shards and from the folder, with repeated
    augmentation and RandAugment, for rank 0 and 1 of world 2 and two epochs (val: its partial
    last batch too)."""
    for rank, epoch in ((0, 1), (1, 2)):
        folder = batches(synthetic_tree, split, rank, 2, epoch, batch=5)
        shards = batches(packed, split, rank, 2, epoch, batch=5)
        assert_same(folder, shards)
    # the ranks differ (the test is not comparing constants)
    assert not torch.equal(batches(packed, split, 0, 2, batch=5)[0][0],
                           batches(packed, split, 1, 2, batch=5)[0][0])


def test_val_loader_reused_across_evaluations_and_sizes(packed):
    loader = build_loader(cfg_for(packed), "val", 8, 0, 1, 0, CPU)
    sizes = [[x.shape[0] for x, _ in loader] for _ in range(3)]
    assert sizes == [[8, 8, 8, 8, 4]] * 3
    abandoned = iter(loader)
    next(abandoned)  # part way: the next evaluation rebuilds and reads everything again
    assert [x.shape[0] for x, _ in loader] == [8, 8, 8, 8, 4]
    loader.close()


def test_mid_epoch_resume_from_shards(packed, synthetic_tree):
    full = batches(packed, "train", 1, 2, epoch=4)
    assert len(full) == 6
    for skip in (1, 4, 6):
        rest = batches(packed, "train", 1, 2, epoch=4, skip=skip)
        assert len(rest) == 6 - skip
        for (x, y), (fx, fy) in zip(rest, full[skip:]):
            assert torch.equal(x, fx) and torch.equal(y, fy)
    assert_same(full[2:], batches(synthetic_tree, "train", 1, 2, epoch=4, skip=2))


def test_file_list_subset_from_shards(synthetic_tree, packed, tmp_path):
    files, _, _ = scan_image_folder(os.path.join(synthetic_tree, "train"))
    rel = [os.path.relpath(f, os.path.join(synthetic_tree, "train")) for f in files[5:45:3]]
    listing = tmp_path / "subset.txt"
    listing.write_text("# subset\n" + "\n".join(rel) + "\n")
    kw = dict(train_list=str(listing), repeated_aug=1)
    assert_same(batches(synthetic_tree, "train", 0, 1, batch=4, **kw),
                batches(packed, "train", 0, 1, batch=4, **kw))
    listing.write_text("class_000/nope.jpg\n")
    with pytest.raises(ValueError, match=r"subset.txt:1: 'class_000/nope.jpg'"):
        build_loader(cfg_for(packed, **kw), "train", 4, 0, 1, 0, CPU)


def test_packed_val_gives_the_folder_top1(synthetic_tree, packed):
    import timm

    from fastdeit.evaluate import evaluate

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4)
    results = []
    for root in (synthetic_tree, packed):
        loader = build_loader(cfg_for(root), "val", 8, 0, 1, 0, CPU)
        results.append(evaluate(model, loader, torch.float32, CPU))
        loader.close()
    assert results[0] == results[1] and results[0]["val/images"] == 36


def test_shard_reader_threads_end_with_the_loader(packed):
    """Rebuilding per epoch, abandoning an epoch, dropping the loader without close(): the
    read-ahead threads end with their pipelines (the train loader's CPU producer holds the
    loader only weakly)."""
    import gc
    import time

    def threads():
        return len(os.listdir("/proc/self/task"))

    def cycle():
        loader = build_loader(cfg_for(packed), "train", 8, 0, 1, 0, CPU)
        for e in range(3):
            loader.set_epoch(e)
            next(iter(loader))
        del loader
        gc.collect()

    cycle()  # torch and DALI start their own process-wide pools once
    before = threads()
    for _ in range(3):
        cycle()
    for _ in range(50):  # joined threads leave /proc a moment later on a busy machine
        if threads() <= before:
            break
        time.sleep(0.1)
    assert threads() <= before


def test_gpu_branch_on_cpu_operators_from_shards_equals_the_folder(synthetic_tree, packed,
                                                                    monkeypatch):
    """The loader's GPU branch (DALI's iterator reading the feed to StopIteration, the train
    skip, val's partial batch) run on CPU operators (Placement.gpu_layout_on_cpu): the same
    batches bit for bit from the shards as from the folder, also resumed mid-epoch."""
    from fastdeit.data.loading import loader as loader_module
    from fastdeit.data.loading.pipeline import Placement

    monkeypatch.setattr(loader_module, "resolve_placement",
                        lambda cfg, device: Placement(None, gpu_layout_on_cpu=True))
    for split in ("train", "val"):
        folder = batches(synthetic_tree, split, 1, 2, epoch=2, batch=5)
        shards = batches(packed, split, 1, 2, epoch=2, batch=5)
        assert_same(folder, shards)
    assert [len(y) for _, y in shards] == [5, 5, 5, 3]     # val: 18 images on rank 1
    full = batches(packed, "train", 1, 2, epoch=2, batch=5)
    assert_same(full[3:], batches(packed, "train", 1, 2, epoch=2, skip=3, batch=5))


@pytest.mark.gpu
def test_gpu_batches_from_shards_match_the_folder(synthetic_tree, packed):
    """GPU decoding (nvJPEG) from the shards: the folder's batches (labels equal; images to
    1e-5, GPU kernels need not be bit-reproducible), train and val."""
    dev = torch.device("cuda", 0)
    for split in ("train", "val"):
        out = []
        for root in (synthetic_tree, packed):
            loader = build_loader(cfg_for(root, device="gpu"), split, 8, 1, 2, 3, dev)
            loader.set_epoch(1)
            out.append(list(loader))
            loader.close()
        assert len(out[0]) == len(out[1]) > 0
        for (x, y), (u, v) in zip(*out):
            assert x.device == dev and torch.equal(y, v) and (x - u).abs().max() < 1e-5


# -- bad input ------------------------------------------------------------------------------

@pytest.fixture
def copy(packed, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(packed, out)
    return out


def _build(root, split="train"):
    return build_loader(cfg_for(root), split, 8, 0, 1, 0, CPU)


def test_truncated_or_missing_shard_named_at_start(copy):
    shard = copy / "train" / "shard-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-4000])
    with pytest.raises(ShardError, match=rf"{re.escape(str(shard))} is truncated"):
        _build(copy)
    shard.unlink()
    with pytest.raises(ShardError, match=rf"shard missing .*{re.escape(str(shard))}"):
        _build(copy)


def test_index_of_another_pack_named_at_start(synthetic_tree, copy, tmp_path):
    other = pack(synthetic_tree, tmp_path / "other", "--workers", "1", "--shard-size", "60KB")
    shutil.copy(os.path.join(other, "train", "index.npz"), copy / "train" / "index.npz")
    with pytest.raises(ShardError, match=re.escape(str(copy / "train" / "index.npz"))):
        _build(copy)


def test_index_not_matching_its_shards_stops_the_epoch_naming_both(copy):
    """Entries swapped inside one shard pass the size checks; every read checks the member's
    tar header against the index, so the epoch stops (no hang) naming index, shard, member."""
    path = copy / "train" / "index.npz"
    z = dict(np.load(path))
    a, b = np.flatnonzero(z["shard"] == 0)[:2]
    for k in ("offset", "size"):
        z[k][[a, b]] = z[k][[b, a]]
    np.savez(path, **z)
    loader = _build(copy)
    loader.set_epoch(0)
    with pytest.raises(ShardError, match=rf"{re.escape(str(path))} does not match shard "
                                         rf"{re.escape(str(copy / 'train' / 'shard-000000.tar'))}"):
        list(loader)


def test_manifest_of_another_version_named(copy):
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=rf"{re.escape(str(path))} is fastdeit-shards version 99"):
        _build(copy)


def test_unfinished_pack_is_not_taken_for_a_folder(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(ValueError, match="unfinished pack"):
        _build(copy)


def test_undecodable_member_named_with_its_shard(copy):
    """Bytes damaged inside a shard after packing: the error names the shard and member."""
    source = open_split(str(copy), "train").split
    key = int(np.flatnonzero(source.shard == 1)[0])
    with open(source.shard_paths[1], "r+b") as f:
        f.seek(int(source.offset[key]))
        f.write(b"x" * int(source.size[key]))
    loader = build_loader(cfg_for(copy, repeated_aug=1), "train", 8, 0, 1, 0, CPU)
    loader.set_epoch(0)
    with pytest.raises(RuntimeError, match=rf"cannot decode image {re.escape(source.shard_paths[1])}"
                                           rf" member {key:08d}.jpg \(packed from class_"):
        list(loader)


# -- the CLI --------------------------------------------------------------------------------

def _files(out):
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(out) for f in fs if f != "manifest.json"}


def test_pack_resumes_after_interruption(synthetic_tree, packed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    real = packmod.check_image_bytes

    def interrupt_midway(data):
        calls["n"] += 1
        if calls["n"] == 70:
            raise KeyboardInterrupt
        return real(data)

    monkeypatch.setattr(packmod, "check_image_bytes", interrupt_midway)
    args = [str(synthetic_tree), str(out), "--shard-size", SHARD, "--workers", "1", "--quiet"]
    assert packmod.main(args) == 130
    assert not (out / "manifest.json").exists()
    done = sorted((out / "train").glob("shard-*.tar"))
    assert 2 <= len(done) and not list(out.rglob("*.partial"))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done}
    # what a killed run leaves: a stale partial file
    (out / "train" / "shard-000009.tar.partial").write_bytes(b"junk")
    monkeypatch.setattr(packmod, "check_image_bytes", real)
    assert packmod.main(args) == 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == before  # kept
    assert _files(out) == _files(packed)       # identical to an uninterrupted pack
    assert packmod.main(args) == 0             # a finished pack: nothing to do
    assert _files(out) == _files(packed)


def test_pack_lists_every_undecodable_file_and_writes_no_manifest(tmp_path, capsys):
    from tests.conftest import write_flat_tree

    ids = write_flat_tree(tmp_path / "tree", "train", classes=2, per_class=6)
    open(ids[3][0], "w").write("not a JPEG")
    data = open(ids[8][0], "rb").read()
    open(ids[8][0], "wb").write(data[:150])
    out = tmp_path / "out"
    assert packmod.main([str(tmp_path / "tree"), str(out), "--quiet", "--workers", "2",
                         "--shard-size", "4KB"]) == 1
    err = capsys.readouterr().err
    assert "2 files do not decode" in err and ids[3][0] in err and ids[8][0] in err
    assert not (out / "manifest.json").exists()
    # fixed (the tree changed): the rerun starts the split over and finishes
    for k in (3, 8):
        shutil.copy(ids[0][0], ids[k][0])
    assert packmod.main([str(tmp_path / "tree"), str(out), "--quiet", "--shard-size", "4KB"]) == 0
    assert_same(batches(tmp_path / "tree", "train", 0, 1, batch=4, repeated_aug=1),
                batches(out, "train", 0, 1, batch=4, repeated_aug=1))


def test_pack_refuses_to_overwrite_a_finished_pack_of_another_tree(synthetic_tree, copy, tmp_path):
    from tests.conftest import write_flat_tree

    write_flat_tree(tmp_path / "tree", "train", classes=2, per_class=3)
    before = _files(copy)
    with pytest.raises(ValueError, match="finished pack of another tree"):
        packmod.pack(str(tmp_path / "tree"), str(copy), progress=False)
    assert _files(copy) == before  # untouched, and still loads
    _build(copy)


def test_parse_size():
    assert packmod.parse_size("1GB") == 10**9 and packmod.parse_size("256MiB") == 2**28
    assert packmod.parse_size("4096") == 4096 and packmod.parse_size("2.5 kb") == 2500
    with pytest.raises(ValueError):
        packmod.parse_size("lots")


@pytest.mark.slow
def test_train_and_eval_through_the_entry_points_from_shards(dataset, tmp_path):
    """`data.root=<packed>` with no other change: launch/train.py on 2 ranks trains and
    evaluates from the shards, and launch/eval.py gives the same top-1 on the packed val/ as
    on the folder."""
    from tests.launching import launch, records

    packed = pack(dataset, tmp_path / "packed")
    run = tmp_path / "run"
    launch(f"data.root={packed}", f"trainer.run_dir={run}", "trainer.epochs=1",
           "model.name=deit_tiny_patch16_224", "distill.type=none")
    last = records(run, "epoch")[-1]
    assert last["step"] == 192 // 32 and last["val/images"] == 40
    top1 = {}
    for name, root in (("folder", dataset), ("packed", packed)):
        out = tmp_path / f"eval-{name}.json"
        launch(str(run), f"data.root={root}", "--out", str(out), script="eval.py", ranks=1,
               tiny=False)
        result = json.loads(out.read_text())
        assert result["val/images"] == 40
        top1[name] = result["val/cls_top1"]
    assert top1["folder"] == top1["packed"] == last["val/cls_top1"]
