"""Model EMA: the decay schedule and the update against hand computations on a real DeepSpeed
engine (every precision/ZeRO layout it keeps masters in), and save/restore through the
Checkpointer. In-process, one rank; the 2-rank partition assembly, exact resume and the
2 -> 1 reshard run through the entry point in tests/test_scale.py."""
import math

import pytest
import torch

from fastdeit import distributed, engine as engine_lib
from fastdeit.build import build_engine, build_models
from fastdeit.checkpoint import CheckpointConfig, Checkpointer, ema_state_dict
from fastdeit.config import Config
from fastdeit.data.config import DataConfig
from fastdeit.data.augment.mixing import MixingConfig
from fastdeit.ema import EmaConfig, decay_at, update_weight
from fastdeit.losses import DistillConfig
from fastdeit.models import CheckpointMismatchError, ModelConfig
from fastdeit.optim import OptimConfig, ScheduleConfig
from fastdeit.step import TrainStep


def test_decay_schedule_by_hand():
    assert decay_at(EmaConfig(decay=0.99996), 1) == 0.99996          # DeiT: constant from step 1
    warm = EmaConfig(decay=0.999, warmup=True, warmup_gamma=1.0, warmup_power=0.75)
    assert decay_at(warm, 1) == 0.0                                   # timm: the first update copies
    assert decay_at(warm, 2) == pytest.approx(1 - 2 ** -0.75)         # n = 1: 1 - (1 + 1)^-3/4
    assert decay_at(warm, 11) == pytest.approx(1 - 11 ** -0.75)
    assert decay_at(warm, 10 ** 6) == 0.999                           # capped at ema.decay
    every = EmaConfig(decay=0.9, every=3)
    assert [update_weight(every, t) for t in (1, 2)] == [None, None]
    assert update_weight(every, 3) == pytest.approx(1 - 0.9 ** 3)     # three steps' worth of decay


@pytest.fixture(scope="module")
def world():
    env = distributed.init()
    yield env
    distributed.teardown()


def make(zero_stage, precision, ema_cfg, seed=0):
    """A tiny DeiT in a DeepSpeed engine with its EMA, built as the trainer builds them
    (fastdeit.build), and the trainer's step over them (fastdeit.step.TrainStep: the EMA
    updates at every optimizer-step boundary). Returns (engine, ema, step)."""
    torch.manual_seed(seed)
    cfg = Config(data=DataConfig(img_size=32), mixing=MixingConfig(prob=0.0, erase_prob=0.0),
                 model=ModelConfig(name="deit_tiny_patch16_224", drop_path=0.0,
                                   kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)),
                 distill=DistillConfig(type="none"), optim=OptimConfig(lr=1e-2, lr_base_batch=8),
                 schedule=ScheduleConfig(warmup_epochs=0),
                 engine=engine_lib.EngineConfig(global_batch_size=8, zero_stage=zero_stage, precision=precision),
                 ema=ema_cfg)
    device = torch.device("cpu")
    models = build_models(cfg, device, num_classes=5, micro=8)
    train = TrainStep(build_engine(cfg, models, world_size=1, steps_per_epoch=1), device)
    return train.engine, train.parts.ema, train


def step(train, seed):
    g = torch.Generator().manual_seed(seed)
    train(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g))


def masters(engine):
    """The fp32 master weights by name: DeepSpeed's own safe_get_full_fp32_param under ZeRO,
    the per-parameter fp32 copies of its FP16_UnfusedOptimizer (bf16 at stage 0), else the
    fp32 parameters themselves."""
    from deepspeed.utils import safe_get_full_fp32_param

    opt = engine.optimizer
    copies = {}
    if hasattr(opt, "fp32_groups"):
        copies = {id(lp): hp for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(g16, g32)}
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        full = full if full is not None else copies.get(id(p), p)
        assert full.dtype == torch.float32
        out[name] = full.detach().double().clone()
    return out


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"),
                                                   (3, "fp32")])
def test_update_against_hand_computation(world, zero_stage, precision):
    """Three optimizer steps with every=2 and warmup, on each layout of the fp32 masters."""
    cfg = EmaConfig(decay=0.9, every=2, warmup=True, warmup_gamma=1.0, warmup_power=0.75)
    engine, ema, train = make(zero_stage, precision, cfg)
    dtype = train.parts.dtype
    expected = masters(engine)                                # the EMA starts as the weights
    for t in (1, 2, 3):
        step(train, seed=t)                                   # updates the EMA at the boundary
        if t % 2 == 0:
            d = (1 - (1 + (t - 1)) ** -0.75) ** 2             # warmup decay at step t, for 2 steps
            w = masters(engine)
            expected = {k: d * expected[k] + (1 - d) * w[k] for k in expected}
    got = ema.state_dict()
    assert list(got) == list(engine.module.state_dict())      # plain timm keys, module order
    for k, v in expected.items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-7)
    # It really moved: the EMA is neither the start nor the current weights.
    assert not torch.equal(got["head.weight"].double(), masters(engine)["head.weight"])
    # The eval module carries the EMA, cast to the live model's dtype.
    module = ema.module()
    torch.testing.assert_close(module.head.weight, got["head.weight"].to(dtype))
    assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_update_reads_the_optimizers_own_fp32_partition(world):
    """ZeRO-1: the EMA's sources are views into the optimizer's fp32 partition (what the step
    just wrote), not copies and not the bf16 parameters."""
    engine, ema, train = make(1, "bf16", EmaConfig(decay=0.5))
    step(train, seed=1)
    partition = engine.optimizer.single_partition_of_fp32_groups
    spans = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in partition]
    assert ema.masters and all(m.dtype == torch.float32 for m in ema.masters)
    assert all(any(lo <= m.data_ptr() < hi for lo, hi in spans) for m in ema.masters)
    before = [w.clone() for w in ema.weights]
    ema.update(engine.global_steps)
    for b, a, m in zip(before, ema.weights, ema.masters):
        torch.testing.assert_close(a, 0.5 * b + 0.5 * m)


def test_zero3_update_reads_the_stage3_fp32_pieces_without_a_gather(world, monkeypatch):
    """ZeRO-3: the EMA's sources are views into the optimizer's flat fp32 sub-group tensors
    (the pieces this rank steps), and an update communicates nothing: no gather of the full
    model per step, whatever the model size."""
    import torch.distributed as dist
    engine, ema, train = make(3, "bf16", EmaConfig(decay=0.5))
    step(train, seed=1)
    flats = engine.optimizer.fp32_partitioned_groups_flat
    spans = [(f.data_ptr(), f.data_ptr() + f.numel() * f.element_size()) for f in flats]
    assert ema.partitioned and ema.masters and all(m.dtype == torch.float32 for m in ema.masters)
    assert all(any(lo <= m.data_ptr() < hi for lo, hi in spans) for m in ema.masters)
    calls = []
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter_tensor"):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _name=name, _real=real, **k: calls.append(_name) or _real(*a, **k))
    before = [w.clone() for w in ema.weights]
    ema.update(engine.global_steps)
    assert calls == []
    for b, a, m in zip(before, ema.weights, ema.masters):
        torch.testing.assert_close(a, 0.5 * b + 0.5 * m)


@pytest.mark.gpu
def test_update_makes_no_host_sync(world):
    engine, ema, train = make(1, "bf16", EmaConfig(decay=0.9, every=2, warmup=True))
    step(train, seed=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")          # any synchronising call raises
    try:
        for t in (1, 2, 3, 4):
            ema.update(t)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_checkpoint_roundtrip_is_bitwise(world, tmp_path):
    cfg = EmaConfig(decay=0.7)
    engine, ema, train = make(1, "bf16", cfg)
    ckpt = Checkpointer(CheckpointConfig(), str(tmp_path), {"m": 1}, True, ema=ema)
    for t in (1, 2):
        step(train, seed=t)
    path = ckpt.save(engine, {"epoch": 0, "epoch_step": 2})
    saved = ema.state_dict()
    on_disk = ema_state_dict(path)
    assert all(torch.equal(on_disk[k], saved[k].cpu()) for k in saved)
    assert not any("_orig_mod" in k for k in on_disk)

    # A fresh engine (other initial weights) restored from the checkpoint: EMA bit for bit,
    # and one more identical step keeps them identical.
    engine2, ema2, train2 = make(1, "bf16", cfg, seed=1)
    ckpt2 = Checkpointer(CheckpointConfig(), str(tmp_path), {"m": 1}, True, ema=ema2)
    state = ckpt2.load(engine2, path)
    assert state["ema"] == "restored"
    restored = ema2.state_dict()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    for t in (train, train2):
        step(t, seed=3)
    a, b = ema.state_dict(), ema2.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A checkpoint without EMA weights starts the EMA from the resumed masters.
    (path / "ema.pt").unlink()
    engine3, ema3, _ = make(1, "bf16", cfg, seed=2)
    state = Checkpointer(CheckpointConfig(), str(tmp_path), {"m": 1}, True, ema=ema3).load(engine3, path)
    assert state["ema"] == "started from the resumed weights"
    fresh = ema3.state_dict()
    for k, v in masters(engine3).items():
        assert torch.equal(fresh[k].double(), v)
    with pytest.raises(FileNotFoundError, match="no EMA weights"):
        ema_state_dict(path)


def test_wrong_ema_weights_name_the_file(world):
    engine, ema, _ = make(1, "bf16", EmaConfig(decay=0.5))
    state = ema.state_dict()
    state.pop("head.bias")
    with pytest.raises(CheckpointMismatchError, match=r"ema\.pt: EMA weights do not fit.*head\.bias"):
        ema.load_state_dict(state, "x/ema.pt")


@pytest.mark.parametrize("kw,match", [
    (dict(decay=1.0), "ema.decay must be in"), (dict(decay=0.9, every=0), "ema.every"),
    (dict(decay=0.9, warmup_power=0.0), "warmup_power"),
])
def test_bad_config(world, kw, match):
    with pytest.raises(ValueError, match=match):
        make(1, "bf16", EmaConfig(**kw))


def test_deit_configs_keep_the_reference_ema():
    from fastdeit.config import load_config
    from tests.launching import ROOT

    for name in ("deit_ti", "deit_s", "deit_b", "deit_b_384_finetune"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.ema.decay == 0.99996 and cfg.ema.every == 1 and not cfg.ema.warmup
        # Its horizon: about 25k optimizer steps (1/(1-d)), i.e. 20 epochs at batch 1024.
        assert math.isclose(1 / (1 - cfg.ema.decay), 25000, rel_tol=1e-3)
