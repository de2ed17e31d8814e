"""fastdeit.lamb.Lamb: timm's Lamb maths, and the same result under DeepSpeed ZeRO 1/2 on 2 ranks
(where a per-tensor LAMB would compute its trust ratios over flat partitions instead)."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from timm.optim import Lamb as TimmLamb
from torch import nn

from fastdeit import distributed
from fastdeit.lamb import Lamb

STEPS = 3
SCALE = 100.0      # the loss scaled so that the gradients' global norm is far above LAMB's clip at 1


def model():
    torch.manual_seed(0)
    # Uneven sizes, so ZeRO's partitions cut through parameters; biases are in the no-decay group.
    return nn.Sequential(nn.Linear(13, 37), nn.GELU(), nn.LayerNorm(37), nn.Linear(37, 5))


def groups(m, wd=0.05):
    decay = [p for p in m.parameters() if p.ndim > 1]
    return [{"params": decay, "weight_decay": wd}, {"params": [p for p in m.parameters() if p.ndim <= 1],
                                                     "weight_decay": 0.0}]


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 13, generator=g), torch.randint(0, 5, (16,), generator=g)


def train(m, opt, steps=STEPS, scale=1.0):
    x, y = batch()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(m(x), y) * scale
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("scale", [1.0, 100.0], ids=["unclipped", "clipped"])   # global grad-norm clip at 1
def test_matches_timm_lamb(scale):
    ref = train(m := model(), TimmLamb(groups(m), lr=3e-3, eps=1e-8), scale=scale)
    got = train(m := model(), Lamb(groups(m), lr=3e-3, eps=1e-8), scale=scale)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7)


def _worker(rank, port, stage, which, precision, clip, out, scale=SCALE):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from fastdeit import distributed, engine as engine_lib

    distributed.init()
    try:
        m = model()
        opt = (Lamb if which == "ours" else TimmLamb)(groups(m), lr=3e-3, eps=1e-8)
        ds = engine_lib.deepspeed_config(engine_lib.EngineConfig(
            global_batch_size=32, zero_stage=stage, precision=precision, gradient_clipping=clip), world_size=2)
        try:
            engine = engine_lib.initialize(m, opt, ds)
        except ValueError as e:
            torch.save({"error": str(e)}, out) if rank == 0 else None
            return
        result = {}
        if which == "ours" and opt._layout is not None:
            # every original parameter is covered exactly once by the ranks' segments
            counts = torch.zeros(opt._num_params + 1, dtype=torch.int64)
            for lengths, ids in opt._layout.values():
                counts.index_add_(0, ids, lengths)
            torch.distributed.all_reduce(counts)
            result["covered"] = counts[:-1].tolist()
        x, y = batch()                      # the same batch on both ranks: the mean gradient is the
        for _ in range(STEPS):              # single-process gradient
            engine.backward(nn.functional.cross_entropy(engine(x), y) * scale)
            engine.step()
        result["state"] = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
        if rank == 0:
            torch.save(result, out)
    finally:
        distributed.teardown()


def _spawn(tmp_path, stage, which, precision="fp32", clip=0.0):
    port = distributed.free_port()
    out = tmp_path / f"{which}-{stage}-{precision}-{clip}.pt"
    mp.spawn(_worker, args=(port, stage, which, precision, clip, str(out)), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_partitions_keep_layerwise_trust_ratios(stage, tmp_path):
    """ZeRO-1/2 over 2 ranks, fp32, clipping active: ours equals single-process timm Lamb (its
    global-norm clip over both groups and ranks done in the deferred last-group call); timm's
    Lamb under ZeRO does not (trust ratios over flat partitions)."""
    ref = train(m := model(), TimmLamb(groups(m), lr=3e-3, eps=1e-8), scale=SCALE)
    ours = _spawn(tmp_path, stage, "ours")
    assert ours["covered"] == [p.numel() for g in groups(model()) for p in g["params"]]
    for k in ref:
        torch.testing.assert_close(ours["state"][k], ref[k], rtol=1e-5, atol=1e-6)
    if stage == 1:
        timm = _spawn(tmp_path, stage, "timm")
        worst = max((timm["state"][k] - ref[k]).abs().max().item() for k in ref)
        assert worst > 1e-4, worst


@pytest.fixture(scope="module")
def world():
    from fastdeit import distributed

    env = distributed.init()
    yield env
    distributed.teardown()


def _one_rank(stage, clip=0.0, precision="fp32"):
    from fastdeit import engine as engine_lib

    m = model()
    opt = Lamb(groups(m), lr=3e-3, eps=1e-8)
    ds = engine_lib.deepspeed_config(engine_lib.EngineConfig(
        global_batch_size=16, zero_stage=stage, precision=precision, gradient_clipping=clip), world_size=1)
    return engine_lib.initialize(m, opt, ds), opt


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_one_rank_defers_groups_and_clips_by_all_of_them(world, stage):
    """In process, one rank: ZeRO 1/2 still flatten the groups and call step() once per group.
    The first call only defers; the last steps both groups, clipped by the norm of both (the
    loss scaled x100 so that the clip is active), and writes the deferred group's bf16/fp32
    partition back: equal to timm's Lamb on the plain model."""
    ref = train(m := model(), TimmLamb(groups(m), lr=3e-3, eps=1e-8), scale=SCALE)
    engine, opt = _one_rank(stage)
    assert opt._all_params is not None and len(opt._all_params) == 2
    x, y = batch()
    for _ in range(STEPS):
        engine.backward(nn.functional.cross_entropy(engine(x), y) * SCALE)
        engine.step()
        assert not opt._deferred          # nothing left behind after an engine step
    got = engine.module.state_dict()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    assert all(s["step"].item() == STEPS and s["step"].device == p.device for p, s in opt.state.items())


def test_engine_clipping_with_lamb_is_refused(world):
    """DeepSpeed clipping as well as LAMB's own would clip twice, with 4 host syncs a step:
    refused at start (build) and, for direct users, when LAMB binds to the engine."""
    from fastdeit.errors import ConfigError
    from fastdeit.optim import OptimConfig, check_clipping

    with pytest.raises(ConfigError, match="engine.gradient_clipping=0 \\(it is 1.0\\)"):
        check_clipping(OptimConfig(name="lamb"), 1.0)
    check_clipping(OptimConfig(name="adamw"), 1.0)
    with pytest.raises(ConfigError, match="engine.gradient_clipping=0"):
        _one_rank(1, clip=1.0)


def test_bind_accepts_per_tensor_copies_and_refuses_unknown_flattening():
    """DeepSpeed's unfused bf16 optimizer (ZeRO 0) hands LAMB one fp32 copy per parameter: per-tensor
    norms are right, nothing to bind. A wrapper that flattened in an unknown way is refused."""
    m = model()
    copies = [{"params": [p.detach().clone().requires_grad_() for p in g["params"]],
               "weight_decay": g["weight_decay"]} for g in groups(m)]
    opt = Lamb(copies, lr=1e-3)
    opt.bind_layout(object(), m)
    assert opt._layout is None
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).requires_grad_()
    with pytest.raises(RuntimeError, match="flattened partitions"):
        Lamb([flat], lr=1e-3).bind_layout(object(), m)


def test_optim_config_builds_lamb_and_guards_apex_under_zero():
    from fastdeit.optim import OptimConfig, build_optimizer, check_zero_stage

    m = model()
    opt = build_optimizer(OptimConfig(name="lamb", lr=3e-3, lr_base_batch=2048, eps=1e-8), m, 2048)
    assert isinstance(opt, Lamb) and opt.max_grad_norm == 1.0
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]   # 1-D params undecayed
    assert all(g["lr"] == 3e-3 and g["eps"] == 1e-8 for g in opt.param_groups)
    check_zero_stage(OptimConfig(name="apex_fused_lamb"), 0)
    check_zero_stage(OptimConfig(name="lamb"), 2)
    with pytest.raises(ValueError, match="optim.name=lamb"):
        check_zero_stage(OptimConfig(name="apex_fused_lamb"), 1)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    ref = train(m := model(), Lamb(groups(m), lr=3e-3, eps=1e-8))
    m = model().cuda()
    x, y = batch()
    opt = Lamb(groups(m), lr=3e-3, eps=1e-8)
    for _ in range(STEPS):
        nn.functional.cross_entropy(m(x.cuda()), y.cuda()).backward()
        opt.step()
        opt.zero_grad()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v.cpu(), ref[k], rtol=1e-4, atol=1e-5)
