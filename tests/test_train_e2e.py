"""The real entry point on 2 CPU ranks over gloo.

One module-scoped dataset and teacher. The first test launches `deepspeed --num_gpus 2
launch/train.py` exactly as a user would (about 15 s of start-up per launch); the others start
their ranks under torchrun (tests/launching.py), and a config mistake needs one rank only.
"""
import json

import pytest
import timm
import torch

from fastdeit.checkpoint import ema_state_dict, fp32_state_dict
from tests.launching import launch, records

pytestmark = pytest.mark.slow


def test_train_eval_checkpoint_resume(dataset, tmp_path):
    run = tmp_path / "run"
    common = [f"data.root={dataset}", f"trainer.run_dir={run}", "model.name=deit_tiny_patch16_224",
              "distill.type=none"]
    first = launch(*common, "trainer.epochs=3", launcher="deepspeed")
    epochs = records(run, "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    steps_per_epoch = 192 // 32
    assert epochs[-1]["step"] == 3 * steps_per_epoch
    losses = [r["train/loss"] for r in epochs]
    assert losses[-1] < losses[0], losses                               # it learns
    assert epochs[-1]["val/images"] == 40                                # each val image once over 2 ranks
    assert epochs[-1]["val/cls_top1"] > 25.0                             # above chance (4 classes)
    assert all(r["lr"] > 0 and r["img_per_sec"] > 0 for r in records(run, "step"))
    assert (run / "config.yaml").is_file() and (run / "model.pth").is_file()
    ckpts = run / "checkpoints"
    best = (ckpts / "best").read_text()
    assert (ckpts / "latest").read_text() == "step_00000018"
    # keep_last=2 plus the best-by-accuracy one
    assert {p.name for p in ckpts.glob("step_*")} == {"step_00000012", "step_00000018", best}
    assert "epoch 3/3 step" in first.stdout                              # plain progress lines

    # Resume: the same run dir with more epochs picks up after epoch 3, steps continue (ranks
    # under torchrun: the launcher does not matter to a resume, and deepspeed's costs 9 s more).
    second = launch(*common, "trainer.epochs=4")
    assert "resumed from" in second.stdout
    epochs = records(run, "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]
    assert epochs[-1]["step"] == 4 * steps_per_epoch
    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer_steps"] == 4 * steps_per_epoch
    # The model card quotes both launches' command lines (rank 0 only: one line each).
    card = (run / "model" / "README.md").read_text()
    assert card.count("launch/train.py") == 2 and "trainer.epochs=4" in card

    # The export is a plain timm state_dict.
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                              num_heads=2, num_classes=4, checkpoint_path=str(run / "model.pth"))
    assert model.head.weight.shape == (4, 64)

    # A checkpoint that does not fit the model is a clear error, not a silent fresh start.
    bad = launch(*common, "trainer.epochs=5", "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
                 check=False)
    assert bad.returncode != 0
    assert "does not fit this model" in bad.stdout + bad.stderr


def test_hard_distillation_from_a_teacher_file(dataset, tmp_path):
    """Compiled student and teacher under ZeRO-2 on two ranks, with the EMA.

    ema.decay=1e-12 makes the EMA the weights themselves (the lerp weight rounds to 1 in fp32),
    which checks the assembly of both ranks' partitions exactly: the EMA in the checkpoint is
    the fp32 masters bit for bit, and its evaluation matches the live model's."""
    teacher = tmp_path / "teacher.pth"
    torch.save(timm.create_model("resnet10t", num_classes=4).state_dict(), teacher)
    run = tmp_path / "student"
    proc = launch(f"data.root={dataset}", f"trainer.run_dir={run}", "trainer.epochs=1",
                  "model.name=deit_tiny_distilled_patch16_224", "distill.type=hard",
                  "teacher.name=resnet10t", f"teacher.weights={teacher}", "engine.zero_stage=2",
                  "model.compile=true", "teacher.compile=true", "ema.decay=1e-12")
    assert "compile default | EMA 1e-12" in proc.stdout
    last = records(run, "epoch")[-1]
    assert {"val/cls_top1", "val/dist_top1", "val/avg_top1"} <= set(last)
    assert "train/loss_dist" in last
    for head in ("cls", "dist", "avg"):
        assert last[f"val/ema_{head}_top1"] == last[f"val/{head}_top1"], head
    assert "ema_avg_top1" in proc.stdout                                   # the epoch line
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    ema, masters = ema_state_dict(latest), fp32_state_dict(latest)
    assert ema.keys() == masters.keys() and all(torch.equal(ema[k], masters[k]) for k in ema)


def test_bad_config_fails_before_training(dataset, tmp_path):
    proc = launch(f"data.root={dataset}", f"trainer.run_dir={tmp_path}", "optim.lrr=1", check=False, ranks=1)
    assert proc.returncode != 0
    assert "unknown key 'optim.lrr'" in proc.stdout + proc.stderr
