"""Memory a user can predict: the GPU train decoder's nvJPEG preallocation, sized from the config."""
import pytest

from fastdeit.config import ConfigError, from_dict
from fastdeit.data.config import DataConfig
from fastdeit.data.loading.pipeline import Placement, _decoder_kwargs, nvjpeg_preallocation, preallocated_bytes

GPU, CPU = Placement(0), Placement(None)
MIB = 2**20


def test_defaults_are_nvidias_imagenet_figures():
    # NVIDIA's DALI ResNet-50 example preallocates for ImageNet's largest image, 5980 x 6430.
    assert nvjpeg_preallocation(DataConfig()) == dict(
        device_memory_padding=211_025_920, host_memory_padding=140_544_512,
        preallocate_width_hint=5980, preallocate_height_hint=6430)


def test_per_rank_figures_by_hand():
    # One device and two pinned buffers per decoder thread (DALI's argument docs).
    device, pinned = preallocated_bytes(DataConfig(), num_threads=8)
    assert device == 8 * 211_025_920 and pinned == 16 * 140_544_512      # 1.57 GiB, 2.09 GiB
    assert preallocated_bytes(DataConfig(), 4) == (4 * 211_025_920, 8 * 140_544_512)
    assert preallocated_bytes(DataConfig(decoder_preallocate=False), 8) == (0, 0)


def test_sizes_follow_the_largest_image_not_the_crop():
    base = nvjpeg_preallocation(DataConfig())
    # A set resized to at most 1024 x 1024: the buffers shrink by the pixel ratio.
    small = nvjpeg_preallocation(DataConfig(decoder_max_image=(1024, 1024)))
    ratio = 1024 * 1024 / (5980 * 6430)
    assert small["device_memory_padding"] == pytest.approx(base["device_memory_padding"] * ratio, abs=1)
    assert small["host_memory_padding"] == pytest.approx(base["host_memory_padding"] * ratio, abs=1)
    assert (small["preallocate_width_hint"], small["preallocate_height_hint"]) == (1024, 1024)
    # The crop size and scale do not enter: the whole image is entropy-decoded.
    assert nvjpeg_preallocation(DataConfig(img_size=384, scale=(0.5, 1.0))) == base


def test_train_decoder_preallocates_val_does_not():
    cfg = DataConfig()
    train = _decoder_kwargs(cfg, GPU, preallocate=True)
    assert train["device"] == "mixed" and train["device_memory_padding"] == 211_025_920
    val = _decoder_kwargs(cfg, GPU)                                      # DALI's small defaults
    assert val == dict(device="mixed", hw_decoder_load=cfg.hw_decoder_load, adjust_orientation=False)
    assert _decoder_kwargs(DataConfig(decoder_preallocate=False), GPU, preallocate=True) == val
    assert _decoder_kwargs(cfg, CPU, preallocate=True) == dict(device="cpu", adjust_orientation=False)


def test_arguments_are_the_decoders_own():
    """Every key we pass is an argument of DALI's fused decode-crop and plain decoders, so a
    misspelt one cannot be dropped silently on a GPU host."""
    from nvidia.dali.backend import GetSchema

    kw = _decoder_kwargs(DataConfig(), GPU, preallocate=True)
    for op in ("decoders__ImageRandomCrop", "decoders__Image"):
        schema = GetSchema(op)
        assert "mixed" in schema.GetSupportedBackends()
        assert all(schema.HasArgument(k) for k in kw if k != "device"), op


@pytest.mark.parametrize("value", [[0, 10], [100], [10, -1], [1.5, 2]])
def test_bad_max_image_names_the_key(value):
    with pytest.raises((ConfigError, ValueError), match="decoder_max_image"):
        from_dict({"data": {"decoder_max_image": value}})


def test_each_pipeline_is_released_before_the_next_is_built(synthetic_tree, monkeypatch):
    """DALI serves a new pipeline's buffers from the ones a destroyed pipeline returned to its
    pools, so the old pipeline must be gone (by reference count, not a later GC) when the next
    is built, or every rebuild would hold two sets of nvJPEG buffers. Checked for the train
    rebuild per epoch and for the iterator-driven path (val, rebuilt after an abandoned pass)."""
    import gc
    import weakref

    import torch

    from fastdeit.data import build_loader
    from fastdeit.data.loading import loader as loader_mod

    previous = []

    def checking(build):
        def wrapped(*args):
            assert all(ref() is None for ref in previous), "the old DALI pipeline is still alive"
            pipe = build(*args)
            previous.append(weakref.ref(pipe))
            return pipe
        return wrapped

    monkeypatch.setattr(loader_mod, "build_train_pipeline", checking(loader_mod.build_train_pipeline))
    monkeypatch.setattr(loader_mod, "build_val_pipeline", checking(loader_mod.build_val_pipeline))
    cfg = DataConfig(root=synthetic_tree, img_size=32, num_threads=1, host_threads=1, rand_augment=None)
    gc.disable()
    try:
        train = build_loader(cfg, "train", 8, 0, 1, 0, torch.device("cpu"))
        for epoch in range(3):
            train.set_epoch(epoch)
            next(iter(train))                       # part of an epoch, as a resumed run would
        train.close()
        val = build_loader(cfg, "val", 8, 0, 1, 0, torch.device("cpu"))
        for _ in range(2):
            next(iter(val))                         # abandoned: the next pass rebuilds
        val.close()
    finally:
        gc.enable()
    assert len(previous) == 5


def test_serialised_gpu_graphs_carry_the_config_figures():
    """The GPU graphs as DALI serialises them (no GPU needed, tests/test_data_gpu_graph.py):
    the train decoder preallocates for data.decoder_max_image; the val decoder asks for nothing
    beyond DALI's defaults."""
    from tests.test_data_gpu_graph import GPU_GRAPH, _graph, _only

    cfg = DataConfig(img_size=48, decoder_max_image=(1024, 768))
    train = _only(_graph("train", GPU_GRAPH, cfg)[0], "decoders__ImageRandomCrop")["args"]
    expected = nvjpeg_preallocation(cfg)
    assert {k: train[k] for k in expected} == expected
    assert expected["device_memory_padding"] == -(-1024 * 768 * 211_025_920 // (5980 * 6430))
    val = _only(_graph("val", GPU_GRAPH, cfg)[0], "decoders__Image")["args"]
    assert not {"device_memory_padding", "host_memory_padding", "preallocate_width_hint",
                "preallocate_height_hint"} & set(val)
