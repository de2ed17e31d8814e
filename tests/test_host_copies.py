"""No blocking host-to-device copy per batch (after the first) in the loader, the mixer and the
trainer's step, with the `meta` device standing in for CUDA (tests/copyspy.py says why and how).

A blocking copy stalls the host every batch, so it can no longer queue work ahead of the GPU,
and when it sits in next(loader) the data-wait telemetry blames the data path for GPU compute.
The first batch may copy: it makes the device constants (normalisation, fill colour) once.
On meta, any read of a device value on the host raises, so these runs also show that the hot
path has no device-to-host sync. The GPU-marked test at the end checks the same on CUDA with
torch's sync debug mode.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from tests.childenv import child_env
from tests.copyspy import CopySpy
from fastdeit.data import DataConfig, build_loader
from fastdeit.data.augment.mixing import BatchMixer, MixingConfig

META = torch.device("meta")
ROOT = Path(__file__).resolve().parents[1]


def _cfg(root, **kw):
    base = dict(root=root, img_size=32, num_threads=1, host_threads=1, device="cpu",
                rand_augment="rand-m9-mstd0.5-inc1", repeated_aug=1)
    base.update(kw)
    return DataConfig(**base)


def _after_first(per_batch):
    """Blocking copies of every batch after the first, with where they came from."""
    return [[f"{c.what} at {c.where}" for c in CopySpy.blocking(b)] for b in per_batch[1:]]


def test_loader_augment_copies_nothing_blocking(flat_tree):
    """TrainLoader._augment (RandAugment on, then normalisation) on a batch large enough that every
    op kind is drawn: the plan travels from pinned memory, the constants are on the device."""
    loader = build_loader(_cfg(flat_tree[0]), "train", 4, 0, 1, 0, META)
    kinds = set()
    per_batch = []
    with CopySpy() as spy:
        for step in range(4):
            images = torch.empty(256, 3, 32, 32, dtype=torch.uint8, device=META,
                                 memory_format=torch.channels_last)
            out = loader._augment(images, 0, step)
            per_batch.append(spy.take())
            assert out.device == META and out.dtype == torch.float32
            assert out.shape == (256, 3, 32, 32)
            gen = torch.Generator().manual_seed(0)
            kinds |= {k for slot in loader.randaug.sample(256, 32, 32, gen).groups for k, _, _ in slot}
    loader.close()
    assert kinds == {"affine", "shift_x", "shift_y", "autocontrast", "equalize", "invert",
                     "posterize", "solarize", "solarize_add", "color", "contrast", "brightness",
                     "sharpness"}
    assert _after_first(per_batch) == [[]] * 3


def test_loader_batches_from_cpu_pipeline_copy_nothing_blocking(flat_tree):
    """data.device=cpu feeding a device: the uint8 batch and its labels are produced in pinned
    memory by the loader's threads and copied without blocking; augment follows on the device."""
    loader = build_loader(_cfg(flat_tree[0]), "train", 4, 0, 1, 0, META)
    per_batch = []
    with CopySpy() as spy:
        loader.set_epoch(0)
        for images, labels in loader:
            per_batch.append(spy.take())
            assert images.device == META and labels.device == META
            assert images.is_contiguous(memory_format=torch.channels_last)
        loader.close()
    assert len(per_batch) == 6
    assert _after_first(per_batch) == [[]] * 5
    # the batches did travel: images, labels and the RandAugment plan, each batch
    assert all(len(b) >= 3 for b in per_batch)


def test_mixer_copies_nothing_blocking():
    """Random erasing (boxes drawn on the host) then Mixup and CutMix, both taken."""
    torch.manual_seed(0)
    np.random.seed(0)
    mixer = BatchMixer(MixingConfig(erase_prob=0.5, erase_count=2), 10, META, torch.bfloat16)
    used = []
    original = mixer.mixup._params_per_batch

    def params():
        lam, cutmix = original()
        used.append((lam != 1.0, cutmix))
        return lam, cutmix

    mixer.mixup._params_per_batch = params
    per_batch = []
    with CopySpy() as spy:
        for _ in range(8):
            images = torch.empty(64, 3, 32, 32, device=META, memory_format=torch.channels_last)
            labels = torch.empty(64, dtype=torch.int64, device=META)
            out, targets = mixer(images, labels)
            per_batch.append(spy.take())
            assert out.dtype == torch.bfloat16 and targets.shape == (64, 10)
    assert (True, True) in used and (True, False) in used     # cutmix and mixup both ran
    assert _after_first(per_batch) == [[]] * 7


class _FakeEngine:
    """DeepSpeed cannot run on the meta device: this stand-in runs the real student's forward
    and backward and counts optimizer steps; DeepSpeed's own step is covered on CUDA by the
    GPU test below. step() closes each step's window of recorded copies."""

    def __init__(self, module, spy, per_step):
        self.module, self.spy, self.per_step = module, spy, per_step
        self.global_steps = 0

    def gradient_accumulation_steps(self):
        return 1

    def train(self):
        self.module.train()

    def __call__(self, images):
        return self.module(images)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.module.zero_grad(set_to_none=True)
        self.global_steps += 1
        self.per_step.append(self.spy.take())

    def get_lr(self):
        return [0.0]


class _Schedule:
    def step_update(self, step):
        pass


def _meta_models():
    """A distilled student and a frozen channels-last teacher on meta, at 32 px, 4 classes."""
    from fastdeit.models import FrozenTeacher, ModelConfig, build_student

    student = build_student(ModelConfig("deit_tiny_distilled_patch16_224", kwargs=dict(
        patch_size=8, embed_dim=32, depth=1, num_heads=2)), 32, 4).to(META)
    teacher = FrozenTeacher(timm.create_model("resnet10t", num_classes=4).to(META),
                            torch.float32, channels_last=True)
    return student, teacher


def _meta_epoch(tmp_path, loader, engine, mixing, teacher, ema=None):
    """One Trainer.train_epoch over ``loader`` on meta with hard distillation; the logging step
    (allowed to sync, and unable to read values on meta) is replaced by a record of the meters
    it would have read. Returns that record."""
    from fastdeit.losses import DeiTLoss, DistillConfig
    from fastdeit.metrics import LoggingConfig, RunLogger, StepTelemetry
    from fastdeit.trainer import RunServices, StepParts, Trainer, TrainerConfig

    logged = []
    parts = StepParts(engine=engine, scheduler=_Schedule(), mixer=BatchMixer(mixing, 4, META, torch.float32),
                      criterion=DeiTLoss(DistillConfig("hard")), teacher=teacher, ema=ema, dtype=torch.float32)
    run = RunServices(train_loader=loader, val_loader=None,
                      logger=RunLogger(LoggingConfig(progress="lines"), str(tmp_path), is_main=False),
                      checkpointer=None, telemetry=StepTelemetry(warn=lambda m: None), device=META,
                      world_size=1, log_every=10**6)
    trainer = Trainer(TrainerConfig(epochs=1, run_dir=str(tmp_path)), parts, run)
    trainer._log_step = lambda meter, clock, first_bad: logged.append(set(meter.sums)) or \
        {"loss": 0.0, "lr": 0.0, "img_per_sec": 0.0}
    trainer.train_epoch(0)
    loader.close()
    return logged


def test_trainer_step_copies_nothing_blocking(flat_tree, tmp_path):
    """The per-step code of Trainer.train_epoch (loader, mixer, teacher, loss, meters, the
    non-finite detector) with a distilled student and a teacher, all on meta. The logging step
    (allowed to sync) is replaced: on meta its host reads could not run."""
    torch.manual_seed(0)
    np.random.seed(0)
    loader = build_loader(_cfg(flat_tree[0]), "train", 4, 0, 1, 0, META)
    student, teacher = _meta_models()
    per_step = []
    with CopySpy() as spy:
        logged = _meta_epoch(tmp_path, loader, _FakeEngine(student, spy, per_step), MixingConfig(), teacher)
    assert len(per_step) == 6 and logged == [{"loss", "loss_cls", "loss_dist"}]
    assert _after_first(per_step) == [[]] * 5


class _SteppingEngine(_FakeEngine):
    """_FakeEngine whose step() also runs a real optimizer on the module's own (meta) tensors,
    as DeepSpeed does at ZeRO 0 in fp32; a ZeRO layout needs real memory (data_ptr offsets),
    so LAMB's bound path is counted on CPU by tests/test_host_syncs.py instead."""

    def __init__(self, module, spy, per_step, optimizer):
        super().__init__(module, spy, per_step)
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step()
        super().step()


@pytest.mark.parametrize("augment", ["three_augment", "randaugment"])
def test_full_step_with_every_feature_copies_nothing_blocking(flat_tree, tmp_path, augment):
    """One full step per batch with everything that runs per step on: the loader's batched
    augmentation (3-Augment, or RandAugment with random erasing), Mixup/CutMix, a distilled
    student with a frozen teacher, LAMB (with its global-norm clip) and the EMA update, on
    meta: no blocking host-to-device copy after the first step, and no host read (it would
    raise on meta)."""
    from fastdeit.ema import EmaConfig, ModelEma, eval_copy
    from fastdeit.lamb import Lamb
    from fastdeit.optim import param_groups

    torch.manual_seed(0)
    np.random.seed(0)
    data = (dict(rand_augment=None, three_augment=True, color_jitter=0.3) if augment == "three_augment"
            else dict(rand_augment="rand-m9-mstd0.5-inc1"))
    loader = build_loader(_cfg(flat_tree[0], **data), "train", 4, 0, 1, 0, META)
    student, teacher = _meta_models()
    mixing = MixingConfig(erase_prob=0.0 if augment == "three_augment" else 0.5, erase_count=2)
    per_step = []
    with CopySpy() as spy:
        optimizer = Lamb(param_groups(student, 0.05), lr=1e-3, max_grad_norm=1.0)
        engine = _SteppingEngine(student, spy, per_step, optimizer)
        ema = ModelEma(EmaConfig(decay=0.9), engine, eval_copy(student, torch.float32))
        logged = _meta_epoch(tmp_path, loader, engine, mixing, teacher, ema)
    assert len(per_step) == 6 and logged == [{"loss", "loss_cls", "loss_dist"}]
    assert all(state["step"].device == META for state in optimizer.state.values())
    assert _after_first(per_step) == [[]] * 5


# -- on CUDA: torch's sync debug mode over real training steps --------------------------------

@pytest.mark.gpu
def test_twenty_training_steps_without_a_host_sync(tmp_path):
    """20 optimizer steps of the real Trainer (GPU DALI, RandAugment, erasing, Mixup/CutMix, a
    distilled student with a teacher, DeepSpeed ZeRO-1 bf16) under
    torch.cuda.set_sync_debug_mode("error") between logging steps: any synchronising CUDA call
    there (a blocking copy, .item(), a stream sync) raises. Runs in its own process: DeepSpeed's
    accelerator is chosen once per process, and this needs CUDA's."""
    script = ROOT / "tests" / "sync_debug_run.py"
    env = child_env("cuda")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "armed steps 20" in proc.stdout and "blocking copies 0" in proc.stdout, proc.stdout[-4000:]
