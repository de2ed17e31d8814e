"""The GPU branch of the data path, exercised without a GPU.

(a) The GPU train and val DALI graphs are defined and serialised with device_id=None (DALI
    looks for CUDA only when it creates the backend pipeline), and the serialised graph is
    read back: mixed decoder with its hardware-load and preallocation arguments, the ROI-flip
    resize on the GPU, labels moved to the GPU, nothing falling back to the CPU on the way.
(b) The loader's GPU branch (DALI's iterator, the HWC-to-NCHW view, mid-epoch skip, the val
    trim) runs on CPU operators through Placement.gpu_layout_on_cpu, which swaps only the
    decoder backend (checked on the serialised graphs), and its batches are checked against
    the colours of the flat-colour tree and against the CPU path.
(c) The ROI-flip resize equals resize-then-flip bit for bit on DALI's CPU backend.
"""
import struct

import numpy as np
import pytest
import torch

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from tests.conftest import FLAT_CLASSES, FLAT_PER_CLASS
from tests.test_data_loader import CPU, cfg_for, epoch, identify, pixels
from fastdeit.data import DataConfig, build_loader
from fastdeit.data.loading import loader as loader_module
from fastdeit.data.loading.pipeline import (Placement, define_train_pipeline, define_val_pipeline,
                                    resize_flip)

GPU_GRAPH = Placement(0)                                # the placement a GPU run gets
CPU_OPS = Placement(None, gpu_layout_on_cpu=True)       # the same layout on CPU operators


# -- reading DALI's serialised graph (protobuf wire format, dali_proto.PipelineDef) -------------
#
# DALI ships no Python protobuf module, so the few fields needed are decoded here: a pipeline
# has repeated op (5) and output (7); an op has name (1), input (2), output (3), arg (4) and
# instance name (5); an input/output has name (1), device (2), is_argument_input (3), and the
# argument name (4); an argument has name (1), type (2), f (3, float32), i (4), s (5), b (6),
# extra_args (7, the elements of a list) and is_vector (8).

def _fields(buf):
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        kind = key & 7
        if kind == 0:
            value, i = _varint(buf, i)
        elif kind == 2:
            size, i = _varint(buf, i)
            value, i = bytes(buf[i:i + size]), i + size
        elif kind == 5:
            value, i = bytes(buf[i:i + 4]), i + 4
        elif kind == 1:
            value, i = bytes(buf[i:i + 8]), i + 8
        else:
            raise ValueError(f"wire type {kind}")
        yield key >> 3, value


def _varint(buf, i):
    out = shift = 0
    while True:
        byte = buf[i]
        i += 1
        out |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return out, i


def _argument(buf):
    fields = list(_fields(buf))
    get = {k: v for k, v in fields}
    name, kind = get[1].decode(), get[2].decode()
    if get.get(8):
        return name, [_argument(v)[1] for k, v in fields if k == 7]
    if kind == "float":
        return name, struct.unpack("<f", get[3])[0]
    if kind == "string":
        return name, get[5].decode()
    if kind == "bool":
        return name, bool(get.get(6, 0))
    return name, get.get(4, 0)


def _port(buf):
    get = dict(_fields(buf))
    return dict(name=get[1].decode(), device=get[2].decode(),
                arg=get[4].decode() if get.get(3) else None)


def read_graph(serialized: bytes):
    """(ops in definition order, pipeline outputs) of a serialised DALI pipeline."""
    ops, outputs = [], []
    for key, value in _fields(serialized):
        if key == 5:
            op = dict(inputs=[], outputs=[], args={})
            for k, v in _fields(value):
                if k == 1:
                    op["op"] = v.decode()
                elif k == 2:
                    op["inputs"].append(_port(v))
                elif k == 3:
                    op["outputs"].append(_port(v))
                elif k == 4:
                    name, arg = _argument(v)
                    if not name.startswith("_"):          # skip DALI's bookkeeping
                        op["args"][name] = arg
            ops.append(op)
        elif key == 7:
            outputs.append(_port(value))
    return ops, outputs


def _only(ops, name):
    found = [op for op in ops if op["op"] == name]
    assert len(found) == 1, (name, [op["op"] for op in ops])
    return found[0]


def _producer(ops, port):
    return next(op for op in ops if any(o["name"] == port["name"] for o in op["outputs"]))


def _graph(kind, placement, cfg, device_id=None):
    files, labels = ["/nonexistent/a.jpg", "/nonexistent/b.jpg"], [0, 1]
    if kind == "train":
        pipe = define_train_pipeline(files, labels, cfg, 2, 7, placement, cfg.img_size, device_id=device_id)
    else:
        pipe = define_val_pipeline(files, labels, cfg, 2, placement, device_id=device_id)
    return read_graph(pipe.serialize())


def _downstream_of_gpu_stays_on_gpu(ops):
    """Every op fed by a GPU output runs on the GPU: no silent trip back to the host."""
    gpu_outputs = {o["name"] for op in ops for o in op["outputs"] if o["device"] == "gpu"}
    for op in ops:
        if any(i["name"] in gpu_outputs and i["arg"] is None for i in op["inputs"]):
            assert op["args"]["device"] == "gpu", op["op"]


# -- (a) the GPU graphs, serialised without a GPU ------------------------------------------------

def test_gpu_train_graph_serialises_without_a_gpu():
    cfg = DataConfig(img_size=48, hw_decoder_load=0.4, decoder_preallocate=True)
    ops, outputs = _graph("train", GPU_GRAPH, cfg)
    decoder = _only(ops, "decoders__ImageRandomCrop")
    assert decoder["args"]["device"] == "mixed"
    assert decoder["outputs"][0]["device"] == "gpu"
    assert decoder["args"]["hw_decoder_load"] == pytest.approx(0.4)
    for key in ("device_memory_padding", "host_memory_padding", "preallocate_width_hint",
                "preallocate_height_hint"):
        assert decoder["args"][key] > 0, key
    assert decoder["args"]["random_area"] == pytest.approx(list(cfg.scale))
    assert decoder["args"]["random_aspect_ratio"] == pytest.approx(list(cfg.ratio))

    resize = _only(ops, "Resize")
    assert resize["args"]["device"] == "gpu" and resize["args"]["roi_relative"] is True
    assert resize["args"]["size"] == [48.0, 48.0]
    assert resize["args"]["interp_type"] == int(types.INTERP_CUBIC)
    assert resize["inputs"][0]["name"] == decoder["outputs"][0]["name"]
    roi = {i["arg"]: i for i in resize["inputs"] if i["arg"]}
    assert set(roi) == {"roi_start", "roi_end"}
    # the ROI endpoints are built from the coin flip (the flip rides on the resize)
    flip = _only(ops, "random__CoinFlip")
    assert flip["args"]["probability"] == pytest.approx(cfg.hflip)

    images, labels = outputs
    assert images["name"] == resize["outputs"][0]["name"] and images["device"] == "gpu"
    assert labels["device"] == "gpu"                       # labels travel with the images
    cast = _producer(ops, labels)
    assert cast["op"] == "Cast" and cast["args"]["dtype"] == int(types.INT64)
    assert _producer(ops, cast["inputs"][0])["op"] == "readers__File"
    _downstream_of_gpu_stays_on_gpu(ops)

    plain = _only(_graph("train", GPU_GRAPH, DataConfig(decoder_preallocate=False))[0],
                  "decoders__ImageRandomCrop")
    assert "device_memory_padding" not in plain["args"]


def test_gpu_val_graph_serialises_without_a_gpu():
    cfg = DataConfig(img_size=48, hw_decoder_load=0.4)
    ops, outputs = _graph("val", GPU_GRAPH, cfg)
    decoder = _only(ops, "decoders__Image")
    assert decoder["args"]["device"] == "mixed"
    assert decoder["args"]["hw_decoder_load"] == pytest.approx(0.4)
    assert _only(ops, "PeekImageShape")["args"]["device"] == "cpu"   # header read on the host
    for name in ("Resize", "Slice", "CropMirrorNormalize"):
        assert _only(ops, name)["args"]["device"] == "gpu", name
    cmn = _only(ops, "CropMirrorNormalize")
    assert cmn["args"]["mean"] == pytest.approx([255 * m for m in cfg.mean])
    assert cmn["args"]["std"] == pytest.approx([255 * s for s in cfg.std])
    images, labels = outputs
    assert images["name"] == cmn["outputs"][0]["name"] and images["device"] == "gpu"
    assert labels["device"] == "gpu"
    assert _only(ops, "readers__File")["args"]["pad_last_batch"] is True
    _downstream_of_gpu_stays_on_gpu(ops)


@pytest.mark.parametrize("kind", ["train", "val"])
def test_cpu_operator_seam_swaps_only_the_decoder_backend(kind):
    """The graph the CPU tests of the GPU branch run (below) is the GPU graph with only the
    decoder's backend (and its GPU-only arguments) and the labels' device changed."""
    cfg = DataConfig(img_size=48)
    gpu_ops, gpu_out = _graph(kind, GPU_GRAPH, cfg)
    cpu_ops, cpu_out = _graph(kind, CPU_OPS, cfg)
    gpu_only = {"device", "hw_decoder_load", "device_memory_padding", "host_memory_padding",
                "preallocate_width_hint", "preallocate_height_hint"}

    def shape(ops):
        return [(op["op"], {k: v for k, v in op["args"].items() if k not in gpu_only},
                 [(i["name"], i["arg"]) for i in op["inputs"]]) for op in ops]

    assert shape(gpu_ops) == shape(cpu_ops)
    assert [o["name"] for o in gpu_out] == [o["name"] for o in cpu_out]
    assert all(op["args"]["device"] == "cpu" for op in cpu_ops)
    assert {op["args"]["device"] for op in gpu_ops} == {"cpu", "mixed", "gpu"}


# -- (b) the loader's GPU branch on CPU operators -------------------------------------------------

@pytest.fixture
def gpu_layout(monkeypatch):
    """Loaders built in the test get the GPU layout on CPU operators."""
    monkeypatch.setattr(loader_module, "resolve_placement", lambda cfg, device: CPU_OPS)


def test_gpu_branch_train_batches_carry_the_right_colours_and_labels(flat_tree, gpu_layout):
    root, ids = flat_tree
    loader = build_loader(cfg_for(root), "train", 4, 0, 1, 0, CPU)
    assert loader.placement is CPU_OPS
    loader.set_epoch(0)
    assert loader._it is not None and loader._background is None   # DALI's iterator branch
    batches = list(loader)
    loader.close()
    assert len(batches) == 6
    seen = []
    for x, y in batches:
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)   # DALI's HWC, viewed
        px = pixels(x)
        assert (px.amax(dim=(2, 3)) - px.amin(dim=(2, 3))).max() < 12   # flat stays flat
        k = identify(x).tolist()
        assert y.tolist() == [ids[i][1] for i in k]
        seen += k
    assert sorted(seen) == list(range(FLAT_CLASSES * FLAT_PER_CLASS))   # each image once


def test_gpu_branch_matches_the_cpu_path(synthetic_tree, monkeypatch):
    """Same seed, same epoch: the GPU layout draws the same crops and flips as the CPU path
    (DALI's random ops, same seeds) and only the resize kernel differs (DALI's cubic in the
    graph vs torch's PIL-style bicubic on the host). Textured images: a missed or doubled
    flip, a wrong crop or a channel mix-up would be tens of levels off."""
    cfg = cfg_for(synthetic_tree)
    cpu = epoch(build_loader(cfg, "train", 8, 0, 1, 0, CPU), 1)
    monkeypatch.setattr(loader_module, "resolve_placement", lambda cfg, device: CPU_OPS)
    gpu = epoch(build_loader(cfg, "train", 8, 0, 1, 0, CPU), 1)
    assert len(gpu) == len(cpu) == 12
    for (x, y), (u, v) in zip(cpu, gpu):
        assert torch.equal(y, v)
        diff = (pixels(x) - pixels(u)).abs()
        assert diff.mean() < 1.0 and diff.amax() < 16


def test_gpu_branch_resume_mid_epoch(synthetic_tree, gpu_layout):
    """DALI's iterator branch: set_epoch(e, skip_batches=k) yields the uninterrupted epoch's
    batches k.. bit for bit, with RandAugment on."""
    cfg = cfg_for(synthetic_tree, rand_augment="rand-m9-mstd0.5-inc1")
    loader = build_loader(cfg, "train", 8, 0, 1, 0, CPU)
    full = epoch(loader, 3)
    for skip in (1, 7, 12):
        loader.set_epoch(3, skip_batches=skip)
        rest = list(loader)
        assert len(rest) == 12 - skip
        for (x, y), (fx, fy) in zip(rest, full[skip:]):
            assert torch.equal(x, fx) and torch.equal(y, fy)
    loader.close()


def test_gpu_branch_val_trims_the_last_batch(flat_tree, gpu_layout):
    root, ids = flat_tree
    loader = build_loader(cfg_for(root), "val", 5, 0, 1, 0, CPU)
    for _ in range(2):                                     # and again after the auto-reset
        batches = list(loader)
        assert [len(y) for _, y in batches] == [5, 5, 5, 5, 4]
        x = torch.cat([b[0] for b in batches])
        assert identify(x).tolist() == list(range(24))
        assert torch.cat([b[1] for b in batches]).tolist() == [ids[i][1] for i in range(24)]
    loader.close()


# -- (c) the ROI flip is exact --------------------------------------------------------------------

def test_roi_flip_resize_equals_resize_then_flip_bit_for_bit():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)
              for h, w in rng.integers(9, 90, size=(16, 2))]   # up- and downscaling
    flips = [np.array(i % 2, dtype=np.int32) for i in range(16)]

    @pipeline_def
    def graph():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        flip = fn.external_source(source=lambda: flips, batch=True)
        plain = fn.resize(x, size=[32, 32], interp_type=types.INTERP_CUBIC)
        return resize_flip(x, 32, flip), fn.flip(plain, horizontal=flip), plain

    pipe = graph(batch_size=16, num_threads=1, device_id=None)
    pipe.build()
    fused, reference, plain = (np.stack([np.asarray(t[i]) for i in range(16)]) for t in pipe.run())
    assert fused.dtype == np.uint8 and fused.shape == (16, 32, 32, 3)
    assert np.array_equal(fused, reference)
    assert np.array_equal(fused[0::2], plain[0::2])
    assert np.array_equal(fused[1::2], plain[1::2, :, ::-1])        # mirrored, not untouched
