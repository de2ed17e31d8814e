"""The synthetic dataset generator: layout, determinism, idempotence."""
import hashlib
import os

import pytest

from fastdeit.data import scan_image_folder
from fastdeit.data.synthetic import generate, main


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if name.endswith(".jpg"):
                h.update(name.encode())
                with open(os.path.join(dirpath, name), "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def test_layout_and_determinism(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    generate(a, classes=3, train_per_class=4, val_per_class=2, min_size=20, max_size=40, seed=1)
    main(["--out", b, "--classes", "3", "--train-per-class", "4", "--val-per-class", "2",
          "--min-size", "20", "--max-size", "40", "--seed", "1", "--workers", "1"])
    assert _digest(a) == _digest(b)
    files, labels, classes = scan_image_folder(os.path.join(a, "train"))
    assert classes == ["class_000", "class_001", "class_002"]
    assert labels == [0] * 4 + [1] * 4 + [2] * 4
    assert len(scan_image_folder(os.path.join(a, "val"))[0]) == 6


def test_idempotent_and_guarded(tmp_path, capsys):
    out = str(tmp_path / "d")
    kw = dict(classes=2, train_per_class=2, val_per_class=1, min_size=16, max_size=24, seed=0)
    generate(out, **kw)
    stamp = os.path.getmtime(os.path.join(out, "train", "class_000", "train_000_00000.jpg"))
    generate(out, verbose=True, **kw)
    assert "already complete" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "train", "class_000", "train_000_00000.jpg")) == stamp
    with pytest.raises(ValueError, match="other parameters"):
        generate(out, **{**kw, "seed": 1})


def test_seed_changes_images(tmp_path):
    kw = dict(classes=2, train_per_class=2, val_per_class=0, min_size=16, max_size=24)
    generate(str(tmp_path / "a"), seed=0, **kw)
    generate(str(tmp_path / "b"), seed=1, **kw)
    assert _digest(str(tmp_path / "a")) != _digest(str(tmp_path / "b"))
