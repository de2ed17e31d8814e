"""data.size_schedule: the training side per epoch (schedule.py), the student that trains at
any side with a fixed-shape position embedding, FLOPs per side, and the loader at any side."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from fastdeit import flops
from fastdeit.config import ConfigError, load_config
from fastdeit.data import DataConfig, build_loader
from fastdeit.data.loading.schedule import SizeSchedule, size_schedule
from fastdeit.models import ModelConfig, build_student, size_multiple

CPU = torch.device("cpu")
FFCV = [[10, 160], [250, 224]]          # the README's ramp: 160 -> 224 over epochs 10..250 of 300
DEIT3 = [[279, 192], [280, 224]]        # the README's step: 192, then 224 for the last 20 of 300


@pytest.mark.parametrize("milestones, multiple, expected", [
    # hand values: 160 + 64 (e - 10) / 240 rounded down to 32; 192 is reached at e = 130
    (FFCV, 32, {0: 160, 10: 160, 129: 160, 130: 192, 249: 192, 250: 224, 299: 224}),
    # the same ramp on a 16 grid: 176 at e = 70 (160 + 64 * 60 / 240 = 176 exactly)
    (FFCV, 16, {69: 160, 70: 176, 71: 176, 130: 192, 190: 208, 249: 208, 250: 224}),
    (DEIT3, 32, {0: 192, 279: 192, 280: 224, 299: 224}),
    # a falling ramp and sizes that are not multiples themselves (rounded down)
    ([[0, 250], [4, 100]], 32, {0: 224, 1: 192, 2: 160, 3: 128, 4: 96, 9: 96}),
    ([[2, 64], [4, 32], [6, 64]], 16, {0: 64, 3: 48, 4: 32, 5: 48, 6: 64}),
])
def test_schedule_values_floor(milestones, multiple, expected):
    schedule = SizeSchedule(milestones, default=224, multiple=multiple, rounding="floor")
    assert {e: schedule(e) for e in expected} == expected


@pytest.mark.parametrize("milestones, multiple, expected", [
    # hand values: 160 + 64 (e - 10) / 240 to the nearest multiple of 32: 176 (a tie: 5.5 ->
    # 6 by np.round's ties-to-even) at e = 70 already gives 192; 208 (6.5 -> 6) at e = 190
    # still 192; 224 from e = 191 (208.27 -> 6.51 -> 7)
    (FFCV, 32, {0: 160, 69: 160, 70: 192, 190: 192, 191: 224, 250: 224, 299: 224}),
    # several milestones: FFCV's rule per segment (48 at e = 3 and 5 lies on the 16 grid)
    ([[2, 64], [4, 32], [6, 64]], 16, {0: 64, 3: 48, 4: 32, 5: 48, 6: 64}),
    # both ties: e = 1 is 176 (5.5 -> 6: up to 192), e = 3 is 208 (6.5 -> 6: down to 192)
    ([[0, 160], [4, 224]], 32, {1: 192, 2: 192, 3: 192, 4: 224}),
])
def test_schedule_values_nearest(milestones, multiple, expected):
    schedule = SizeSchedule(milestones, default=224, multiple=multiple)
    assert schedule.rounding == "nearest"
    assert {e: schedule(e) for e in expected} == expected


def ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """ffcv-imagenet train_imagenet.py, ImageNetTrainer.get_resolution (libffcv/ffcv-imagenet
    at 4dd291a), re-implemented from the source line for line."""
    assert min_res <= max_res
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


# ffcv-imagenet's rn50_configs/*.yaml resolution sections: epochs, start_ramp, end_ramp
# (min_res 160, max_res 192 in all six)
FFCV_RN50 = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}


@pytest.mark.parametrize("epochs", sorted(FFCV_RN50))
def test_ffcv_rn50_configs_give_ffcvs_sizes_every_epoch(epochs):
    start, end = FFCV_RN50[epochs]
    ours = SizeSchedule([[start, 160], [end, 192]], default=224, multiple=32)
    assert [ours(e) for e in range(epochs)] == \
        [ffcv_get_resolution(e, 160, 192, end, start) for e in range(epochs)]


def test_ffcv_formula_on_many_ramps():
    """Any FFCV resolution section with multiples of 32, rising, every epoch: ours == FFCV's
    (ties included; FFCV's rule is only meant for rising ramps: it asserts min <= max)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        lo = int(rng.integers(2, 10)) * 32
        hi = lo + int(rng.integers(0, 6)) * 32
        start = int(rng.integers(0, 40))
        end = start + int(rng.integers(1, 60))
        ours = SizeSchedule([[start, lo], [end, hi]], default=224, multiple=32)
        assert [ours(e) for e in range(end + 3)] == \
            [ffcv_get_resolution(e, lo, hi, end, start) for e in range(end + 3)], (lo, hi, start, end)


def test_schedule_sizes_describe_and_fixed():
    ramp = SizeSchedule(FFCV, 224, 32, rounding="floor")
    assert ramp.sizes(300) == [160, 192, 224] and not ramp.fixed
    assert ramp.describe(300) == ("160 px (epochs 1-130), 192 px (epochs 131-250), 224 px (epochs 251-300); "
                                  "multiple 32, rounding floor")
    assert SizeSchedule(FFCV, 224, 32).describe(300) == (
        "160 px (epochs 1-70), 192 px (epochs 71-191), 224 px (epochs 192-300); multiple 32, rounding nearest")
    fixed = SizeSchedule(None, 224, 32)
    assert fixed.fixed and fixed.sizes(300) == [224] and {fixed(e) for e in range(300)} == {224}


def test_schedule_from_config_and_overrides():
    cfg = load_config(None, ["data.size_schedule=[[10,160],[250,224]]"])
    assert cfg.data.size_schedule == [(10, 160), (250, 224)] and cfg.data.size_multiple is None
    assert cfg.data.size_rounding == "nearest"
    # the model's multiple unless the config sets one; 32 without either
    assert size_schedule(cfg.data, 16).multiple == 16 and size_schedule(cfg.data).multiple == 32
    cfg = load_config(None, ["data.size_schedule=[[0,100]]", "data.size_multiple=8", "data.size_rounding=floor"])
    assert size_schedule(cfg.data, 32)(0) == 96
    cfg = load_config(None, ["data.size_schedule=[[0,100]]", "data.size_multiple=8"])
    with pytest.raises(ConfigError, match=r"size_schedule\[0\]: size 100 is not a multiple of data.size_multiple=8"):
        size_schedule(cfg.data, 32)
    cfg = load_config(None, ["data.size_schedule=[[0,96]]", "data.size_rounding=up"])
    with pytest.raises(ConfigError, match="data.size_rounding must be one of nearest, floor, got 'up'"):
        size_schedule(cfg.data, 32)
    with pytest.raises(ConfigError, match="size_schedule"):
        load_config(None, ["data.size_schedule=[[10,160,3]]"])


@pytest.mark.parametrize("milestones, match", [
    ([], "empty"),
    ([[10, 160], [10, 224]], "increase strictly"),
    ([[-1, 160]], "negative"),
    ([[0, 16]], "below data.size_multiple=32"),
    ([[0, 160], [10, 200]], r"\[1\]: size 200 is not a multiple of data.size_multiple=32"),
])
def test_schedule_errors_name_the_key(milestones, match):
    with pytest.raises(ValueError, match=match) as info:
        SizeSchedule(milestones, 224, 32)
    assert "data.size_schedule" in str(info.value)


def _tiny(dynamic, img_size=64, name="deit_tiny_distilled_patch16_224"):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, drop_path=0.0, kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2))
    return build_student(cfg, img_size, 5, dynamic_img_size=dynamic).eval()


def test_size_multiple_from_the_model():
    assert size_multiple(_tiny(False)) == 16                    # patch 8
    assert size_multiple(timm.create_model("deit3_small_patch16_224")) == 32
    assert size_multiple(timm.create_model("resnet10t")) is None


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "deit3_small_patch16_224"])
def test_student_resamples_its_position_embedding_per_forward(name):
    """The dynamic student at 40 px equals a static 40 px model holding the native 8x8 grid
    resampled to 5x5 (bicubic, antialiased: timm's resample_abs_pos_embed, by hand here); at its
    native size it equals the static model bit for bit; parameter shapes never change."""
    dyn, static = _tiny(True, name=name), _tiny(False, name=name)
    static.load_state_dict(dyn.state_dict())
    shapes = {k: v.shape for k, v in dyn.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(dyn(x), static(x))

    prefix = 0 if getattr(dyn, "no_embed_class", False) else dyn.num_prefix_tokens
    pos = dyn.pos_embed.detach()
    grid = pos[:, prefix:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    small = F.interpolate(grid, size=(5, 5), mode="bicubic", antialias=True, align_corners=False)
    ref = _tiny(False, img_size=40, name=name)
    ref.load_state_dict({**dyn.state_dict(), "pos_embed": torch.cat(
        [pos[:, :prefix], small.permute(0, 2, 3, 1).reshape(1, 25, -1)], dim=1)})
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(dyn(x), ref(x), rtol=1e-5, atol=1e-5)

    dyn.train()
    out = dyn(x)
    sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    assert dyn.pos_embed.grad.shape == dyn.pos_embed.shape      # the gradient flows to the native grid
    assert {k: v.shape for k, v in dyn.state_dict().items()} == shapes


def test_a_vit_without_dynamic_size_is_a_clear_error():
    with pytest.raises(ValueError, match="size_schedule"):
        build_student(ModelConfig(name="cait_xxs24_224", kwargs=dict(depth=1)), 224, 5, dynamic_img_size=True)


def test_flops_per_size_match_static_models():
    """Counted on the dynamic student at each side == counted on a static model built at that
    side; and 160 vs 224 is about the token ratio (196 / 100) for DeiT-Ti."""
    dyn = timm.create_model("deit_tiny_patch16_224", dynamic_img_size=True)
    by_size = flops.train_flops_by_size(dyn, [160, 224, 160])
    assert list(by_size) == [160, 224]
    for s in (160, 224):
        assert by_size[s] == flops.train_flops_per_image(timm.create_model("deit_tiny_patch16_224", img_size=s), s)
    ratio = by_size[224] / by_size[160]
    assert 1.9 < ratio < 2.1, ratio                               # tokens 197 / 101 = 1.95


def test_loader_builds_each_epoch_at_its_size(synthetic_tree):
    """set_epoch(e): batches at the side data.size_schedule gives epoch e, with RandAugment on;
    resuming mid-epoch at a size gives the same batches as the uninterrupted epoch."""
    cfg = DataConfig(root=synthetic_tree, img_size=32, num_threads=2, device="cpu", repeated_aug=1,
                     rand_augment="rand-m9-mstd0.5-inc1", size_schedule=[[1, 48], [2, 32]], size_multiple=16)
    loader = build_loader(cfg, "train", 8, 0, 1, 0, CPU)
    assert [loader.sizes(e) for e in range(4)] == [48, 48, 32, 32]
    loader.set_epoch(1)
    full = list(loader)
    assert loader.img_size == 48 and all(x.shape == (8, 3, 48, 48) for x, _ in full)
    loader.set_epoch(1, skip_batches=3)
    rest = list(loader)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(rest, full[3:])) and len(rest) == len(full) - 3
    loader.set_epoch(2)
    x, _ = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and loader.img_size == 32
    loader.close()


@pytest.mark.gpu
def test_gpu_loader_builds_each_epoch_at_its_size(synthetic_tree):
    cfg = DataConfig(root=synthetic_tree, img_size=32, num_threads=2, device="gpu", repeated_aug=1,
                     rand_augment="rand-m9-mstd0.5-inc1")
    loader = build_loader(cfg, "train", 8, 0, 1, 0, torch.device("cuda"))
    loader.sizes = SizeSchedule([[0, 48]], 32, 16)
    loader.set_epoch(0)
    x, _ = next(iter(loader))
    assert x.shape == (8, 3, 48, 48) and x.is_cuda
    loader.close()


def test_gpu_layout_builds_each_epoch_at_its_size(synthetic_tree, monkeypatch):
    """The loader's GPU branch (resize and flip inside the DALI graph) on CPU operators
    (Placement.gpu_layout_on_cpu): each epoch's graph resizes to that epoch's side, and a
    mid-epoch resume at that side replays the same batches."""
    from fastdeit.data.loading import loader as loader_module
    from fastdeit.data.loading.pipeline import Placement

    monkeypatch.setattr(loader_module, "resolve_placement", lambda cfg, device: Placement(None, gpu_layout_on_cpu=True))
    cfg = DataConfig(root=synthetic_tree, img_size=32, num_threads=2, device="cpu", repeated_aug=1, rand_augment=None)
    loader = build_loader(cfg, "train", 8, 0, 1, 0, CPU)
    loader.sizes = SizeSchedule([[1, 48], [2, 32]], 32, 16)
    loader.set_epoch(1)
    full = list(loader)
    assert all(x.shape == (8, 3, 48, 48) for x, _ in full)
    loader.set_epoch(1, skip_batches=4)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(list(loader), full[4:]))
    loader.set_epoch(2)
    assert next(iter(loader))[0].shape == (8, 3, 32, 32)
    loader.close()


@pytest.mark.slow
def test_compiled_student_gets_one_static_graph_per_size(dataset, tmp_path, monkeypatch):
    """An 11-size schedule with the student compiled: 11 static graphs (no dynamic-shape
    attempt, which timm's PatchEmbed would pin anyway), none falling back to eager at dynamo's
    default limit of 8, and a 12th shape an error rather than a silent eager run from then on."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    # What is counted is dynamo's capture and its guards; inductor's code generation for 11
    # graphs would take minutes on this CPU and changes neither.
    real = DeepSpeedEngine.compile
    monkeypatch.setattr(DeepSpeedEngine, "compile",
                        lambda self, backend=None, compile_kwargs={}, **kw: real(self, "eager", compile_kwargs, **kw))
    # dynamo's own patch, which restores the values on leaving: monkeypatch would find no
    # attribute in the config module's __dict__ and delete it on undo, which hides the setting
    # from dynamo itself ("recompile_limit does not exist") in every later test's compile.
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False):
        _one_graph_per_size(dataset, tmp_path)


def _one_graph_per_size(dataset, tmp_path):
    from torch._dynamo.utils import counters

    from fastdeit import distributed
    from fastdeit.build import build_trainer
    from tests.launching import TINY

    sizes = [32 + 8 * i for i in range(11)]
    schedule = "[" + ",".join(f"[{e},{s}]" for e, s in enumerate(sizes)) + "]"
    cfg = load_config(None, [*TINY, f"data.root={dataset}", f"trainer.run_dir={tmp_path}",
                             "model.name=deit_tiny_patch16_224", "distill.type=none", "model.compile=true",
                             "data.img_size=112", "data.size_multiple=8", f"data.size_schedule={schedule}",
                             "trainer.epochs=11", "engine.global_batch_size=8"])
    env = distributed.init()
    try:
        torch._dynamo.reset()
        counters.clear()
        trainer = build_trainer(cfg, env)
        assert [trainer.train_loader.sizes(e) for e in range(11)] == sizes
        assert torch._dynamo.config.recompile_limit == 11 and torch._dynamo.config.fail_on_recompile_limit_hit
        engine = trainer.engine
        y = torch.arange(8) % 4
        for size in [*sizes, sizes[0]]:              # back at the first size: its graph is reused
            x = torch.randn(8, 3, size, size).to(trainer.dtype)
            engine.backward(F.cross_entropy(engine(x).float(), y))
            engine.step()
        assert counters["stats"]["unique_graphs"] == 11, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
        with pytest.raises(Exception, match="recompile_limit|cache_size_limit|RecompileLimit"):
            engine(torch.randn(8, 3, 120, 120).to(trainer.dtype))
        trainer.train_loader.close()
        trainer.val_loader.close()
    finally:
        torch._dynamo.reset()
        distributed.teardown()
