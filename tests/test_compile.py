"""torch.compile in the trainer (model.compile, teacher.compile), in-process on one CPU rank.

The tiny distilled DeiT with hard distillation from a resnet10t teacher, both compiled, the EMA
on: losses against the same run eager, the number of compiled graphs over two epochs with
evaluation (40 val images at batch 32: the last val batch is partial), plain keys in every file
written, exact resume of a compiled run, and resume across compiled and eager.

Inductor on this 2-core CPU takes about a minute for the first compile of these graphs (much
less once torch's on-disk cache holds them), hence few runs, shared by the tests.
"""
import json

import pytest
import torch
from torch._dynamo.utils import counters

from fastdeit import distributed
from fastdeit.build import build_trainer
from fastdeit.checkpoint import EMA_FILE
from fastdeit.config import load_config
from fastdeit.preemption import Stopped
from tests.launching import TINY, records

pytestmark = pytest.mark.slow

STEPS = 12    # 2 epochs x 6 steps of 32 (192 images, one rank)


@pytest.fixture(scope="module")
def world():
    env = distributed.init()
    yield env
    distributed.teardown()


def config(dataset, teacher, run, *overrides):
    return load_config(None, [*TINY, f"data.root={dataset}", f"trainer.run_dir={run}",
                              "model.name=deit_tiny_distilled_patch16_224", "distill.type=hard",
                              "teacher.name=resnet10t", f"teacher.weights={teacher}", "ema.decay=0.9",
                              "trainer.epochs=2", "logging.log_every=1", *overrides])


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def fit(cfg, env):
    """Run a trainer; returns the graph count seen at the start of each epoch and at the end."""
    trainer = build_trainer(cfg, env)
    seen = []
    train_epoch = trainer.train_epoch

    def counted(epoch, start_step=0):
        seen.append(graphs())
        return train_epoch(epoch, start_step)

    trainer.train_epoch = counted
    try:
        trainer.fit()
    finally:
        seen.append(graphs())
    return seen


def losses(run):
    return {r["step"]: r["loss"] for r in records(run, "step")}


COMPILED = ["model.compile=true", "teacher.compile=true"]


@pytest.fixture(scope="module")
def eager(world, dataset, teacher, tmp_path_factory):
    run = tmp_path_factory.mktemp("eager")
    fit(config(dataset, teacher, run, "model.compile=false", "teacher.compile=false"), world)
    return run


@pytest.fixture(scope="module")
def compiled(world, dataset, teacher, tmp_path_factory):
    torch._dynamo.reset()
    counters.clear()
    run = tmp_path_factory.mktemp("compiled")
    seen = fit(config(dataset, teacher, run, *COMPILED), world)
    return run, seen


def test_graph_count_is_bounded(compiled):
    run, seen = compiled
    print("dynamo:", dict(counters["stats"]), "graph breaks:", dict(counters["graph_break"]))
    start, after_first_epoch, end = seen
    assert start == 0
    # Epoch 1 (its steps, the evaluation with the partial last batch, the EMA's evaluation,
    # the checkpoint) compiles everything there is; epoch 2 repeats it all and compiles nothing.
    assert after_first_epoch == end
    # Two graphs: the student's training forward (its backward is compiled from the same
    # graph) and the teacher's forward, neither split by a graph break. Evaluation runs eager.
    assert end == 2 and not counters["graph_break"], (dict(counters["stats"]), dict(counters["graph_break"]))
    assert records(run, "epoch")[-1]["val/images"] == 40


def test_compiled_losses_match_eager(eager, compiled):
    a, b = losses(eager), losses(compiled[0])
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    # bf16 keeps 8 significant bits (0.4%); inductor fuses the ops and so rounds the
    # intermediates differently, and 12 steps of training compound that. The losses
    # (about 0.3 to 1.4 here) stay within 0.01 of each other, far below the change of the
    # loss over those steps.
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-2), (step, a[step], b[step])
    assert abs(a[STEPS] - a[1]) > 0.1
    ea, eb = records(eager, "epoch")[-1], records(compiled[0], "epoch")[-1]
    assert set(ea) == set(eb) and "val/ema_avg_top1" in eb


def test_files_have_plain_keys(compiled):
    run = compiled[0]
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    keys = [*states["module"], *[k for group in states["param_shapes"] for k in group]]
    keys += [*torch.load(ckpt / EMA_FILE, weights_only=True), *torch.load(run / "model.pth", weights_only=True),
             *torch.load(run / "model_ema.pth", weights_only=True)]
    assert keys and "head_dist.weight" in keys
    assert not [k for k in keys if "_orig_mod" in k]


def test_compiled_run_resumes_exactly(world, dataset, teacher, compiled, tmp_path):
    """Stopped mid-epoch and resumed, compiled both times: the same losses and EMA, bitwise."""
    run = tmp_path / "split"
    with pytest.raises(Stopped):
        fit(config(dataset, teacher, run, *COMPILED, "trainer.stop_after_steps=8"), world)
    fit(config(dataset, teacher, run, *COMPILED), world)
    assert losses(run) == losses(compiled[0])
    a = torch.load(run / "checkpoints" / f"step_{STEPS:08d}" / EMA_FILE, weights_only=True)
    b = torch.load(compiled[0] / "checkpoints" / f"step_{STEPS:08d}" / EMA_FILE, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("source,flags", [("compiled", ["model.compile=false", "teacher.compile=false"]),
                                          ("eager", COMPILED)], ids=["compiled-to-eager", "eager-to-compiled"])
def test_resume_across_compile(world, dataset, teacher, eager, compiled, tmp_path, source, flags):
    """A run saved compiled resumes eager and the other way round: the weights load exactly."""
    import shutil

    src = compiled[0] if source == "compiled" else eager
    run = tmp_path / "run"
    shutil.copytree(src, run)
    cfg = config(dataset, teacher, run, *flags, "trainer.epochs=3")
    trainer = build_trainer(cfg, world)
    ckpt = trainer.checkpointer.resume_path()
    state = trainer.checkpointer.load(trainer.engine, ckpt)
    assert (state["epoch"], state["ema"]) == (2, "restored")
    exported = torch.load(src / "model.pth", weights_only=True)
    for name, p in trainer.engine.module.named_parameters():
        assert torch.equal(p.detach(), exported[name].to(p.dtype)), name
    ema = trainer.ema.state_dict()
    for name, v in torch.load(src / "model_ema.pth", weights_only=True).items():
        assert torch.equal(ema[name].cpu(), v), name
    # And it trains on from there through fit() (which resumes by itself).
    fit(cfg, world)
    assert sorted(losses(run)) == list(range(1, STEPS + 7))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer_steps"] == STEPS + 6


def test_size_schedule_compiles_a_graph_per_size_not_per_step(world, dataset, teacher, tmp_path):
    """data.size_schedule with the compiled student and teacher: epoch 1 at 32 px compiles the
    two graphs, epoch 2 at 48 px adds at most one per module (dynamo then marks the side
    dynamic) and its six steps and the evaluation at 48 px add nothing more."""
    torch._dynamo.reset()
    counters.clear()
    run = tmp_path / "sized"
    seen = fit(config(dataset, teacher, run, *COMPILED, "data.img_size=48", "data.size_schedule=[[0,32],[1,48]]"),
               world)
    start, after_first_epoch, end = seen
    assert [r["img_size"] for r in records(run, "epoch")] == [32, 48]
    assert start == 0 and after_first_epoch == 2, dict(counters["stats"])
    assert end <= 4 and not counters["graph_break"], (dict(counters["stats"]), dict(counters["graph_break"]))
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
