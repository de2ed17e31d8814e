"""python -m fastdeit.data.verify ROOT: every image decoded once, the bad ones listed with the
reason (PIL's, through imagecheck), an exclusion list the loader applies by itself; a bad file
that slipped through still stops the epoch with its name."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastdeit.data import DataConfig, build_loader
from fastdeit.data.imagecheck import check_image_file
from fastdeit.data.loading.folder import EXCLUDE_FILE, read_exclusions
from fastdeit.errors import BadImageError, DataError
from tests.conftest import write_flat_tree
from tests.childenv import child_env
from tests.launching import ROOT, TINY, launch, records

CPU = torch.device("cpu")


def damage(root):
    """Three bad files among the flat tree's good ones; {path relative to root: path}."""
    ids = write_flat_tree(root, "train", classes=2, per_class=6)
    write_flat_tree(root, "val", classes=2, per_class=3)
    truncated, garbage = ids[3][0], ids[8][0]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(truncated, quality=90)
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: int(len(data) * 0.6)])      # cut inside the scan data
    open(garbage, "w").write("not a JPEG, despite the name")
    empty = os.path.join(root, "val", "cls1", "img004.jpg")
    open(empty, "wb").close()
    return {os.path.relpath(p, root): p for p in (truncated, garbage, empty)}


def verify(*args):
    return subprocess.run([sys.executable, "-m", "fastdeit.data.verify", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=child_env(None))


def listed(path):
    return [line for line in open(path).read().splitlines() if line and not line.startswith("#")]


def cfg_for(root, **kw):
    return DataConfig(root=str(root), img_size=32, num_threads=1, host_threads=1, device="cpu",
                      rand_augment=None, repeated_aug=1, **kw)


def epoch(loader):
    loader.set_epoch(0)
    return [y for _, y in loader]


def test_verify_lists_the_bad_files_and_the_loader_leaves_them_out(tmp_path):
    bad = damage(tmp_path)
    proc = verify(tmp_path, "--workers", 2)
    assert proc.returncode == 0, proc.stderr
    assert "decoding (2 workers)" in proc.stderr                         # the progress bar
    # Each bad file, once, with the reason PIL (imagecheck) gives; nothing else.
    reported = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line and
                    not line.startswith(("15 files", "18 files")))
    assert reported == {rel: check_image_file(path) for rel, path in bad.items()}
    assert "truncated" in reported[next(r for r in bad if "train/cls0" in r)]
    assert reported[next(r for r in bad if r.startswith("val"))] == "empty file"
    assert f"18 files in train, val of {tmp_path}: 3 do not decode and are listed in " \
           f"{tmp_path / EXCLUDE_FILE}" in proc.stdout
    assert sorted(listed(tmp_path / EXCLUDE_FILE)) == sorted(bad)

    # The list in ROOT is applied by itself: the bad files are gone, their labels with them.
    train = build_loader(cfg_for(tmp_path), "train", 2, 0, 1, 0, CPU)
    val = build_loader(cfg_for(tmp_path), "val", 2, 0, 1, 0, CPU)
    assert train.excluded == (2, str(tmp_path / EXCLUDE_FILE)) and val.excluded[0] == 1
    assert set(train._source.files) | set(val._source.files) == {
        os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".jpg")} - set(bad.values())
    assert len(torch.cat(epoch(train))) == 10 and len(torch.cat(epoch(val))) == 5   # decodes through
    train.close(), val.close()

    # Without the list the loader still stops at the first bad file, naming it and the verifier.
    os.replace(tmp_path / EXCLUDE_FILE, tmp_path / "elsewhere.txt")
    loader = build_loader(cfg_for(tmp_path), "train", 2, 0, 1, 0, CPU)
    assert loader.excluded is None
    with pytest.raises(BadImageError, match="fastdeit.data.verify"):
        epoch(loader)
    # data.exclude_list names a list anywhere.
    loader = build_loader(cfg_for(tmp_path, exclude_list=str(tmp_path / "elsewhere.txt")), "train", 2, 0, 1, 0, CPU)
    assert loader.excluded[0] == 2 and len(torch.cat(epoch(loader))) == 10


def test_rerun_after_repairs_and_a_clean_tree(tmp_path):
    bad = damage(tmp_path)
    out = tmp_path / "list.txt"
    assert verify(tmp_path, "--out", out, "--no-progress").returncode == 0
    assert len(listed(out)) == 3 and not (tmp_path / EXCLUDE_FILE).exists()
    for path in bad.values():                                               # repaired
        Image.new("RGB", (40, 40), (10, 20, 30)).save(path)
    proc = verify(tmp_path, "--out", out, "--no-progress")
    assert proc.returncode == 0 and listed(out) == [] and "all decode" in proc.stdout
    assert proc.stderr == ""                                                # --no-progress


def test_bad_lists_and_roots_are_named(tmp_path):
    write_flat_tree(tmp_path, "train", classes=2, per_class=2)
    (tmp_path / EXCLUDE_FILE).write_text("# comment\ntrain/cls0/img000.jpg\n../outside.jpg\n")
    with pytest.raises(DataError, match=rf"{EXCLUDE_FILE}:3: '../outside.jpg': need a path relative to"):
        read_exclusions(str(tmp_path / EXCLUDE_FILE), str(tmp_path))
    with pytest.raises(DataError, match="data.exclude_list=.*nope.txt: no such file"):
        build_loader(cfg_for(tmp_path, exclude_list=str(tmp_path / "nope.txt")), "train", 2, 0, 1, 0, CPU)
    proc = verify(tmp_path / "missing")
    assert proc.returncode == 2 and proc.stderr.startswith("fastdeit: error: image folder does not exist")


@pytest.mark.slow
def test_training_runs_past_the_files_the_verifier_listed(tmp_path):
    """train.py on a tree with bad files: the verifier's list keeps the run going to the end."""
    from fastdeit.data.synthetic import generate

    data = tmp_path / "data"
    generate(str(data), classes=4, train_per_class=40, val_per_class=5, min_size=36, max_size=48, seed=0)
    victims = sorted((data / "train" / "class_000").iterdir())[:2] + sorted((data / "val" / "class_003").iterdir())[:1]
    for path in victims:
        path.write_bytes(path.read_bytes()[:300])
    assert verify(data, "--no-progress").returncode == 0
    run = tmp_path / "run"
    proc = launch(f"data.root={data}", f"trainer.run_dir={run}", "trainer.epochs=1",
                  "model.name=deit_tiny_patch16_224", "distill.type=none", ranks=1)
    assert "train: 2 images left out" in proc.stdout and "val: 1 images left out" in proc.stdout
    assert records(run, "epoch")[-1]["val/images"] == 19
