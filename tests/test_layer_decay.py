"""optim.layer_decay: timm's parameter groups (checked against timm.optim.param_groups_layer_decay
and the decay^(L+1) / decay^(L-i) / 1.0 rule by hand), composed with the weight-decay exclusions,
and the learning rates actually applied under DeepSpeed ZeRO 1/2 with AdamW and LAMB.

The applied LR is read from the first optimizer step itself: with weight decay 0, Adam's and
LAMB's first update is lr * g / (|g| + eps) per element (LAMB's trust ratio only applies where
weight decay is non-zero), so |delta p| is the group's LR wherever the gradient is non-zero.
"""
import math

import pytest
import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from fastdeit.errors import ConfigError
from fastdeit.models import ModelConfig, build_student
from fastdeit.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler, param_groups

DEPTH = 3
KW = dict(patch_size=8, embed_dim=48, depth=DEPTH, num_heads=3)


def tiny(name="deit_tiny_distilled_patch16_224"):
    torch.manual_seed(0)
    return build_student(ModelConfig(name=name, drop_path=0.0, kwargs=KW), 32, 5)


def assignment(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "deit3_small_patch16_224"])
def test_groups_match_timm_and_the_rule(name):
    torch.manual_seed(0)
    model = build_student(ModelConfig(name=name, drop_path=0.0, kwargs=dict(KW, **({"init_values": 1e-4}
                                      if name.startswith("deit3") else {}))), 32, 5)
    ours = param_groups(model, 0.05, layer_decay=0.65)
    theirs = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=0.65)
    got = assignment(model, ours)
    assert got == assignment(model, theirs)
    assert [g["lr_scale"] for g in ours] == sorted((g["lr_scale"] for g in ours), reverse=True)   # full LR first
    d, L = 0.65, DEPTH
    for n, (scale, wd) in got.items():
        if n.startswith(("cls_token", "dist_token", "pos_embed", "patch_embed", "reg_token")):
            want = d ** (L + 1)
        elif n.startswith("blocks."):
            want = d ** (L - int(n.split(".")[1]))
        elif n.startswith("norm."):                             # timm's group_matcher: with the last block
            want = d
        else:                                                   # the head(s)
            assert n.startswith("head"), n
            want = 1.0
        assert scale == pytest.approx(want), n
        # the weight-decay exclusions of the plain groups, unchanged
        excluded = n in model.no_weight_decay() or model.get_parameter(n).ndim <= 1
        assert wd == (0.0 if excluded else 0.05), n
    assert {n for n, (_, wd) in got.items() if wd == 0.0} == \
        {n for g in param_groups(model, 0.05) if g["weight_decay"] == 0 for n in assignment(model, [dict(g, lr_scale=1)])}


def test_bad_values_and_models_without_layers():
    with pytest.raises(ConfigError, match=r"optim.layer_decay must be in \(0, 1\], got 1.5"):
        param_groups(tiny(), 0.05, layer_decay=1.5)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="optim.layer_decay=0.75: Sequential has no layers timm can tell apart"):
        param_groups(mlp, 0.05, layer_decay=0.75)


def test_schedule_multiplies_each_groups_scale():
    model = tiny()
    opt = build_optimizer(OptimConfig(lr=1e-3, lr_base_batch=64, layer_decay=0.5), model, 64)
    sched = build_scheduler(ScheduleConfig(warmup_epochs=1, warmup_lr=1e-6, min_lr=1e-5), opt, 10, 3)
    for t, expected in ((0, 1e-6), (5, 1e-6 + (1e-3 - 1e-6) * 0.5),
                        (20, 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 10 / 20)))):
        sched.step_update(t)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(expected * g["lr_scale"], rel=1e-9), t
    assert opt.param_groups[0]["lr_scale"] == 1.0 and min(g["lr_scale"] for g in opt.param_groups) == 0.5 ** 4


@pytest.fixture(scope="module")
def world():
    from fastdeit import distributed

    env = distributed.init()
    yield env
    distributed.teardown()


@pytest.mark.parametrize("optimizer,stage", [("adamw", 1), ("adamw", 2), ("lamb", 1), ("lamb", 2)])
def test_applied_lrs_under_zero(world, optimizer, stage):
    """One DeepSpeed step (fp32, ZeRO 1/2, one rank in process) at a mid-cosine schedule step:
    every parameter moved by its group's lr = schedule(t) x lr_scale."""
    from fastdeit import engine as engine_lib

    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OptimConfig(name=optimizer, lr=1e-3, lr_base_batch=16, weight_decay=0.0, layer_decay=0.5,
                      lamb_max_grad_norm=None)
    opt = build_optimizer(cfg, model, 16)
    scales = {n: s for n, (s, _) in assignment(model, opt.param_groups).items()}
    ds = engine_lib.deepspeed_config(engine_lib.EngineConfig(global_batch_size=16, zero_stage=stage, precision="fp32",
                                                             gradient_clipping=0.0), world_size=1)
    engine = engine_lib.initialize(model, opt, ds)
    sched = build_scheduler(ScheduleConfig(warmup_epochs=0, min_lr=1e-5), engine.optimizer, 10, 1)
    sched.step_update(4)
    peak = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 4 / 10))
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 5, (16,))
    cls, dist = engine(x)
    engine.backward(nn.functional.cross_entropy(cls, y) + nn.functional.cross_entropy(dist, y))
    engine.step()
    after = dict(engine.module.named_parameters())
    seen = set()
    for n, p0 in before.items():
        delta = (after[n].detach() - p0).abs()
        moved = delta[delta > 0]
        assert moved.numel() > 0, n
        # |g| >> eps almost everywhere: the update is the LR to a few parts in 10^4
        torch.testing.assert_close(moved.median(), torch.tensor(peak * scales[n]), rtol=2e-3, atol=0)
        seen.add(scales[n])
    assert seen == {1.0, 0.5, 0.25, 0.125, 0.0625}
