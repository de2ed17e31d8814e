"""ZeRO-3 end to end through launch/train.py on 2 CPU ranks (gloo), in fp32: training with the
frozen teacher outside the engine, activation checkpointing and the EMA kept from the stage-3
partitions; losses equal to ZeRO-1's; exact mid-epoch resume; resharding to 1 rank; the
consolidated export. The launches are shared by the assertions (one module fixture each)."""
import pytest
import timm
import torch

from fastdeit import ema as ema_lib
from fastdeit.checkpoint import Checkpointer, ema_state_dict, fp32_state_dict
from fastdeit.config import load_config
from tests.launching import launch, records

pytestmark = pytest.mark.slow

STEPS = 6        # 4 classes x 48 images / global batch 32


def args(dataset, teacher, run, stage, *extra):
    # fp32 (engine and teacher): stage 1 and stage 3 then differ only in reduction order.
    # Mixing and erasing on: resume must restore numpy's and Python's RNG streams too.
    return [f"data.root={dataset}", f"trainer.run_dir={run}", "model.name=deit_tiny_distilled_patch16_224",
            "distill.type=soft", "teacher.name=resnet10t", f"teacher.weights={teacher}", "mixing.prob=1.0",
            "mixing.erase_prob=0.5", "model.drop_path=0.1", "logging.log_every=1", "engine.precision=fp32",
            "teacher.dtype=fp32", f"engine.zero_stage={stage}", "trainer.epochs=2", "trainer.eval_every=2",
            "ema.decay=0.9", "ema.every=3", "ema.warmup=true", *extra]


def losses(run):
    return {r["step"]: (r["loss"], r["lr"]) for r in records(run, "step")}


@pytest.fixture(scope="module")
def full(dataset, teacher, tmp_path_factory):
    """ZeRO-3 with activation checkpointing, two epochs uninterrupted."""
    run = tmp_path_factory.mktemp("zero3-full")
    out = launch(*args(dataset, teacher, run, 3, "model.grad_checkpointing=true"))
    return run, out.stdout


def test_zero3_trains_like_zero1_and_exports(dataset, teacher, full, tmp_path):
    run, stdout = full
    # The log counts the parameters before ZeRO-3 empties the module's tensors.
    n = sum(p.numel() for p in timm.create_model("deit_tiny_distilled_patch16_224", num_classes=4, img_size=32,
                                                    **load_config(run / "config.yaml").model.kwargs).parameters())
    assert f"{n:,} params" in stdout
    # ZeRO-1 without checkpointing, same seed: the same losses within fp32 rounding (stage 3
    # reduce-scatters where stage 1 all-reduces; checkpointing recomputes the same blocks).
    one = tmp_path / "zero1"
    launch(*args(dataset, teacher, one, 1, f"trainer.stop_after_steps={STEPS}"))
    a, b = losses(run), losses(one)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in b:
        assert a[step][0] == pytest.approx(b[step][0], rel=1e-5, abs=1e-6), step
        assert a[step][1] == b[step][1]
    last = records(run, "epoch")[-1]
    assert last["val/images"] == 40 and {"val/avg_top1", "val/ema_avg_top1"} <= set(last)

    # The export: consolidated from both ranks' fp32 partitions, loadable by timm, no teacher.
    ckpt = run / "checkpoints" / f"step_{2 * STEPS:08d}"
    masters = fp32_state_dict(ckpt)
    exported = torch.load(run / "model.pth", weights_only=True)
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=4, img_size=32,
                              checkpoint_path=str(run / "model.pth"), **load_config(run / "config.yaml").model.kwargs)
    assert exported.keys() == masters.keys() == model.state_dict().keys()
    assert all(torch.equal(exported[k], masters[k]) for k in masters)
    ema = ema_state_dict(ckpt)
    assert all(torch.equal(v, ema[k]) for k, v in torch.load(run / "model_ema.pth", weights_only=True).items())
    assert not torch.equal(ema["head.weight"], masters["head.weight"])     # an average, not the weights


def test_zero3_resumes_mid_epoch_exactly(dataset, teacher, full, tmp_path):
    run, _ = full
    split = tmp_path / "split"
    common = args(dataset, teacher, split, 3, "model.grad_checkpointing=true")
    stopped = launch(*common, f"trainer.stop_after_steps={STEPS + 2}")
    assert "stopping after optimizer step 8" in stopped.stdout
    assert "resumed from" in launch(*common).stdout
    a, b = losses(run), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 2 * STEPS + 1))
    assert a == b                                                     # bit for bit
    va, vb = records(run, "epoch")[-1], records(split, "epoch")[-1]
    assert va["val/avg_top1"] == vb["val/avg_top1"] and va["val/ema_avg_top1"] == vb["val/ema_avg_top1"]
    last = f"step_{2 * STEPS:08d}"
    ea, eb = ema_state_dict(run / "checkpoints" / last), ema_state_dict(split / "checkpoints" / last)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def universal_moments(ckpt):
    """Per-parameter Adam second moments and the step of a checkpoint, via the universal
    format (ZeRO-3's converter stores bare tensors where ZeRO 1/2's store {'param': ...})."""
    from fastdeit.checkpoint import CheckpointConfig

    def load(path):
        value = torch.load(path, weights_only=False)
        return value["param"] if isinstance(value, dict) else value

    uni = Checkpointer(CheckpointConfig(), str(ckpt.parent.parent), {}, True)._universal(ckpt) / "zero"
    params = [p for p in uni.iterdir() if p.is_dir()]
    # ZeRO-3's step is in the global optimizer state (what DeepSpeed's stage-3 loader reads)
    state = torch.load(uni / "optimizer_state.pt", weights_only=False)["optimizer_state_dict"]["state"]
    return {p.name: load(p / "exp_avg_sq.pt") for p in params}, int(state[0]["step"])


def test_zero3_reshards_to_one_rank(dataset, teacher, full):
    """Resume the 2-rank ZeRO-3 run on 1 rank (DeepSpeed's universal format): the masters,
    Adam's moments and the EMA carry over."""
    run, _ = full
    out = launch(*args(dataset, teacher, run, 3, "trainer.epochs=3", f"trainer.stop_after_steps={2 * STEPS + 1}"),
                 ranks=1)
    assert "resharded from 2 ranks" in out.stdout
    ckpts = run / "checkpoints"
    before, after = ckpts / f"step_{2 * STEPS:08d}", ckpts / f"step_{2 * STEPS + 1:08d}"
    assert Checkpointer.read_state(after)["world_size"] == 1
    v12, s12 = universal_moments(before)
    v13, s13 = universal_moments(after)
    assert (s12, s13) == (12, 13)
    for k in v12:              # Adam: v13 = b2 v12 + (1 - b2) g^2 >= b2 v12 had the moments survived
        assert v12[k].abs().sum() > 0 and torch.all(v13[k] >= 0.999 * v12[k] * (1 - 1e-3)), k
    # Step 13 is no EMA step (ema.every=3): the 1-rank EMA is the 2-rank one, bit for bit.
    cfg = load_config(run / "config.yaml").ema
    assert ema_lib.update_weight(cfg, 13) is None
    e12, e13 = ema_state_dict(before), ema_state_dict(after)
    assert all(torch.equal(e12[k], e13[k]) for k in e12)
    m12, m13 = fp32_state_dict(before), fp32_state_dict(after)
    assert m12.keys() == m13.keys() and not torch.equal(m12["head.weight"], m13["head.weight"])
    # The masters carried over: step 13 moved each weight by one AdamW step from step 12's, at
    # most lr * (max |m^/sqrt(v^)| + wd |w|); with betas (0.9, 0.999) at step 13 the moment
    # ratio is below 1.2 whatever the gradients (Cauchy-Schwarz over the moments' sums). A
    # fresh start (or the masters of another rank's piece) would be off by the weights' scale.
    cfg13 = load_config(run / "config.yaml")
    lr13 = {r["step"]: r["lr"] for r in records(run, "step")}[13]
    for k in m12:
        moved = (m13[k].double() - m12[k].double()).abs().max().item()
        bound = lr13 * (1.2 + cfg13.optim.weight_decay * m12[k].abs().max().item())
        assert moved <= bound, (k, moved, bound)
