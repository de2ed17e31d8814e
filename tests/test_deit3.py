"""The DeiT III recipe configs (README_revenge.md commands), and the recipe's pieces together
through the real entry point: 3-Augment, BCE, LAMB under ZeRO, a resolution schedule, hard
distillation; a run resumed across a size change equals the uninterrupted one."""
import pytest
import timm
import torch

from fastdeit.checkpoint import Checkpointer, fp32_state_dict
from fastdeit.config import load_config
from fastdeit.data.loading.schedule import size_schedule
from fastdeit.models import build_student, count_params, size_multiple
from fastdeit.optim import scaled_lr
from fastdeit.preemption import Stopped


@pytest.mark.parametrize("path, model, lr, size, drop_path, params", [
    ("configs/deit3_s.yaml", "deit3_small_patch16_224", 4e-3, 224, 0.05, 22_059_496),
    ("configs/deit3_b.yaml", "deit3_base_patch16_224", 3e-3, 192, 0.2, 86_585_320),
])
def test_deit3_configs_carry_the_reference_values(path, model, lr, size, drop_path, params):
    c = load_config(path)
    assert c.model.name == model and c.model.kwargs == {"init_values": 1e-4}
    assert (c.model.drop_path, c.model.drop_path_mode, c.model.drop) == (drop_path, "uniform", 0.0)
    assert c.engine.global_batch_size == 2048 and scaled_lr(c.optim, 2048) == lr        # --unscale-lr
    assert (c.optim.name, c.optim.weight_decay, c.optim.eps, c.optim.lamb_max_grad_norm) == ("lamb", 0.05, 1e-8, 1.0)
    assert c.engine.gradient_clipping == 0.0                                 # LAMB clips at 1.0 itself (no host syncs)
    assert (c.schedule.warmup_epochs, c.schedule.warmup_lr, c.schedule.min_lr, c.trainer.epochs) == (5, 1e-6, 1e-5, 800)
    assert (c.loss.base, c.loss.bce_target_threshold, c.mixing.label_smoothing) == ("bce", 0.0, 0.0)
    assert (c.mixing.mixup_alpha, c.mixing.cutmix_alpha, c.mixing.prob, c.mixing.erase_prob) == (0.8, 1.0, 1.0, 0.0)
    assert (c.data.rand_augment, c.data.three_augment, c.data.color_jitter) == (None, True, 0.3)
    assert (c.data.scale, c.data.hflip, c.data.repeated_aug, c.distill.type) == ((0.08, 1.0), 0.5, 3, "none")
    # every README_revenge.md command passes --eval-crop-ratio 1.0: resize to 224, no crop
    assert c.data.img_size == 224 and c.data.eval_crop_pct == 1.0 and int(224 / c.data.eval_crop_pct) == 224
    assert c.ema.decay == 0.0        # the reference's EMA is never evaluated (docs/DESIGN.md)
    student = build_student(c.model, c.data.img_size, 1000, dynamic_img_size=c.data.size_schedule is not None)
    assert count_params(student) == params
    sizes = size_schedule(c.data, size_multiple(student))
    assert {sizes(e) for e in range(800)} == {size}


def test_deit3_b_finetune_is_the_reference_command():
    c = load_config("configs/deit3_b_finetune.yaml")
    assert (c.trainer.epochs, c.engine.global_batch_size, scaled_lr(c.optim, 512)) == (20, 512, 1e-5)
    assert (c.optim.name, c.optim.weight_decay, c.loss.base, c.mixing.label_smoothing) == ("adamw", 0.1, "ce", 0.1)
    assert (c.data.rand_augment, c.data.three_augment, c.data.repeated_aug, c.data.size_schedule) == \
        ("rand-m9-mstd0.5-inc1", False, 1, None)
    assert (c.data.eval_crop_pct, c.ema.decay) == (1.0, 0.0)     # --eval-crop-ratio 1.0; no EMA


@pytest.mark.parametrize("path, timm_name, drop_path, size, multiple, params, readme_m", [
    ("configs/deit3_l.yaml", "deit3_large_patch16_224", 0.45, 192, 32, 304_374_760, 304.4),
    ("configs/deit3_h.yaml", "deit3_huge_patch14_224", 0.6, 154, 14, 632_126_440, 632.1),
])
def test_deit3_large_and_huge_configs(path, timm_name, drop_path, size, multiple, params, readme_m):
    """README_revenge.md's ViT-L / ViT-H commands: --batch 64 x 4 nodes x 8 GPUs, --lr 3e-3
    --unscale-lr, 800 epochs, --input-size 192 / 160, --drop-path 0.45 / 0.6, --eval-crop-ratio
    1.0, the LAMB + BCE + 3-Augment recipe. Parameters counted on the meta device (no memory)
    against timm's own model and the README's model-zoo column."""
    c = load_config(path)
    assert c.model.name == timm_name and c.model.kwargs == {"init_values": 1e-4}
    assert (c.model.drop_path, c.model.drop_path_mode, c.model.drop) == (drop_path, "uniform", 0.0)
    assert c.engine.global_batch_size == 64 * 4 * 8 and scaled_lr(c.optim, 2048) == 3e-3
    assert (c.optim.name, c.optim.weight_decay, c.optim.eps, c.optim.lamb_max_grad_norm) == ("lamb", 0.05, 1e-8, 1.0)
    assert (c.schedule.warmup_epochs, c.schedule.warmup_lr, c.schedule.min_lr, c.trainer.epochs) == (5, 1e-6, 1e-5, 800)
    assert (c.loss.base, c.mixing.label_smoothing, c.mixing.erase_prob) == ("bce", 0.0, 0.0)
    assert (c.mixing.mixup_alpha, c.mixing.cutmix_alpha, c.data.three_augment, c.data.color_jitter) == (0.8, 1.0, True, 0.3)
    assert (c.data.repeated_aug, c.data.eval_crop_pct, c.data.img_size) == (3, 1.0, 224)
    with torch.device("meta"):
        student = build_student(c.model, c.data.img_size, 1000, dynamic_img_size=True)
        reference = timm.create_model(timm_name, init_values=1e-4)
    assert count_params(student) == count_params(reference) == params
    assert round(params / 1e6, 1) == readme_m
    sizes = size_schedule(c.data, size_multiple(student))
    assert {sizes(e) for e in range(800)} == {size} and size % multiple == 0
    # 160 px with 14 px patches: the reference's stride-14 convolution makes 11 x 11 patches,
    # as 154 px does.
    assert size // student.patch_embed.patch_size[0] == (192 if multiple == 32 else 160) // student.patch_embed.patch_size[0]


def test_deit3_l_finetune_is_the_reference_command():
    c = load_config("configs/deit3_l_finetune.yaml")
    assert c.model.name == "deit3_large_patch16_224" and c.model.drop_path == 0.45
    assert (c.trainer.epochs, c.engine.global_batch_size, scaled_lr(c.optim, 512)) == (20, 512, 1e-5)
    assert (c.optim.name, c.optim.weight_decay, c.loss.base, c.mixing.label_smoothing) == ("adamw", 0.1, "ce", 0.1)
    assert (c.data.rand_augment, c.data.three_augment, c.data.repeated_aug, c.data.size_schedule) == \
        ("rand-m9-mstd0.5-inc1", False, 1, None)
    assert (c.data.img_size, c.data.eval_crop_pct) == (224, 1.0)


@pytest.mark.parametrize("path", ["configs/deit3_l.yaml", "configs/deit3_l_finetune.yaml", "configs/deit3_h.yaml"])
def test_deit3_memory_settings_are_the_plans(path):
    """The configs' ZeRO stage, checkpointing and micro batch are what benchmarks/memplan.py
    chooses for 8 x 80 GB, and the same for 8 x 141 GB (the headers say both)."""
    from benchmarks import memplan

    c = load_config(path)
    facts = memplan.model_facts(c)
    for gib in (80, 141):
        rows = memplan.plan(c, facts, gib * 2**30, 8)
        best = memplan.choose(rows, c.engine.global_batch_size // 8)
        assert (best.stage, best.checkpointing, best.micro) == \
            (c.engine.zero_stage, c.model.grad_checkpointing, c.engine.micro_batch_size), gib
        assert f"{best.at(best.micro) / 2**30:.1f} GiB" in open(path).read()


# --------------------------------------------------------------------------- end to end (slow)

STEPS = 6        # 4 classes x 48 images / global batch 32


def recipe(dataset, run):
    """configs/deit3_s.yaml at toy size (overrides to it): 3-Augment, BCE, LAMB under ZeRO-1, and
    a schedule that trains epoch 0 at 32 px and epoch 1 at 48 px (the native and evaluation size).
    One rank, in this process (tests.launching.train_in_process): the rank count is not what
    these tests are about (tests/test_scale.py resumes two ranks exactly)."""
    return [f"data.root={dataset}", f"trainer.run_dir={run}",
            "data.img_size=48", "data.size_schedule=[[0,32],[1,48]]", "data.repeated_aug=1", "data.num_threads=1",
            "data.scale=[0.35,1.0]", "model.kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2, init_values: 1.0e-4}",
            "engine.global_batch_size=32", "optim.lr_base_batch=32", "schedule.warmup_epochs=0.5",
            "trainer.epochs=2", "trainer.eval_every=2", "logging.log_every=1", "logging.progress=lines"]


def train(*overrides):
    from tests.launching import train_in_process

    return train_in_process(*overrides, tiny=False, config="configs/deit3_s.yaml")


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("deit3-full")
    train(*recipe(dataset, run))
    return run


@pytest.mark.slow
def test_resume_across_a_size_change_is_exact(dataset, uninterrupted, tmp_path, capsys):
    """Stopped mid-epoch at 32 px, resumed: the rest of epoch 0 at 32 px and epoch 1 at 48 px
    give the uninterrupted run's losses and LRs bit for bit; the checkpoints keep the native
    6x6 position grid (48 px, patch 8) whatever the training size."""
    from tests.launching import records

    epochs = records(uninterrupted, "epoch")
    assert [(r["epoch"], r["img_size"]) for r in epochs] == [(0, 32), (1, 48)]
    assert epochs[-1]["val/cls_top1"] >= 0 and "train/loss" in epochs[-1]
    split = tmp_path / "split"
    capsys.readouterr()
    with pytest.raises(Stopped):
        train(*recipe(dataset, split), "trainer.stop_after_steps=3")
    stopped = capsys.readouterr().out
    assert "stopping after optimizer step 3" in stopped
    assert "training resolution: 32 px (epoch 1), 48 px (epoch 2)" in stopped
    ckpt = split / "checkpoints" / "step_00000003"
    assert (Checkpointer.read_state(ckpt)["epoch"], Checkpointer.read_state(ckpt)["epoch_step"]) == (0, 3)
    # written during the 32 px epoch: the position embedding at the native 48 px grid
    # (6 x 6 patches of 8; DeiT III has no class slot in it)
    assert fp32_state_dict(ckpt)["pos_embed"].shape == (1, 36, 64)
    train(*recipe(dataset, split))
    assert "resumed from" in capsys.readouterr().out
    full = {r["step"]: (r["loss"], r["lr"]) for r in records(uninterrupted, "step")}
    again = {r["step"]: (r["loss"], r["lr"]) for r in records(split, "step")}
    assert sorted(full) == sorted(again) == list(range(1, 2 * STEPS + 1))
    assert full == again
    assert fp32_state_dict(split / "checkpoints" / "step_00000012")["pos_embed"].shape == (1, 36, 64)
    export = torch.load(split / "model.pth", weights_only=True)
    assert export["pos_embed"].shape == (1, 36, 64)


@pytest.mark.slow
def test_recipe_composes_with_hard_distillation(dataset, tmp_path):
    """3-Augment + BCE + LAMB + a schedule with a distilled student and a convnet teacher."""
    import timm

    from tests.launching import records

    teacher = tmp_path / "teacher.pth"
    torch.save(timm.create_model("resnet10t", num_classes=4).state_dict(), teacher)
    run = tmp_path / "run"
    train(*recipe(dataset, run), "model.name=deit_tiny_distilled_patch16_224", "model.drop_path_mode=linear",
          "model.kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}", "distill.type=hard",
          "teacher.name=resnet10t", f"teacher.weights={teacher}", "trainer.epochs=2")
    last = records(run, "epoch")[-1]
    assert last["img_size"] == 48 and {"val/cls_top1", "val/dist_top1", "val/avg_top1"} <= set(last)
    assert torch.isfinite(torch.tensor([last["train/loss"], last["train/loss_dist"]])).all()
