"""Parameter groups, the linear LR scaling rule and the per-step schedule, by hand."""
import math

import pytest
import torch

from fastdeit.models import ModelConfig, build_student
from fastdeit.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler, param_groups, scaled_lr


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(name="deit_tiny_distilled_patch16_224", kwargs=dict(patch_size=8, embed_dim=48, depth=2, num_heads=3))
    return build_student(cfg, img_size=32, num_classes=5)


def test_no_decay_group(model):
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    expected_no_decay = {n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")}
    expected_no_decay |= {"pos_embed", "cls_token", "dist_token"}
    assert no_decay == expected_no_decay
    assert decay == {n for n, _ in model.named_parameters()} - expected_no_decay
    assert {"blocks.0.attn.qkv.weight", "head.weight", "head_dist.weight", "patch_embed.proj.weight"} <= decay
    assert [g["weight_decay"] for g in groups if g["weight_decay"] > 0] == [0.05]


def test_linear_scaling_and_adamw(model):
    assert scaled_lr(OptimConfig(), 1024) == pytest.approx(1e-3)
    assert scaled_lr(OptimConfig(lr=5e-4), 256) == pytest.approx(2.5e-4)
    opt = build_optimizer(OptimConfig(), model, global_batch=1024)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["eps"] == 1e-8 and opt.defaults["fused"] is True
    assert all(g["lr"] == pytest.approx(1e-3) for g in opt.param_groups)


def test_apex_missing_is_a_clear_error(model):
    try:
        import apex.optimizers  # noqa: F401
        pytest.skip("apex is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="Apex"):
        build_optimizer(OptimConfig(name="apex_fused_adam"), model, 1024)


def test_schedule_values_by_hand(model):
    peak, steps_per_epoch, epochs = 1e-3, 10, 30
    opt = build_optimizer(OptimConfig(), model, global_batch=1024)
    sched = build_scheduler(ScheduleConfig(warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5), opt, steps_per_epoch, epochs)
    warm, total = 50, 300

    def expected(t):
        if t < warm:
            return 1e-6 + (peak - 1e-6) * t / warm
        k = t - warm
        return 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * k / (total - warm)))

    for t in (0, 1, 25, 49, 50, 51, 175, 299):
        sched.step_update(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected(t), rel=1e-9), t
        assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
    sched.step_update(50)
    assert opt.param_groups[0]["lr"] == pytest.approx(peak)        # warmup ends at the peak
    sched.step_update(300)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)        # and the cosine at min_lr


def test_sgd_steps_like_timms_sgd(model):
    """optim.name=sgd is what the DeiT reference's timm create_optimizer('sgd') builds: Nesterov
    momentum 0.9, weight decay off for 1-D params and the no_weight_decay() set."""
    import copy

    from timm.optim import create_optimizer_v2

    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    opts = [build_optimizer(OptimConfig(name="sgd", lr=0.01, lr_base_batch=512, weight_decay=1e-4), ours, 768),
            create_optimizer_v2(theirs, "sgd", lr=0.015, weight_decay=1e-4, momentum=0.9)]
    x = torch.randn(4, 3, 32, 32)
    for m, opt in zip((ours, theirs), opts):
        torch.manual_seed(0)                    # the same drop-path draws for both
        for _ in range(2):
            cls, dist = m(x)
            (cls.logsumexp(1) + dist.square().mean(1)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert opts[0].param_groups[0]["nesterov"] and opts[0].param_groups[0]["lr"] == pytest.approx(0.015)
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
