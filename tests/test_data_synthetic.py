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


def test_difficulty_changes_images_and_marker(tmp_path):
    kw = dict(classes=2, train_per_class=2, val_per_class=0, min_size=16, max_size=24, seed=0)
    generate(str(tmp_path / "easy"), **kw)
    generate(str(tmp_path / "hard"), difficulty=0.6, **kw)
    assert _digest(str(tmp_path / "easy")) != _digest(str(tmp_path / "hard"))
    with open(tmp_path / "easy" / ".synthetic.json") as f:
        assert "difficulty" not in f.read()  # trees written before the knob still match
    with pytest.raises(ValueError, match="other parameters"):
        generate(str(tmp_path / "hard"), difficulty=0.5, **kw)
    with pytest.raises(ValueError, match="difficulty"):
        generate(str(tmp_path / "x"), difficulty=1.5, **kw)


def test_imagenet_mode_sizes_quality_and_bytes(tmp_path):
    import numpy as np
    from PIL import Image
    from fastdeit.data.synthetic import imagenet_quality, imagenet_size

    rng = np.random.default_rng(0)
    sizes = np.array([imagenet_size(rng) for _ in range(4000)])
    long_side, short_side = sizes.max(axis=1), sizes.min(axis=1)
    assert np.median(long_side) == 500 and np.median(short_side) == 375
    assert 0.7 < (sizes[:, 0] >= sizes[:, 1]).mean() < 0.85      # mostly landscape
    assert sizes.min() >= 1 and long_side.max() <= 1000
    qualities = [imagenet_quality(rng) for _ in range(2000)]
    assert np.median(qualities) == 90 and 75 <= min(qualities) and max(qualities) <= 98

    out = str(tmp_path / "inet")
    main(["--mode", "imagenet", "--out", out, "--classes", "2", "--train-per-class", "5",
          "--val-per-class", "1", "--workers", "2"])
    files, labels, classes = scan_image_folder(os.path.join(out, "train"))
    assert labels == [0] * 5 + [1] * 5 and len(scan_image_folder(os.path.join(out, "val"))[0]) == 2
    kb = sorted(os.path.getsize(p) / 1024 for p in files
                if Image.open(p).size in ((500, 375), (375, 500)))
    assert kb and 60 < np.median(kb) < 200  # ImageNet's 500x375 JPEGs: ~110 KB
    generate(out, classes=2, train_per_class=5, val_per_class=1, mode="imagenet")  # idempotent
    with pytest.raises(ValueError, match="mode"):
        generate(str(tmp_path / "y"), mode="coco")
