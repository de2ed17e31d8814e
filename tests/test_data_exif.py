"""EXIF orientation: by default the pipelines decode a JPEG's stored pixels as PIL does (and so
torchvision, timm and the DeiT reference); data.exif_orientation=true rotates them as the tag
says, as PIL's ImageOps.exif_transpose does. Both graphs, on the CPU placement."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fastdeit.data import DataConfig, build_loader

CPU = torch.device("cpu")
MEAN = torch.tensor(DataConfig.mean).view(1, 3, 1, 1)
STD = torch.tensor(DataConfig.std).view(1, 3, 1, 1)
ORIENTATION = 0x0112      # the EXIF tag
SIZE = 32


def smooth_image(width, height):
    """Red rises left to right, green top to bottom: any rotation or flip shows."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def write_tree(root, split, width, height, orientation=6):
    folder = root / split / "a"
    folder.mkdir(parents=True)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation          # 6: displayed rotated 90 degrees clockwise
    path = folder / "tagged.jpg"
    smooth_image(width, height).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        assert im.getexif()[ORIENTATION] == orientation
    return path


def loader_output(root, split, exif_orientation, **kw):
    cfg = DataConfig(root=str(root), img_size=SIZE, num_threads=1, host_threads=1, device="cpu",
                     rand_augment=None, repeated_aug=1, exif_orientation=exif_orientation, **kw)
    loader = build_loader(cfg, split, 1, 0, 1, 0, CPU)
    loader.set_epoch(0)
    (x, _), = list(loader)
    loader.close()
    return (x * (STD * 255) + MEAN * 255)[0].permute(1, 2, 0).numpy()   # HWC, 0-255


def pil_eval(im):
    """timm's eval transform on a PIL image: Resize(int(SIZE / 0.875)) bicubic, CenterCrop."""
    short = int(SIZE / 0.875)
    w, h = im.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    im = im.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - SIZE) / 2)), int(round((size[1] - SIZE) / 2))
    return np.asarray(im.crop((left, top, left + SIZE, top + SIZE)), np.float32)


def mean_diff(a, b):
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize("exif_orientation", [False, True])
def test_val_graph(tmp_path, exif_orientation):
    # Not square, so the resize sizes (read from the header) must follow the orientation too.
    path = write_tree(tmp_path, "val", width=64, height=40)
    got = loader_output(tmp_path, "val", exif_orientation)
    with Image.open(path) as im:
        stored = pil_eval(im.convert("RGB"))                       # what PIL/timm feed a model
        rotated = pil_eval(ImageOps.exif_transpose(im).convert("RGB"))
    want, other = (rotated, stored) if exif_orientation else (stored, rotated)
    assert mean_diff(got, want) < 2.0, (mean_diff(got, want), mean_diff(got, other))
    assert mean_diff(got, other) > 30.0


@pytest.mark.parametrize("exif_orientation", [False, True])
def test_train_graph(tmp_path, exif_orientation):
    # Square, with the random crop pinned to the whole image and no flip: the output is the
    # bicubic resize of the (rotated or stored) image.
    path = write_tree(tmp_path, "train", width=64, height=64)
    got = loader_output(tmp_path, "train", exif_orientation, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    with Image.open(path) as im:
        stored = np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC), np.float32)
        rotated = np.asarray(ImageOps.exif_transpose(im).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC),
                             np.float32)
    want, other = (rotated, stored) if exif_orientation else (stored, rotated)
    assert mean_diff(got, want) < 2.0, (mean_diff(got, want), mean_diff(got, other))
    assert mean_diff(got, other) > 30.0
