"""What the step benchmarks compare, in one place: fastdeit's training step (built and run by
the library itself), the bare PyTorch loop of the same student, and baselines A and B.

A variant is one training step split into three timed phases (forward incl. loss, backward,
update), built from a ``StepSettings`` (typed; the CLIs of benchmarks/step.py, e2e.py and
memory.py fill it) through a ``Setup`` (the shared synthetic batch, the teacher file, FLOP
counts). The fastdeit variants build their parts with ``fastdeit.build.build_models`` and
``build_engine`` from a ``fastdeit.config.Config`` and run ``fastdeit.step.TrainStep``: the
code ``Trainer.train_epoch`` runs, not a copy of it (tests/test_benchmarks.py checks the two
give the same losses for the same seed and batches).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from benchmarks import common
from benchmarks.common import opt
from fastdeit import build, flops as flops_lib, precision as precision_lib
from fastdeit.config import Config
from fastdeit.data.config import DataConfig
from fastdeit.data.augment.mixing import BatchMixer, MixingConfig
from fastdeit.ema import EmaConfig
from fastdeit.engine import EngineConfig
from fastdeit.losses import DeiTLoss, DistillConfig
from fastdeit.models import ModelConfig, TeacherConfig, build_student, compile_kwargs
from fastdeit.optim import OptimConfig, build_optimizer, param_groups, scaled_lr
from fastdeit.step import TrainStep

SIZES = {"ti": "tiny", "s": "small", "b": "base"}
KINDS = ["fastdeit", "fastdeit-student", "ds-defaults", "fastdeit-ema", "fastdeit-lamb", "wrap-compiled", "bare",
         "baseline-a", "baseline-b"]
# An ImageNet-like schedule length for the per-step LR: only its computation matters here.
IMAGENET_STEPS_PER_EPOCH = 1251


@dataclass
class StepSettings:
    """What the variants are built from: benchmarks/step.py's options, less the harness's."""

    model: str = opt("b", "DeiT size: ti, s or b (ViT-Ti/S/B for baseline A)", choices=sorted(SIZES))
    model_kwargs: Dict[str, Any] = opt({}, "JSON of extra timm args for every ViT, e.g. tiny debug models")
    batch: int = opt(256, "images per step (per device)")
    img_size: List[int] = opt([224], "image side; several: every variant at each side in one interleaved run, "
                               "the fastdeit students built at --native-size and resampling their position "
                               "embedding per forward (data.size_schedule), plus speed ratios between sides")
    native_size: Optional[int] = opt(None, "with several --img-size: the students' native side (default: the largest)")
    classes: int = 1000
    zero_stage: List[int] = opt([1], choices=[0, 1, 2])
    compile: str = opt("off", "compile the students and the teacher (not baseline B): on, or both = every "
                        "variant eager and compiled in the same run; fastdeit variants compile as the trainer does",
                        nargs="?", const="on", choices=["off", "on", "both"])
    compile_mode: str = opt("default", choices=["default", "max-autotune-no-cudagraphs", "max-autotune",
                                                 "reduce-overhead"])
    teacher: str = "regnety_160"
    teacher_kwargs: Dict[str, Any] = opt({}, "JSON of extra timm args for the teacher")
    teacher_format: str = opt("channels_last", "memory format of fastdeit's teacher (baseline B's is always NCHW)",
                               choices=["channels_last", "contiguous"])
    mixing: bool = opt(False, "Mixup/CutMix (+ erasing for fastdeit) inside the step")
    precision: str = opt("auto", "what every variant computes in: bf16 or fp32; auto as the trainer's "
                          "engine.precision (fastdeit.precision: bf16 where the device runs it natively, else fp32)",
                          choices=["auto", "bf16", "fp32"])
    ref_amp: str = opt("auto", "baseline B's autocast dtype; auto: fp16 on GPU (as published), else --precision's",
                        choices=["auto", "fp16", "bf16"])
    variants: List[str] = opt(["fastdeit", "fastdeit-student", "bare", "baseline-a", "baseline-b"], choices=KINDS)
    ds_config: Dict[str, Any] = opt({}, "JSON merged into fastdeit's DeepSpeed config (engine.deepspeed), e.g. "
                                     "'{\"zero_optimization\": {\"overlap_comm\": true}}'")

    def __post_init__(self):
        if self.batch < 2 or self.batch % 2:
            raise ValueError("--batch must be even (Mixup pairs images)")
        unknown = set(self.variants) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}: choose from {KINDS}")


# --------------------------------------------------------------------------- shared inputs


class Setup:
    """What every variant shares: sizes, names, and one synthetic batch on the device.

    With several image sizes, ``at(size)`` gives each size its own view (batch, FLOP counts per
    size) over the same teacher file, and the fastdeit students are built at ``native_size``
    with timm's dynamic image size, exactly as training with data.size_schedule builds them
    (position embedding resampled per forward)."""

    def __init__(self, settings: StepSettings, device: torch.device):
        st = self.settings = settings
        self.device = device
        # One compute dtype for every variant (baseline B on a GPU aside: fp16 as published).
        self.precision = bench_precision(st.precision, device)
        self.autocast = self.precision.dtype if self.precision.name == "bf16" else None
        self.batch = st.batch
        self.img_size = st.img_size[0]
        self.native_size: Optional[int] = None     # None: one size, static models
        self.tag = ""                              # "@<size>" in variant names when several sizes run
        self.num_classes = st.classes
        size = SIZES[st.model]
        self.student = f"deit_{size}_patch16_224"
        self.distilled = f"deit_{size}_distilled_patch16_224"
        self.vit = f"vit_{size}_patch16_224"
        self.model_kwargs = dict(st.model_kwargs)
        self.teacher_kwargs = dict(st.teacher_kwargs)
        self.images, self.labels = self._batch(self.img_size)
        self.mixing = MixingConfig() if st.mixing else MixingConfig(prob=0.0, erase_prob=0.0)
        self._shared: Dict[str, Any] = {"teacher": None, "flops": {}}   # across at() views

    def _batch(self, size: int):
        # Normalised images as the loader delivers them (float32, about N(0, 1)), and labels.
        g = torch.Generator().manual_seed(0)
        images = torch.randn(self.batch, 3, size, size, generator=g).to(self.device)
        labels = torch.randint(0, self.num_classes, (self.batch,), generator=g).to(self.device)
        return images, labels

    def at(self, size: int) -> "Setup":
        """This setup at another image side (its own batch), sharing the teacher file."""
        view = copy.copy(self)
        view.img_size, view.tag = size, f"@{size}"
        view.images = self._batch(size)[0]
        return view

    def views(self) -> List["Setup"]:
        """One setup per image size (the setup itself when there is one size)."""
        sizes = self.settings.img_size
        if len(sizes) == 1:
            return [self]
        self.native_size = self.settings.native_size or max(sizes)
        return [self.at(size) for size in sizes]

    def fresh_images(self) -> torch.Tensor:
        # Mixing works in place; the loader hands over a new tensor every step anyway.
        return self.images.clone() if self.settings.mixing else self.images

    def student_config(self, name: str) -> ModelConfig:
        return ModelConfig(name=name, drop_path=0.1, kwargs=dict(self.model_kwargs))

    def student_size(self) -> Dict[str, Any]:
        """build_student's size arguments: the native size, dynamic when several sizes run."""
        if self.native_size is None:
            return {"img_size": self.img_size}
        return {"img_size": self.native_size, "dynamic_img_size": True}

    def teacher_weights(self) -> str:
        """A random-weight file for the teacher: speed does not depend on the values, and it
        lets the benchmark build the teacher through build_teacher exactly as training does."""
        if self._shared["teacher"] is None:
            module = timm.create_model(self.settings.teacher, num_classes=self.num_classes, **self.teacher_kwargs)
            fd, path = tempfile.mkstemp(suffix=".pth", prefix="bench-teacher-")
            os.close(fd)
            torch.save(module.state_dict(), path)
            self._shared["teacher"] = path
        return self._shared["teacher"]

    def fastdeit_config(self, stage: int, distill: bool, ds_defaults: bool = False, compiled: bool = False,
                        ema: bool = False, lamb: bool = False) -> Config:
        """The run config whose step a fastdeit variant builds: the recipe's defaults, in the
        setup's precision, at
        this view's size (a one-entry data.size_schedule when several sizes run, so the
        student is native-sized and dynamic as in training), global batch = one step's."""
        st = self.settings
        overrides = copy.deepcopy(st.ds_config)
        if ds_defaults:      # DeepSpeed's own bf16 defaults, which fastdeit.engine turns off
            overrides["bf16"] = {**overrides.get("bf16", {}), "check_grad_overflow": True}
            if stage > 0:
                overrides["zero_optimization"] = {**overrides.get("zero_optimization", {}), "compute_grad_norm": True}
        model = self.student_config(self.distilled if distill else self.student)
        model = dataclasses.replace(model, compile=compiled, compile_mode=st.compile_mode)
        return Config(
            data=DataConfig(img_size=self.native_size or self.img_size,
                            size_schedule=[(0, self.img_size)] if self.native_size else None),
            mixing=self.mixing, model=model,
            teacher=TeacherConfig(name=st.teacher, weights=self.teacher_weights() if distill else None,
                                  kwargs=dict(self.teacher_kwargs), channels_last=st.teacher_format == "channels_last",
                                  dtype=self.precision.name, compile=compiled, compile_mode=st.compile_mode),
            distill=DistillConfig(type="hard" if distill else "none"),
            optim=OptimConfig(name="lamb") if lamb else OptimConfig(),
            engine=EngineConfig(global_batch_size=self.batch, zero_stage=stage, precision=self.precision.name,
                                gradient_clipping=deit3_clipping() if lamb else 0.0, deepspeed=overrides),
            ema=EmaConfig(decay=0.99996) if ema else EmaConfig())

    def count(self, key: str, fn: Callable[[], float]) -> float:
        flops, key = self._shared["flops"], f"{key}@{self.img_size}"
        if key not in flops:
            flops[key] = fn()
        return flops[key]

    def maybe_compile(self, model: nn.Module, compiled: bool) -> nn.Module:
        return torch.compile(model, **compile_kwargs(self.settings.compile_mode)) if compiled else model

    def close(self) -> None:
        if self._shared["teacher"]:
            os.unlink(self._shared["teacher"])
            self._shared["teacher"] = None


# --------------------------------------------------------------------------- variants


class Variant:
    """One training step split into three timed phases: forward (incl. loss), backward, update.

    ``forward`` takes the batch as a loader would deliver it: normalised float32 images
    [B, 3, S, S] and int64 labels [B], on the device.
    """

    name: str = ""
    about: str = ""
    flops_per_image: float = 0.0
    kind: str = ""           # one of KINDS
    stage: Optional[int] = None
    compiled: bool = False
    compute_dtype: str = "bf16"   # what the matmuls run in: the MFU's peak must be this dtype's
    s: Setup

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> None: ...
    def backward(self) -> None: ...
    def update(self) -> None: ...

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.forward(images, labels)
        self.backward()
        self.update()


class FastdeitStep(Variant):
    """The trainer's step: parts from fastdeit.build, run by fastdeit.step.TrainStep."""

    def __init__(self, s: Setup, stage: int, distill: bool, ds_defaults: bool = False, compiled: bool = False,
                 ema: bool = False, wrap: bool = False, lamb: bool = False,
                 steps_per_epoch: int = IMAGENET_STEPS_PER_EPOCH):
        self.kind = ("fastdeit" if distill else "ds-defaults" if ds_defaults else "fastdeit-ema" if ema
                     else "wrap-compiled" if wrap else "fastdeit-lamb" if lamb else "fastdeit-student")
        self.stage = stage
        self.compiled = compiled or wrap
        self.name = f"{self.kind}[z{stage}]" + ("+compile" if compiled and not wrap else "") + s.tag
        mode = s.settings.compile_mode
        dtype = self.compute_dtype = s.precision.name
        self.about = (f"DeepSpeed ZeRO-{stage} {dtype}, {f'distilled student + frozen {dtype} ' + s.settings.teacher_format + ' teacher, hard distillation' if distill else 'student alone'}"
                      f"{', Mixup/CutMix + erasing' if s.settings.mixing else ''}"
                      f"{', DeepSpeed defaults: overflow check + grad norm every step' if ds_defaults else ''}"
                      f"{', model EMA (decay 0.99996) updated every step' if ema else ''}"
                      f"{', LAMB (fastdeit.lamb)' if lamb else ''}"
                      f"{f', engine.compile() ({mode})' if compiled and not wrap else ''}"
                      f"{f', torch.compile ({mode}) before deepspeed.initialize' if wrap else ''}")
        self.s = s
        self.cfg = s.fastdeit_config(stage, distill, ds_defaults, compiled and not wrap, ema, lamb)
        micro = build.resolve_batch(self.cfg, world_size=1)[1]      # refusing what the trainer refuses
        models = build.build_models(self.cfg, s.device, s.num_classes, micro)
        teacher = models.teacher.module if models.teacher is not None else None
        self.flops_per_image = s.count("fastdeit" if distill else "fastdeit-student",
                                       lambda: flops_lib.train_flops_per_image(models.student, s.img_size, teacher))
        wrapped = s.maybe_compile(models.student, True) if wrap else None
        self.step = TrainStep(build.build_engine(self.cfg, models, 1, steps_per_epoch, student=wrapped), s.device)
        self.engine = self.step.engine
        self.engine.train()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.step.forward(images, labels)

    def backward(self) -> None:
        self.step.backward()

    def update(self) -> None:
        self.step.update()


class BareStep(Variant):
    """The same student and optimizer in the plainest PyTorch loop: autocast bf16 (or plain
    fp32), no engine."""

    kind = "bare"

    def __init__(self, s: Setup, compiled: bool = False):
        self.compiled = compiled
        self.name = "bare-student" + ("+compile" if compiled else "") + s.tag
        self.compute_dtype = s.precision.name
        self.about = ("plain PyTorch loop: same student and optimizer, "
                      + ("autocast bf16 over fp32 weights" if s.autocast else "fp32")
                      + (f", torch.compile ({s.settings.compile_mode})" if compiled else ""))
        self.s = s
        model = build_student(s.student_config(s.student), num_classes=s.num_classes, **s.student_size()).to(s.device)
        self.flops_per_image = s.count("fastdeit-student", lambda: flops_lib.train_flops_per_image(model, s.img_size))
        self.optimizer = build_optimizer(OptimConfig(), model, s.batch)
        self.model = s.maybe_compile(model, compiled)
        self.criterion = DeiTLoss(DistillConfig(type="none"))
        _, self.targets = BatchMixer(MixingConfig(prob=0.0, erase_prob=0.0), s.num_classes, s.device)(
            s.images.clone(), s.labels)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(self.s):
            outputs = self.model(images)
        self.loss, _ = self.criterion(outputs, self.targets)    # the labels' smoothed one-hot

    def backward(self) -> None:
        self.loss.backward()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class ViTRecipeStep(Variant):
    """Baseline A: timm ViT, autocast bf16 (or plain fp32), torch AdamW (its default implementation).

    With ``mixup`` (the end-to-end baseline), timm's Mixup/CutMix with DeiT's settings and a
    soft-target cross entropy, as timm's train.py does it; otherwise cross entropy with label
    smoothing on the hard labels.
    """

    kind = "baseline-a"

    def __init__(self, s: Setup, mixup: bool = False, compiled: bool = False):
        self.compiled = compiled
        self.name = "A:vit-recipe" + ("+compile" if compiled else "") + s.tag
        self.compute_dtype = s.precision.name
        self.about = (f"timm {s.vit}, plain loop, {'autocast bf16' if s.autocast else 'fp32'}, torch AdamW (default impl), "
                      + ("timm Mixup/CutMix + soft-target CE" if mixup else "CE + smoothing")
                      + (f", torch.compile ({s.settings.compile_mode})" if compiled else ""))
        self.s = s
        model = timm.create_model(s.vit, img_size=s.img_size, num_classes=s.num_classes, drop_path_rate=0.1,
                                  **s.model_kwargs).to(s.device)
        self.flops_per_image = s.count("baseline-a", lambda: flops_lib.train_flops_per_image(model, s.img_size))
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=scaled_lr(OptimConfig(), s.batch), weight_decay=0.05)
        self.model = s.maybe_compile(model, compiled)
        self.mixup = None
        if mixup:
            self.mixup = timm_mixup(s.num_classes, enabled=True)
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        with autocast(self.s):
            outputs = self.model(images)
            self.loss = self.criterion(outputs, targets)

    def backward(self) -> None:
        self.loss.backward()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class DeiTReferenceStep(Variant):
    """Baseline B: the DeiT reference training step (main.py/engine.py of the 2020 release)."""

    kind = "baseline-b"

    def __init__(self, s: Setup):
        self.s = s
        amp = self.compute_dtype = reference_amp(s.settings.ref_amp, s.device, s.precision.name)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)      # None: fp32
        self.name = f"B:deit-reference{s.tag}"
        self.about = (f"as published: {amp + ' autocast' if self.amp_dtype else 'fp32'} + GradScaler, "
                      f"loss.item() + sync every step, "
                      f"fp32 NCHW teacher{' under autocast' if self.amp_dtype else ''}, unfused AdamW"
                      f"{', Mixup/CutMix' if s.settings.mixing else ''}")
        model = timm.create_model(s.distilled, img_size=s.img_size, num_classes=s.num_classes, drop_path_rate=0.1,
                                  **s.model_kwargs).to(s.device)
        model.set_distilled_training(True)
        teacher = timm.create_model(s.settings.teacher, num_classes=s.num_classes, **s.teacher_kwargs)
        self.teacher = teacher.to(s.device).eval().requires_grad_(False)
        self.flops_per_image = s.count(
            "fastdeit", lambda: flops_lib.train_flops_per_image(model, s.img_size, self.teacher))
        self.model = model   # never compiled: the published recipe predates torch.compile
        # timm's create_optimizer of 2020: AdamW over decay / no-decay groups, one tensor at a time.
        self.optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=scaled_lr(OptimConfig(), s.batch),
                                           foreach=False, fused=False)
        self.scaler = torch.amp.GradScaler(s.device.type)
        self.criterion = DeiTLoss(DistillConfig(type="hard"))
        # timm's Mixup as the reference uses it (its erasing runs in the data workers); with
        # mixing off it only smooths the labels.
        self.mixup = timm_mixup(s.num_classes, enabled=s.settings.mixing)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images, targets = self.mixup(images, labels)
        with torch.autocast(self.s.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.model(images)
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            self.loss, _ = self.criterion(outputs, targets, teacher_logits)
        loss_value = self.loss.item()                     # host sync, every step
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss is {loss_value}")

    def backward(self) -> None:
        self.optimizer.zero_grad()
        self.scaler.scale(self.loss).backward()

    def update(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        common.synchronize(self.s.device)                 # torch.cuda.synchronize() every step


def deit3_clipping() -> float:
    """engine.gradient_clipping of the DeiT III recipe (configs/deit3_b.yaml): whether DeepSpeed
    or LAMB itself clips the global norm is the recipe's choice, and the LAMB variant follows it."""
    import yaml

    with open(common.ROOT / "configs" / "deit3_b.yaml") as f:
        return float(yaml.safe_load(f)["engine"].get("gradient_clipping", 0.0))


def timm_mixup(num_classes: int, enabled: bool) -> Mixup:
    """timm's Mixup/CutMix with DeiT's settings (what the baselines use); ``enabled=False``
    keeps only the label smoothing."""
    m = MixingConfig()
    return Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob if enabled else 0.0,
                 switch_prob=m.switch_prob, mode=m.mode, label_smoothing=m.label_smoothing,
                 num_classes=num_classes)


def reference_amp(choice: str, device: torch.device, precision: str = "bf16") -> str:
    """Baseline B's autocast dtype: fp16 on a GPU as published (auto), else the run's precision
    (a CPU has no fast fp16 matmul: fp16 would measure emulation); 'fp32' means no autocast."""
    if choice != "auto":
        return choice
    return "fp16" if device.type == "cuda" else precision


def bench_precision(requested: str, device: torch.device) -> "precision_lib.Precision":
    """--precision as the trainer resolves engine.precision (auto: bf16 where native)."""
    chosen = precision_lib.resolve(requested, device, "--precision")
    return chosen if requested == "auto" else precision_lib.Precision(chosen.name, "given with --precision")


def autocast(s: Setup):
    """The plain loops' autocast: bf16 over fp32 weights, or off in an fp32 run."""
    return torch.autocast(s.device.type, dtype=s.autocast or torch.bfloat16, enabled=s.autocast is not None)


# --------------------------------------------------------------------------- the list


def factories(s: Setup) -> List[Callable[[], Variant]]:
    """One constructor per variant the settings ask for, per image size, in the record's order."""
    return [f for view in s.views() for f in _at(view)]


def _at(s: Setup) -> List[Callable[[], Variant]]:
    st = s.settings
    wanted = st.variants
    # The fastdeit kinds: FastdeitStep's keyword per kind ("fastdeit" is the distilled one).
    fastdeit = {"fastdeit": {"distill": True}, "fastdeit-student": {}, "ds-defaults": {"ds_defaults": True},
                "fastdeit-ema": {"ema": True}, "fastdeit-lamb": {"lamb": True}}
    out: List[Callable[[], Variant]] = []
    for compiled in {"off": [False], "on": [True], "both": [False, True]}[st.compile]:
        for stage in st.zero_stage:
            for kind, kw in fastdeit.items():
                if kind in wanted:
                    out.append(lambda stage=stage, c=compiled, kw=kw: FastdeitStep(
                        s, stage, distill=kw.get("distill", False), compiled=c,
                        **{k: v for k, v in kw.items() if k != "distill"}))
            if "wrap-compiled" in wanted and compiled:
                out.append(lambda stage=stage: FastdeitStep(s, stage, distill=False, wrap=True))
        if "bare" in wanted:
            out.append(lambda c=compiled: BareStep(s, compiled=c))
        if "baseline-a" in wanted:
            out.append(lambda c=compiled: ViTRecipeStep(s, compiled=c))
    if "baseline-b" in wanted:
        out.append(lambda: DeiTReferenceStep(s))       # as published: never compiled
    return out
