"""Fine-tuning through the trainer: a distilled 3-class checkpoint (DeiT main.py's layout) into a
plain 4-class student, with layer-wise LR decay and LAMB under ZeRO 1, one epoch in process on
one rank. The run's log says what was loaded and re-initialised; the backbone starts as the
checkpoint's; every parameter group's LR is the schedule's times its lr_scale; the logged LR is
the head's (full) one.
"""
import pytest
import torch

from fastdeit import distributed
from fastdeit.build import build_trainer
from fastdeit.config import load_config
from fastdeit.models import ModelConfig, build_student
from tests.launching import TINY, records

KWARGS = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}      # TINY's model


def test_finetune_run(dataset, tmp_path, capsys):
    torch.manual_seed(7)
    pretrained = build_student(ModelConfig(name="deit_tiny_distilled_patch16_224", kwargs=KWARGS), 32, 3).state_dict()
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": pretrained, "epoch": 299}, ckpt)
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY, f"data.root={dataset}", f"trainer.run_dir={run}", "trainer.epochs=1",
                             "model.name=deit_tiny_patch16_224", "distill.type=none", f"model.init_weights={ckpt}",
                             "optim.name=lamb", "optim.layer_decay=0.5", "engine.gradient_clipping=0.0",
                             "model.compile=false", "checkpoint.export=false", "engine.precision=fp32"])
    env = distributed.init()
    try:
        trainer = build_trainer(cfg, env)
        start = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
        trainer.fit()
    finally:
        distributed.teardown()
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("model.init_weights"))
    assert line == (f"model.init_weights for deit_tiny_patch16_224 (4 classes): {len(start) - 2} tensors loaded "
                    f"from {ckpt}; not loaded (fresh init): head.bias, head.weight; dropped from the file: "
                    "dist_token, head_dist.weight, head_dist.bias, pos_embed[:, 1] (the distillation token's "
                    "slot), head.bias (3,) (model (4,)), head.weight (3, 64) (model (4, 64))")
    for k, v in start.items():
        if k == "pos_embed":
            torch.testing.assert_close(v, torch.cat([pretrained[k][:, :1], pretrained[k][:, 2:]], 1))
        elif not k.startswith("head."):
            torch.testing.assert_close(v, pretrained[k], rtol=0, atol=0, msg=k)

    groups = trainer.engine.optimizer.param_groups
    assert sorted({g["lr_scale"] for g in groups}) == [0.5 ** 3, 0.5 ** 2, 0.5, 1.0]     # L=2: embed, 2 blocks, head
    head_lr = groups[0]["lr"]
    assert groups[0]["lr_scale"] == 1.0 and head_lr > 0
    for g in groups:
        assert g["lr"] == pytest.approx(head_lr * g["lr_scale"], rel=1e-12)
    assert records(run, "step")[-1]["lr"] == pytest.approx(head_lr)        # the logged LR: the head's
    assert records(run, "epoch")[-1]["val/images"] == 40
