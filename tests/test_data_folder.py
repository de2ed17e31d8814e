"""Class-folder scan: ImageFolder-compatible labels and clear errors for bad trees."""
import os

import pytest
import torchvision
from PIL import Image

from fastdeit.data import scan_image_folder


def _img(path, ext_format="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path, format=ext_format)


def test_matches_torchvision_imagefolder(tmp_path):
    for rel in ["b/x.jpg", "b/a.JPEG", "a/z.png", "a/sub/y.jpeg", "c_/1.jpg", "B/q.jpg"]:
        _img(str(tmp_path / rel), "PNG" if rel.endswith("png") else "JPEG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "stray.jpg").write_bytes(b"")  # files at the top level are not classes
    files, labels, classes = scan_image_folder(str(tmp_path))
    ref = torchvision.datasets.ImageFolder(str(tmp_path))
    assert classes == ref.classes == ["B", "a", "b", "c_"]
    assert list(zip(files, labels)) == [(os.path.abspath(p), y) for p, y in ref.samples]


def test_missing_root(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        scan_image_folder(str(tmp_path / "nope"))


def test_no_class_folders(tmp_path):
    _img(str(tmp_path / "x.jpg"))
    with pytest.raises(ValueError, match="no class folders"):
        scan_image_folder(str(tmp_path))


def test_empty_class_folder(tmp_path):
    _img(str(tmp_path / "a" / "x.jpg"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=str(tmp_path / "b")):
        scan_image_folder(str(tmp_path))
