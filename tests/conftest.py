"""Shared data fixtures (tiny JPEG trees) and the `gpu` marker for tests that need CUDA."""
import os

import numpy as np
import pytest
import torch
from PIL import Image


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one; failed where "
                                       "nvidia-smi lists a GPU that torch cannot use)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    from fastdeit.doctor import gpu_unusable_reason

    # A host whose nvidia-smi lists a GPU that torch cannot use (a CUDA 13 torch on a CUDA 12
    # driver, a CPU-only build) would otherwise skip every GPU test and look green: they fail.
    broken = gpu_unusable_reason()
    for item in gpu_items:
        if broken:
            item.stash[_GPU_BROKEN] = broken
            # Their own skipif(not cuda) would hide the failure too.
            item.own_markers[:] = [m for m in item.own_markers if m.name not in ("skip", "skipif")]
        else:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


_GPU_BROKEN = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    broken = item.stash.get(_GPU_BROKEN, None)
    if broken and (any(item.iter_markers("skipif")) or any(item.iter_markers("skip"))):
        # A skip marker above the test (module or class level) would run before the call.
        pytest.fail(f"GPU test on a host whose GPU torch cannot use: {broken}", pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    broken = item.stash.get(_GPU_BROKEN, None)
    if broken:
        pytest.fail(f"GPU test on a host whose GPU torch cannot use: {broken}", pytrace=False)


# Flat-colour tree: every image is one solid colour that identifies it uniquely, so a decoded
# batch tells us which file each sample came from (crop and flip keep a flat colour flat).
# Levels 70 apart survive JPEG, resizing and the mean/std round trip with a wide margin.
_LEVELS = (30, 100, 170, 240)
FLAT_CLASSES = 4
FLAT_PER_CLASS = 6


def flat_colour(image_id: int):
    return (_LEVELS[image_id % 4], _LEVELS[image_id // 4 % 4], _LEVELS[image_id // 16 % 4])


def write_flat_tree(root, split="train", classes=FLAT_CLASSES, per_class=FLAT_PER_CLASS, seed=0):
    """Class c holds images with ids c*per_class .. ; returns {image_id: (path, label)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in range(classes):
        folder = os.path.join(root, split, f"cls{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            k = c * per_class + i
            h, w = (int(v) for v in rng.integers(40, 90, size=2))
            path = os.path.join(folder, f"img{k:03d}.jpg")
            Image.new("RGB", (w, h), flat_colour(k)).save(path, quality=95)
            out[k] = (path, c)
    return out


@pytest.fixture(scope="session")
def flat_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    ids = write_flat_tree(root, "train")
    # val reuses the same colours and classes: sample identity is what the tests check there
    write_flat_tree(root, "val")
    return str(root), ids


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory):
    from fastdeit.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(str(root), classes=4, train_per_class=24, val_per_class=9, min_size=48,
             max_size=96, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """The end-to-end tests' tree: 4 classes x 48 train (6 steps of 32) and 10 val images each."""
    from fastdeit.data.synthetic import generate

    root = tmp_path_factory.mktemp("e2e-data")
    generate(str(root), classes=4, train_per_class=48, val_per_class=10, min_size=36, max_size=48,
             seed=0, quality=90)
    return root


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """Weights of a 4-class resnet10t (the `dataset` fixture's classes), a file as users pass one."""
    import timm

    path = tmp_path_factory.mktemp("teacher") / "resnet10t.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=4).state_dict(), path)
    return path
