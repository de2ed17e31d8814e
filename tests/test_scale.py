"""Running at scale: preemption by signal, exact resume, crash-safe saves, resharding, export,
evaluation, 384 fine-tuning, divergence. Each test drives the real entry points."""
import json
import math
import signal
import subprocess
import sys
import time

import psutil
import pytest
import timm
import torch
import torch.nn.functional as F

from fastdeit.checkpoint import Checkpointer, ema_state_dict, fp32_state_dict
from fastdeit.models import ModelConfig, build_student
from fastdeit.preemption import PREEMPTED_EXIT_CODE
from fastdeit.trainer import NonFiniteLossError
from tests.launching import ROOT, TINY, command, env, launch, records, train_in_process

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 6   # 4 classes x 48 images / global batch 32


def base(dataset, run):
    # Mixing and erasing on: resume must restore numpy's and Python's RNG streams too.
    return [f"data.root={dataset}", f"trainer.run_dir={run}", "model.name=deit_tiny_distilled_patch16_224",
            "distill.type=soft", "teacher.name=resnet10t", "mixing.prob=1.0", "mixing.erase_prob=0.5",
            "model.drop_path=0.1", "logging.log_every=1"]


def step_losses(run):
    return {r["step"]: (r["loss"], r["lr"]) for r in records(run, "step")}


# With the EMA, its warmup and every=3: the epoch-boundary stop (6) lands on an update, the
# mid-epoch one (8) between two.
RESUME_ARGS = ["trainer.epochs=2", "trainer.eval_every=2", "ema.decay=0.9", "ema.every=3", "ema.warmup=true"]


@pytest.fixture(scope="module")
def uninterrupted(dataset, teacher, tmp_path_factory):
    """The reference run both exact-resume cases compare against."""
    run = tmp_path_factory.mktemp("uninterrupted")
    launch(*base(dataset, run), f"teacher.weights={teacher}", *RESUME_ARGS)
    return run


@pytest.mark.parametrize("stop_at", [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 2], ids=["epoch-boundary", "mid-epoch"])
def test_exact_resume(dataset, teacher, uninterrupted, tmp_path, stop_at):
    """Stopped at step k and resumed == uninterrupted: same losses and LRs, bit for bit on CPU."""
    split = tmp_path / "split"
    t = [f"teacher.weights={teacher}", *RESUME_ARGS]
    stopped = launch(*base(dataset, split), *t, f"trainer.stop_after_steps={stop_at}")
    assert "stopping after optimizer step" in stopped.stdout
    state = Checkpointer.read_state(split / "checkpoints" / f"step_{stop_at:08d}")
    assert (state["epoch"], state["epoch_step"]) == divmod(stop_at, STEPS_PER_EPOCH)
    resumed = launch(*base(dataset, split), *t)
    assert "resumed from" in resumed.stdout
    a, b = step_losses(uninterrupted), step_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert a == b                                            # exact, not approximately
    va, vb = records(uninterrupted, "epoch")[-1], records(split, "epoch")[-1]
    assert va["val/avg_top1"] == vb["val/avg_top1"]
    assert va["val/ema_avg_top1"] == vb["val/ema_avg_top1"]
    # The EMA, assembled from both ranks' partitions, bit for bit.
    last = f"step_{2 * STEPS_PER_EPOCH:08d}"
    ea = ema_state_dict(uninterrupted / "checkpoints" / last)
    eb = ema_state_dict(split / "checkpoints" / last)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_preemption_by_signal_then_auto_resume(dataset, tmp_path):
    run = tmp_path / "run"
    args = [*TINY, f"data.root={dataset}", f"trainer.run_dir={run}", "model.name=deit_tiny_patch16_224",
            "distill.type=none", "logging.log_every=1", "trainer.epochs=40"]
    proc = subprocess.Popen(command("train.py", *args, launcher="deepspeed"), cwd=ROOT, env=env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run / "log.jsonl").is_file():
            time.sleep(0.5)
        while time.time() < deadline and len(records(run, "step")) < 3:
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "--local_rank" in " ".join(p.cmdline())]
        assert len(ranks) == 2
        ranks[-1].send_signal(signal.SIGUSR2)                 # one rank only: the others must agree
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert "SIGUSR2" in out or "signal on another rank" in out
    ckpt = Checkpointer(None, str(run), {}, True).latest()
    state = Checkpointer.read_state(ckpt)
    stopped_at = state["step"]
    assert stopped_at < 40 * STEPS_PER_EPOCH
    # requeued: the same command resumes by itself (here shortened to finish quickly)
    end = (stopped_at // STEPS_PER_EPOCH + 1)
    again = launch(*args[len(TINY):], f"trainer.epochs={end}")
    assert f"resumed from {ckpt}" in again.stdout
    steps = [r["step"] for r in records(run, "step")]
    assert steps == list(range(1, end * STEPS_PER_EPOCH + 1))     # no step lost, none repeated


CRASH_DRIVER = """
import os, sys, torch
sys.argv = ["train.py", *{args!r}]
real_save = torch.save
def dying_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    if ".partial" in str(f) and "step_00000012" in str(f):
        os._exit(9)                       # killed midway through the second checkpoint
torch.save = dying_save
sys.path.insert(0, {root!r})
import runpy
runpy.run_path({root!r} + "/launch/train.py", run_name="__main__")
"""


def test_kill_during_save_keeps_previous_checkpoint(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    args = [*TINY, f"data.root={dataset}", f"trainer.run_dir={run}", "model.name=deit_tiny_patch16_224",
            "distill.type=none", "trainer.epochs=3"]
    driver = CRASH_DRIVER.format(args=args, root=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert (ckpts / "step_00000012.partial").is_dir()                 # the torn one, never "latest"
    capsys.readouterr()
    train_in_process(*args[len(TINY):])                                # the rerun, in this process
    again = capsys.readouterr().out
    assert "resumed from" in again and "step_00000006" in again
    assert (ckpts / "latest").read_text() == "step_00000018"
    assert not list(ckpts.glob("*.partial"))


def universal_moments(ckpt):
    """Per-parameter Adam second moments and step of a checkpoint, via the universal format."""
    from fastdeit.checkpoint import CheckpointConfig

    uni = Checkpointer(CheckpointConfig(), str(ckpt.parent.parent), {}, True)._universal(ckpt) / "zero"
    params = [p for p in uni.iterdir() if p.is_dir()]
    v = {p.name: torch.load(p / "exp_avg_sq.pt", weights_only=False)["param"] for p in params}
    step = torch.load(params[0] / "step.pt", weights_only=False)
    return v, int(step["param"] if isinstance(step, dict) else step)


def test_resume_on_fewer_ranks_keeps_optimizer_state(dataset, tmp_path):
    run = tmp_path / "run"
    common = [f"data.root={dataset}", f"trainer.run_dir={run}", "model.name=deit_tiny_patch16_224",
              "distill.type=none", "engine.zero_stage=1", "trainer.eval_every=0", "ema.decay=0.9"]
    launch(*common, "trainer.epochs=1", ranks=2)
    # Resume on one rank (re-sharded via DeepSpeed's universal format), one step, stop.
    out = launch(*common, "trainer.epochs=2", "trainer.stop_after_steps=7", ranks=1)
    assert "resharded from 2 ranks" in out.stdout
    ckpts = run / "checkpoints"
    assert Checkpointer.read_state(ckpts / "step_00000007")["world_size"] == 1
    v6, s6 = universal_moments(ckpts / "step_00000006")
    v7, s7 = universal_moments(ckpts / "step_00000007")
    assert (s6, s7) == (6, 7)
    # Adam: v7 = b2 * v6 + (1 - b2) * g^2 >= b2 * v6, element by element. Had the 2-rank
    # moments been dropped, v7 would be (1 - b2) * g^2 alone, far below b2 * v6.
    assert v6.keys() == v7.keys() and all(v6[k].abs().sum() > 0 for k in v6)
    for k in v6:
        assert torch.all(v7[k] >= 0.999 * v6[k] * (1 - 1e-3)), k
    # The EMA carried over too: step 7's, made on one rank, is step 6's (two ranks' partitions)
    # moved a tenth of the way to step 7's fp32 masters.
    e6, e7 = ema_state_dict(ckpts / "step_00000006"), ema_state_dict(ckpts / "step_00000007")
    m6, m7 = fp32_state_dict(ckpts / "step_00000006"), fp32_state_dict(ckpts / "step_00000007")
    assert e6.keys() == m7.keys()
    for k in e6:
        assert not torch.equal(e6[k], m6[k]), k                       # a real average, not the weights
        torch.testing.assert_close(e7[k].double(), 0.9 * e6[k].double() + 0.1 * m7[k].double(),
                                   rtol=1e-6, atol=1e-7)


def test_export_eval_and_finetune(dataset, teacher, uninterrupted, tmp_path):
    # The exact-resume tests' reference run (distilled, with an EMA, evaluated at its end): read
    # here, never written to except eval.py's eval_ema.json beside it.
    run = uninterrupted
    # The model card the run ended with names the launch that trained it (train.py's own
    # command line, recorded by rank 0 as it started).
    card = (run / "model" / "README.md").read_text()
    command = card.split("## Command", 1)[1]
    assert "launch/train.py" in command and f"trainer.run_dir={run}" in command, command
    out = tmp_path / "exported.pth"
    launch(str(run), "--out", str(out), script="export.py", tiny=False, ranks=1)
    recipe = json.loads(out.with_name("exported.pth.json").read_text())
    model = timm.create_model(recipe["name"], num_classes=4, img_size=32, checkpoint_path=str(out), **recipe["kwargs"])

    # The EMA: export --ema loads in timm and holds the checkpoint's EMA; eval.py --ema on two
    # ranks in bf16 reproduces the trainer's own val/ema_* numbers exactly.
    ema_out = tmp_path / "ema.pth"
    launch(str(run), "--ema", "--out", str(ema_out), script="export.py", tiny=False, ranks=1)
    assert json.loads(ema_out.with_name("ema.pth.json").read_text())["ema"] is True
    ema_model = timm.create_model(recipe["name"], num_classes=4, img_size=32, checkpoint_path=str(ema_out),
                                  **recipe["kwargs"])
    saved = ema_state_dict(run / "checkpoints" / (run / "checkpoints" / "latest").read_text())
    assert all(torch.equal(v, saved[k]) for k, v in ema_model.state_dict().items())
    assert not torch.equal(ema_model.head.weight, model.head.weight)
    assert torch.equal(torch.load(run / "model_ema.pth", weights_only=True)["head.weight"], saved["head.weight"])
    launch(str(run), "--ema", "--batch", "16", "--dtype", "bf16", script="eval.py", tiny=False)
    ema_eval = json.loads((run / "eval_ema.json").read_text())
    trained = records(run, "epoch")[-1]
    for head in ("cls", "dist", "avg"):
        for k in ("top1", "top5"):
            assert ema_eval[f"val/{head}_{k}"] == trained[f"val/ema_{head}_{k}"], (head, k)

    # eval.py on 2 ranks against a hand count over the same preprocessed val images (1 rank).
    result_file = tmp_path / "eval.json"
    launch(str(run), "--weights", str(out), "--out", str(result_file), script="eval.py", tiny=False)
    result = json.loads(result_file.read_text())
    from fastdeit.config import load_config
    from fastdeit.data import build_loader

    loader = build_loader(load_config(run / "config.yaml").data, "val", 8, 0, 1, 0, torch.device("cpu"))
    model.eval()
    hits = {h: [0, 0] for h in ("cls", "dist", "avg")}
    n = 0
    with torch.no_grad():
        for images, labels in loader:
            tokens = model.forward_features(images)
            logits = {"cls": model.head(tokens[:, 0]), "dist": model.head_dist(tokens[:, 1])}
            logits["avg"] = model(images)                     # timm's own eval output
            for head, z in logits.items():
                for row, y in zip(z.tolist(), labels.tolist()):
                    order = sorted(range(4), key=lambda c: -row[c])
                    hits[head][0] += order[0] == y
                    hits[head][1] += y in order[:5]
            n += len(labels)
    assert result["val/images"] == n == 40 and result["world_size"] == 2
    for head, (top1, top5) in hits.items():
        assert result[f"val/{head}_top1"] == pytest.approx(100 * top1 / n)
        assert result[f"val/{head}_top5"] == pytest.approx(100 * top5 / n)

    # Fine-tune at 48 px (6x6 patches) from the 32 px (4x4) export through the entry point.
    ft = tmp_path / "ft"
    launch(*base(dataset, ft), f"teacher.weights={teacher}", "trainer.epochs=1", "data.img_size=48",
           f"model.init_weights={out}", "optim.weight_decay=1e-8")
    assert records(ft, "epoch")[-1]["val/images"] == 40


def test_pos_embed_resampled_for_finetuning(tmp_path):
    kwargs = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    small = build_student(ModelConfig(name="deit_tiny_distilled_patch16_224", kwargs=kwargs), 32, 5)
    path = tmp_path / "w.pth"
    torch.save(small.state_dict(), path)
    big = build_student(ModelConfig(name="deit_tiny_distilled_patch16_224", kwargs=kwargs, init_weights=str(path)), 48, 5)
    old, new = small.pos_embed.detach(), big.pos_embed.detach()          # [1, 2+16, C], [1, 2+36, C]
    assert new.shape == (1, 2 + 36, 32)
    torch.testing.assert_close(new[:, :2], old[:, :2])                    # cls and dist slots kept
    grid = old[:, 2:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)  # the DeiT reference's call
    torch.testing.assert_close(new[:, 2:], ref.permute(0, 2, 3, 1).reshape(1, 36, 32))
    torch.testing.assert_close(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)


def test_divergence_names_the_step_and_keeps_the_checkpoint(dataset, tmp_path):
    """One rank, in this process (the ranks' agreement on a stop is tested above): a diverging
    resumed run names the step, saves nothing, and the good checkpoint still resumes."""
    run = tmp_path / "run"
    common = [f"data.root={dataset}", f"trainer.run_dir={run}", "model.name=deit_tiny_patch16_224",
              "distill.type=none", "logging.log_every=3", "checkpoint.export=false"]
    train_in_process(*common, "trainer.epochs=1")
    with pytest.raises(NonFiniteLossError, match="the loss became non-finite at optimizer step") as bad:
        train_in_process(*common, "trainer.epochs=3", "optim.lr=1e30")
    step = int(str(bad.value).split("non-finite at optimizer step ")[1].split(";")[0])
    assert step >= STEPS_PER_EPOCH and not math.isnan(step)
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert train_in_process(*common, "trainer.epochs=2")["optimizer_steps"] == 2 * STEPS_PER_EPOCH
    assert [r["epoch"] for r in records(run, "epoch")] == [0, 1]        # resumed: epoch 0 not trained again


def test_fresh_run_refuses_an_occupied_run_dir(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00000006").mkdir(parents=True)
    (ckpts / "latest").write_text("step_00000006")
    from fastdeit.checkpoint import CheckpointConfig

    with pytest.raises(FileExistsError, match="already holds a run"):
        Checkpointer(CheckpointConfig(resume=None), str(tmp_path), {}, True).resume_path()
    assert Checkpointer(CheckpointConfig(resume="auto"), str(tmp_path), {}, True).resume_path() == ckpts / "step_00000006"
