"""Training-step throughput, side by side in one run: fastdeit's step against ViT baselines.

    python -m benchmarks.step --model b --batch 256 --zero-stage 1 2          # a GPU
    python -m benchmarks.step --model ti --batch 32 --zero-stage 0 1 2        # this repo's CPU record

Synthetic batches already on the device (no data loading; see benchmarks/e2e.py for that).
Variants, all at the same model size, batch and resolution:

  fastdeit[zN]          the real step (as fastdeit.trainer runs it): DeepSpeed engine at ZeRO
                        stage N, bf16, our optimizer (fastdeit.optim.build_optimizer), per-step
                        LR, the distilled student plus the frozen channels-last bf16 teacher
                        (FrozenTeacher), hard distillation (DeiTLoss), device-side loss meters.
                        Batch mixing (BatchMixer) only with --mixing; label smoothing always.
  fastdeit-student[zN]  the same without the teacher: plain student, DeiTLoss 'none'.
  ds-defaults[zN]       (opt-in) fastdeit-student with DeepSpeed's own bf16 defaults put back
                        (gradient overflow check and global grad norm every step), to show
                        what fastdeit.engine's overrides of them save.
  fastdeit-ema[zN]      (opt-in) fastdeit-student plus the model EMA (fastdeit.ema, decay
                        0.99996, updated every step from the fp32 masters): the EMA's cost.
  fastdeit-lamb[zN]     (opt-in) fastdeit-student with DeiT III's LAMB (optim.name=lamb,
                        fastdeit.lamb, with engine.gradient_clipping as configs/deit3_b.yaml
                        sets it) instead of AdamW: the optimizer's cost.
  wrap-compiled[zN]     (opt-in, with --compile) fastdeit-student compiled by torch.compile before
                        deepspeed.initialize wraps it, against engine.compile() (what the trainer
                        does, fastdeit.engine.initialize).
  bare-student          a bare PyTorch loop of the same student and the same optimizer in bf16
                        (autocast over fp32 weights): the yardstick for framework overhead.
  A:vit-recipe          the usual ViT recipe: timm vit_<size>_patch16 in a plain loop, autocast
                        bf16, torch AdamW with its default implementation, cross entropy with
                        label smoothing.
  B:deit-reference      the step as published with DeiT: distilled student, fp16 autocast with a
                        GradScaler, loss.item() and a device synchronize every step, the teacher
                        in fp32 NCHW under the same autocast, unfused (per-parameter) AdamW.
                        On CPU the autocast dtype is bf16, since CPUs without fp16 matmul units
                        run fp16 hundreds of times slower, which would measure nothing useful.

Per variant: images/sec and ms/step (median over the timed steps after warm-up; CUDA events
on GPU, perf_counter on CPU), the forward / backward / optimizer split, peak memory (GPU), and
MFU from FLOPs counted with torch's FLOP counter (fastdeit.flops) against the peak training
runs use (fastdeit.flops.peak_flops, in bf16): --peak-tflops, else a known GPU's data-sheet dense
bf16 figure, else a bf16 matmul measured on the benchmark's threads (the fp32 units' rate on a
CPU without native bf16). Variants run interleaved in rounds (a few steps of each, rotating the
order) so that drifting clocks and noisy neighbours hit all of them alike. ``--compile both``
builds every variant but baseline B twice, eager and compiled (named ``...+compile``), so the
two are measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from benchmarks import common
from fastdeit import ema as ema_lib, engine as engine_lib, flops as flops_lib
from fastdeit.data.augment.mixing import BatchMixer, MixingConfig
from fastdeit.losses import DeiTLoss, DistillConfig
from fastdeit.metrics import DeviceMeter
from fastdeit.models import ModelConfig, TeacherConfig, build_student, build_teacher, compile_kwargs
from fastdeit.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler, param_groups, scaled_lr

SIZES = {"ti": "tiny", "s": "small", "b": "base"}


# --------------------------------------------------------------------------- shared inputs


class Setup:
    """What every variant shares: sizes, names, and one synthetic batch on the device.

    With several --img-size values, ``at(size)`` gives each size its own view (batch, FLOP
    counts per size) over the same teacher file, and the fastdeit students are built at
    ``native_size`` with timm's dynamic image size, exactly as training with
    data.size_schedule builds them (position embedding resampled per forward)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, img_size: Optional[int] = None,
                 native_size: Optional[int] = None):
        self.args = args
        self.device = device
        self.batch = args.batch
        self.img_size = img_size or (args.img_size[0] if isinstance(args.img_size, list) else args.img_size)
        self.native_size = native_size      # None: one size, static models
        self.tag = ""                       # "@<size>" in variant names when several sizes run
        self.num_classes = args.classes
        size = SIZES[args.model]
        self.student = f"deit_{size}_patch16_224"
        self.distilled = f"deit_{size}_distilled_patch16_224"
        self.vit = f"vit_{size}_patch16_224"
        self.model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
        self.teacher_kwargs = json.loads(args.teacher_kwargs) if args.teacher_kwargs else {}
        g = torch.Generator().manual_seed(0)
        # Normalised images as the loader delivers them (float32, about N(0, 1)), and labels.
        self.images = torch.randn(self.batch, 3, self.img_size, self.img_size, generator=g).to(device)
        self.labels = torch.randint(0, self.num_classes, (self.batch,), generator=g).to(device)
        self.mixing = MixingConfig() if args.mixing else MixingConfig(prob=0.0, erase_prob=0.0)
        self._shared: Dict[str, Any] = {"teacher": None, "flops": {}}   # across at() views

    def at(self, size: int) -> "Setup":
        """This setup at another image side (its own batch), sharing the teacher file."""
        view = copy.copy(self)
        view.img_size, view.tag = size, f"@{size}"
        g = torch.Generator().manual_seed(0)
        view.images = torch.randn(self.batch, 3, size, size, generator=g).to(self.device)
        return view

    def student_size(self) -> Dict[str, Any]:
        """build_student's size arguments: the native size, dynamic when several sizes run."""
        if self.native_size is None:
            return {"img_size": self.img_size}
        return {"img_size": self.native_size, "dynamic_img_size": True}

    def fresh_images(self) -> torch.Tensor:
        # Mixing works in place; the loader hands over a new tensor every step anyway.
        return self.images.clone() if self.args.mixing else self.images

    def student_config(self, name: str) -> ModelConfig:
        return ModelConfig(name=name, drop_path=0.1, kwargs=dict(self.model_kwargs))

    def teacher_weights(self) -> str:
        """A random-weight file for the teacher: speed does not depend on the values, and it
        lets the benchmark build the teacher through build_teacher exactly as training does."""
        if self._shared["teacher"] is None:
            module = timm.create_model(self.args.teacher, num_classes=self.num_classes, **self.teacher_kwargs)
            fd, path = tempfile.mkstemp(suffix=".pth", prefix="bench-teacher-")
            os.close(fd)
            torch.save(module.state_dict(), path)
            self._shared["teacher"] = path
        return self._shared["teacher"]

    def count(self, key: str, fn: Callable[[], float]) -> float:
        flops, key = self._shared["flops"], f"{key}@{self.img_size}"
        if key not in flops:
            flops[key] = fn()
        return flops[key]

    def maybe_compile(self, model: nn.Module, compiled: bool) -> nn.Module:
        return torch.compile(model, **compile_kwargs(self.args.compile_mode)) if compiled else model

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
    kind: str = ""           # fastdeit | fastdeit-student | ds-defaults | fastdeit-ema | fastdeit-lamb | wrap-compiled | bare | baseline-a | baseline-b
    stage: Optional[int] = None
    compiled: bool = False
    compute_dtype: str = "bf16"   # what the matmuls run in: the MFU's peak must be this dtype's

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> None: ...
    def backward(self) -> None: ...
    def update(self) -> None: ...


class FastdeitStep(Variant):
    """The trainer's step (fastdeit/trainer.py, train_epoch), call for call."""

    def __init__(self, s: Setup, stage: int, distill: bool, ds_defaults: bool = False, compiled: bool = False,
                 ema: bool = False, wrap: bool = False, lamb: bool = False):
        self.kind = ("fastdeit" if distill else "ds-defaults" if ds_defaults else "fastdeit-ema" if ema
                     else "wrap-compiled" if wrap else "fastdeit-lamb" if lamb else "fastdeit-student")
        self.stage = stage
        self.compiled = compiled or wrap
        self.name = f"{self.kind}[z{stage}]" + ("+compile" if compiled and not wrap else "") + s.tag
        mode = s.args.compile_mode
        self.about = (f"DeepSpeed ZeRO-{stage} bf16, {'distilled student + frozen bf16 ' + s.args.teacher_format + ' teacher, hard distillation' if distill else 'student alone'}"
                      f"{', Mixup/CutMix + erasing' if s.args.mixing else ''}"
                      f"{', DeepSpeed defaults: overflow check + grad norm every step' if ds_defaults else ''}"
                      f"{', model EMA (decay 0.99996) updated every step' if ema else ''}"
                      f"{', LAMB (fastdeit.lamb)' if lamb else ''}"
                      f"{f', engine.compile() ({mode})' if compiled and not wrap else ''}"
                      f"{f', torch.compile ({mode}) before deepspeed.initialize' if wrap else ''}")
        self.s = s
        model = build_student(s.student_config(s.distilled if distill else s.student), num_classes=s.num_classes,
                              **s.student_size())
        model = model.to(s.device)
        self.teacher = None
        if distill:
            self.teacher = build_teacher(
                TeacherConfig(name=s.args.teacher, weights=s.teacher_weights(), kwargs=dict(s.teacher_kwargs),
                              channels_last=s.args.teacher_format == "channels_last", dtype="bf16",
                              compile=compiled, compile_mode=mode),
                s.num_classes, s.device)
        self.flops_per_image = s.count(
            "fastdeit" if distill else "fastdeit-student", lambda: flops_lib.train_flops_per_image(
                model, s.img_size, self.teacher.module if self.teacher else None))
        self.criterion = DeiTLoss(DistillConfig(type="hard" if distill else "none"))
        self.dtype = engine_lib.model_dtype(engine_lib.EngineConfig(precision="bf16"))
        self.mixer = BatchMixer(s.mixing, s.num_classes, s.device, dtype=self.dtype)   # as build.py makes it
        ema_module = ema_lib.eval_copy(model, self.dtype) if ema else None             # as build.py makes it
        model = s.maybe_compile(model, wrap)
        optimizer = build_optimizer(OptimConfig(name="lamb") if lamb else OptimConfig(), model, s.batch)
        overrides = json.loads(s.args.ds_config) if s.args.ds_config else {}
        if ds_defaults:
            overrides["bf16"] = {**overrides.get("bf16", {}), "check_grad_overflow": True}
            if stage > 0:
                overrides["zero_optimization"] = {**overrides.get("zero_optimization", {}), "compute_grad_norm": True}
        ds = engine_lib.deepspeed_config(   # buckets sized from the student, as build.py does
            engine_lib.EngineConfig(global_batch_size=s.batch, zero_stage=stage, precision="bf16",
                                    gradient_clipping=deit3_clipping() if lamb else 0.0,
                                    deepspeed=overrides), world_size=1,
            num_params=sum(p.numel() for p in model.parameters()))
        self.engine = engine_lib.initialize(model, optimizer, ds, mode if compiled and not wrap else None)
        self.engine.train()
        self.ema = ema_lib.ModelEma(ema_lib.EmaConfig(decay=0.99996), self.engine, ema_module) if ema else None
        # ImageNet-like schedule length; only the per-step LR computation matters here.
        self.scheduler = build_scheduler(ScheduleConfig(), self.engine.optimizer, steps_per_epoch=1251, epochs=300)
        self.meter = DeviceMeter(s.device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=s.device)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        engine = self.engine
        self.step = engine.global_steps
        self.scheduler.step_update(self.step)
        images, targets = self.mixer(images, labels)
        images = images.to(self.dtype)
        teacher_logits = self.teacher(images) if self.teacher is not None else None
        outputs = engine(images)
        self.loss, self.parts = self.criterion(outputs, targets, teacher_logits)

    def backward(self) -> None:
        self.engine.backward(self.loss)

    def update(self) -> None:
        self.engine.step()
        if self.ema is not None:
            self.ema.update(self.engine.global_steps)
        self.meter.update({"loss": self.loss, **self.parts})
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(self.loss.detach()),
                                     torch.full_like(self.first_bad, self.step), self.first_bad)


class BareStep(Variant):
    """The same student and optimizer in the plainest PyTorch loop: autocast bf16, no engine."""

    kind = "bare"

    def __init__(self, s: Setup, compiled: bool = False):
        self.compiled = compiled
        self.name = "bare-student" + ("+compile" if compiled else "") + s.tag
        self.about = ("plain PyTorch loop: same student and optimizer, autocast bf16 over fp32 weights"
                      + (f", torch.compile ({s.args.compile_mode})" if compiled else ""))
        self.s = s
        model = build_student(s.student_config(s.student), num_classes=s.num_classes, **s.student_size()).to(s.device)
        self.flops_per_image = s.count("fastdeit-student", lambda: flops_lib.train_flops_per_image(model, s.img_size))
        self.optimizer = build_optimizer(OptimConfig(), model, s.batch)
        self.model = s.maybe_compile(model, compiled)
        self.criterion = DeiTLoss(DistillConfig(type="none"))
        _, self.targets = BatchMixer(MixingConfig(prob=0.0, erase_prob=0.0), s.num_classes, s.device)(
            s.images.clone(), s.labels)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(self.s.device.type, dtype=torch.bfloat16):
            outputs = self.model(images)
        self.loss, _ = self.criterion(outputs, self.targets)    # the labels' smoothed one-hot

    def backward(self) -> None:
        self.loss.backward()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class ViTRecipeStep(Variant):
    """Baseline A: timm ViT, autocast bf16, torch AdamW (its default implementation).

    With ``mixup`` (the end-to-end baseline), timm's Mixup/CutMix with DeiT's settings and a
    soft-target cross entropy, as timm's train.py does it; otherwise cross entropy with label
    smoothing on the hard labels.
    """

    kind = "baseline-a"

    def __init__(self, s: Setup, mixup: bool = False, compiled: bool = False):
        self.compiled = compiled
        self.name = "A:vit-recipe" + ("+compile" if compiled else "") + s.tag
        self.about = (f"timm {s.vit}, plain loop, autocast bf16, torch AdamW (default impl), "
                      + ("timm Mixup/CutMix + soft-target CE" if mixup else "CE + smoothing")
                      + (f", torch.compile ({s.args.compile_mode})" if compiled else ""))
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
        with torch.autocast(self.s.device.type, dtype=torch.bfloat16):
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
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[reference_amp(s.args.ref_amp, s.device)]
        amp = self.compute_dtype = "fp16" if self.amp_dtype == torch.float16 else "bf16"
        self.name = f"B:deit-reference{s.tag}"
        self.about = (f"as published: {amp} autocast + GradScaler, loss.item() + sync every step, "
                      f"fp32 NCHW teacher under autocast, unfused AdamW"
                      f"{', Mixup/CutMix' if s.args.mixing else ''}")
        model = timm.create_model(s.distilled, img_size=s.img_size, num_classes=s.num_classes, drop_path_rate=0.1,
                                  **s.model_kwargs).to(s.device)
        model.set_distilled_training(True)
        teacher = timm.create_model(s.args.teacher, num_classes=s.num_classes, **s.teacher_kwargs)
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
        # --mixing off it only smooths the labels.
        self.mixup = timm_mixup(s.num_classes, enabled=s.args.mixing)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images, targets = self.mixup(images, labels)
        with torch.autocast(self.s.device.type, dtype=self.amp_dtype):
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


def reference_amp(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice
    return "fp16" if device.type == "cuda" else "bf16"


# --------------------------------------------------------------------------- measuring


def run_steps(v: Variant, n: int, clock: common.PhaseClock, s: Setup) -> List[List[Any]]:
    """n steps; returns per step [start, after forward, after backward] and a final mark."""
    marks: List[List[Any]] = []
    for _ in range(n):
        start = clock.mark()
        v.forward(v.s.fresh_images(), v.s.labels)     # the variant's own size
        fwd = clock.mark()
        v.backward()
        bwd = clock.mark()
        v.update()
        marks.append([start, fwd, bwd])
    marks.append([clock.mark()])
    return marks


def phase_times(marks: List[List[Any]], clock: common.PhaseClock) -> Dict[str, List[float]]:
    out: Dict[str, List[float]] = {"step": [], "forward": [], "backward": [], "optimizer": []}
    for (start, fwd, bwd), nxt in zip(marks[:-1], marks[1:]):
        out["step"].append(clock.elapsed_ms(start, nxt[0]))
        out["forward"].append(clock.elapsed_ms(start, fwd))
        out["backward"].append(clock.elapsed_ms(fwd, bwd))
        out["optimizer"].append(clock.elapsed_ms(bwd, nxt[0]))
    return out


def size_views(s: Setup) -> List[Setup]:
    """One setup per --img-size (the setup itself when there is one size)."""
    sizes = s.args.img_size if isinstance(s.args.img_size, list) else [s.args.img_size]
    if len(sizes) == 1:
        return [s]
    s.native_size = s.args.native_size or max(sizes)
    return [s.at(size) for size in sizes]


def build_variants(s: Setup) -> List[Callable[[], Variant]]:
    return [f for view in size_views(s) for f in _variants_at(view)]


def _variants_at(s: Setup) -> List[Callable[[], Variant]]:
    wanted = s.args.variants
    factories: List[Callable[[], Variant]] = []
    for compiled in {"off": [False], "on": [True], "both": [False, True]}[s.args.compile]:
        for stage in s.args.zero_stage:
            if "fastdeit" in wanted:
                factories.append(lambda stage=stage, c=compiled: FastdeitStep(s, stage, distill=True, compiled=c))
            if "fastdeit-student" in wanted:
                factories.append(lambda stage=stage, c=compiled: FastdeitStep(s, stage, distill=False, compiled=c))
            if "ds-defaults" in wanted:
                factories.append(lambda stage=stage, c=compiled: FastdeitStep(s, stage, distill=False,
                                                                              ds_defaults=True, compiled=c))
            if "fastdeit-ema" in wanted:
                factories.append(lambda stage=stage, c=compiled: FastdeitStep(s, stage, distill=False, ema=True,
                                                                              compiled=c))
            if "fastdeit-lamb" in wanted:
                factories.append(lambda stage=stage, c=compiled: FastdeitStep(s, stage, distill=False, lamb=True,
                                                                              compiled=c))
            if "wrap-compiled" in wanted and compiled:
                factories.append(lambda stage=stage: FastdeitStep(s, stage, distill=False, wrap=True))
        if "bare" in wanted:
            factories.append(lambda c=compiled: BareStep(s, compiled=c))
        if "baseline-a" in wanted:
            factories.append(lambda c=compiled: ViTRecipeStep(s, compiled=c))
    if "baseline-b" in wanted:
        factories.append(lambda: DeiTReferenceStep(s))       # as published: never compiled
    return factories


def measure(s: Setup, peak: common.PeakFlops, log=common.print_flush,
            on_round: Optional[Callable[[List[Dict[str, Any]], int], None]] = None,
            ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """(a row per variant, the run's peak memory). ``on_round(rows, rounds_done)`` gets the rows
    measured so far after every round, so a run stopped from outside keeps what it measured."""
    args, device = s.args, s.device
    clock = common.PhaseClock(device)
    probe = common.MemoryProbe(device)
    built: List[Variant] = []
    results: Dict[str, Dict[str, Any]] = {}
    for factory in build_variants(s):
        before = probe.allocated()
        torch.manual_seed(0)
        v = factory()
        run_steps(v, args.warmup, clock, s)                  # untimed: allocator, kernels, DS buffers
        clock.synchronize()
        resident = probe.allocated() - before if before is not None else None
        results[v.name] = {"variant": v, "times": {}, "resident": resident, "transient": 0}
        built.append(v)
        log(f"  built and warmed {v.name}")
    for r in range(args.rounds):
        k = r % len(built)
        for v in built[k:] + built[:k]:                   # rotate: no variant always goes first
            if args.rewarm:
                run_steps(v, args.rewarm, clock, s)           # re-warm after the other variants ran
            start = probe.start()
            marks = run_steps(v, args.steps, clock, s)
            clock.synchronize()
            res = results[v.name]
            transient = probe.transient(start)
            if transient is not None:
                res["transient"] = max(res["transient"], transient)
            for phase, values in phase_times(marks, clock).items():
                res["times"].setdefault(phase, []).extend(values)
        peak.sample()
        log(f"  round {r + 1}/{args.rounds} done")
        if on_round is not None:
            on_round(variant_rows(built, results, s), r + 1)
    return variant_rows(built, results, s), probe.run_peak()


def variant_rows(built: List[Variant], results: Dict[str, Dict[str, Any]], s: Setup) -> List[Dict[str, Any]]:
    out = []
    for v in built:
        res = results[v.name]
        step = common.summarize(res["times"]["step"])
        ips = s.batch / (step["median"] / 1e3)
        peak_mem = (res["resident"] + res["transient"]) if res["resident"] is not None else None
        out.append({
            "name": v.name, "kind": v.kind, "zero_stage": v.stage, "compiled": v.compiled, "about": v.about,
            "compute_dtype": v.compute_dtype,
            "img_size": v.s.img_size, "base": v.name[: len(v.name) - len(v.s.tag)] if v.s.tag else v.name,
            "img_per_sec": ips, "ms_per_step": step["median"], "ms_p25": step["p25"], "ms_p75": step["p75"],
            "ms_best": step["min"], "img_per_sec_best": s.batch / (step["min"] / 1e3),
            "ms_phases": {p: common.summarize(res["times"][p])["median"] for p in ("forward", "backward", "optimizer")},
            "steps_timed": step["n"],
            "peak_mem_gib": peak_mem / 2**30 if peak_mem is not None else None,
            "flops_per_image": v.flops_per_image,
            "tflops_per_sec": ips * v.flops_per_image / 1e12,
        })
    return out


def ratios(rows: List[Dict[str, Any]], stages: Sequence[int], patch: int = 16) -> List[Dict[str, Any]]:
    by = {r["name"]: r for r in rows}
    out = []

    best = {"ms_per_step": "ms_best", "img_per_sec": "img_per_sec_best"}

    def add(name, num, den, key, meaning, target=None):
        if num in by and den in by:
            a, b = by[num][key], by[den][key]
            out.append({"name": name, "numerator": num, "denominator": den, "of": key, "value": a / b,
                        "value_best": by[num][best[key]] / by[den][best[key]],
                        "meaning": meaning, **({"target": target} if target else {})})

    # Per size tag ("@<side>" when several sizes ran, else ""), the same ratios among eager and
    # among compiled variants.
    tags = list(dict.fromkeys(r["name"][len(r["base"]):] for r in rows))
    for t in tags:
        for c in ("", "+compile"):
            ct = (" compiled" if c else "") + t
            for z in stages:
                add(f"overhead z{z}{ct}", f"fastdeit-student[z{z}]{c}{t}", f"bare-student{c}{t}", "ms_per_step",
                    "fastdeit step time / bare PyTorch step time, same student, optimizer, bf16", "<= 1.10")
                add(f"speed-up vs A z{z}{ct}", f"fastdeit-student[z{z}]{c}{t}", f"A:vit-recipe{c}{t}", "img_per_sec",
                    "fastdeit student-only img/s / usual ViT recipe img/s")
                add(f"speed-up vs B z{z}{ct}", f"fastdeit[z{z}]{c}{t}", f"B:deit-reference{t}", "img_per_sec",
                    "fastdeit distillation img/s / DeiT reference step img/s")
                add(f"teacher cost z{z}{ct}", f"fastdeit[z{z}]{c}{t}", f"fastdeit-student[z{z}]{c}{t}", "ms_per_step",
                    "step time with frozen teacher + distillation / without")
                add(f"DS defaults z{z}{ct}", f"ds-defaults[z{z}]{c}{t}", f"fastdeit-student[z{z}]{c}{t}", "ms_per_step",
                    "step time with DeepSpeed's bf16 defaults / with fastdeit.engine's config")
                add(f"EMA cost z{z}{ct}", f"fastdeit-ema[z{z}]{c}{t}", f"fastdeit-student[z{z}]{c}{t}", "ms_per_step",
                    "step time with the model EMA updated every step / without")
                add(f"LAMB cost z{z}{ct}", f"fastdeit-lamb[z{z}]{c}{t}", f"fastdeit-student[z{z}]{c}{t}", "ms_per_step",
                    "step time with LAMB / with AdamW")
        for z in stages:
            add(f"compile speed-up z{z}{t}", f"fastdeit-student[z{z}]+compile{t}", f"fastdeit-student[z{z}]{t}",
                "img_per_sec", "student img/s compiled (engine.compile) / eager")
            add(f"compile speed-up distilled z{z}{t}", f"fastdeit[z{z}]+compile{t}", f"fastdeit[z{z}]{t}",
                "img_per_sec", "distillation img/s, student and teacher compiled / eager")
            add(f"engine.compile vs wrap z{z}{t}", f"fastdeit-student[z{z}]+compile{t}", f"wrap-compiled[z{z}]{t}",
                "ms_per_step", "step time with engine.compile() / with torch.compile before deepspeed.initialize")
        add(f"compile speed-up bare{t}", f"bare-student+compile{t}", f"bare-student{t}", "img_per_sec",
            "bare loop img/s compiled / eager")
    # Several sizes (data.size_schedule): each variant's speed-up at a smaller side over its
    # speed at the largest, next to what the patch-token and counted-FLOP ratios predict.
    for base in dict.fromkeys(r["base"] for r in rows if r["name"] != r["base"]):
        same = sorted((r for r in rows if r["base"] == base), key=lambda r: -r["img_size"])
        top = same[0]
        for r in same[1:]:
            add(f"{base} {top['img_size']}->{r['img_size']}", r["name"], top["name"], "img_per_sec",
                f"img/s at {r['img_size']} / img/s at {top['img_size']}")
            out[-1].update(token_ratio=(top["img_size"] // patch) ** 2 / (r["img_size"] // patch) ** 2,
                           flops_ratio=top["flops_per_image"] / r["flops_per_image"])
            out[-1]["meaning"] += (f"; patch tokens {out[-1]['token_ratio']:.2f}x fewer, "
                                   f"counted FLOPs {out[-1]['flops_ratio']:.2f}x fewer")
    return out


# --------------------------------------------------------------------------- reporting


COLUMNS = ["variant", "img/s", "ms/step (p25-p75)", "fwd / bwd / opt ms", "peak GiB", "GFLOP/img", "TFLOP/s", "MFU"]


def table_rows(rows: List[Dict[str, Any]], peak: float) -> List[List[str]]:
    out = []
    for r in rows:
        ph = r["ms_phases"]
        out.append([
            r["name"], f"{r['img_per_sec']:,.1f}", f"{r['ms_per_step']:,.1f} ({r['ms_p25']:,.1f}-{r['ms_p75']:,.1f})",
            f"{ph['forward']:,.1f} / {ph['backward']:,.1f} / {ph['optimizer']:,.1f}",
            common.fmt(r["peak_mem_gib"], 2), f"{r['flops_per_image'] / 1e9:,.2f}",
            f"{r['tflops_per_sec']:,.3f}", f"{100 * r['mfu']:.1f}%",
        ])
    return out


RATIO_COLUMNS = ["ratio", "median", "best", "of", "target", "meaning"]


def ratio_rows(rs: List[Dict[str, Any]]) -> List[List[str]]:
    return [[r["name"], f"{r['value']:.3f}", f"{r['value_best']:.3f}",
             f"{r['numerator']} / {r['denominator']} ({r['of']})", r.get("target", ""), r["meaning"]] for r in rs]


def markdown(record: Dict[str, Any]) -> str:
    st = record["settings"]
    peak = record["peak"]
    model = common.model_label(st["student"], st["model_kwargs"])
    lines = [common.record_header_md(record, f"Training step: {model} at {size_label(st)}px, batch {st['batch']}"),
             f"- settings: ZeRO {st['zero_stage']}, compile {st['compile']} ({st.get('compile_mode', 'default')}), teacher "
             f"{st['teacher']} ({st['teacher_format']}), mixing {'on' if st['mixing'] else 'off (label smoothing only)'}, "
             f"{st['warmup']} warm-up + {st['rounds']} rounds x {st['steps']} timed steps per variant, interleaved",
             f"- MFU peak: {peak['tflops']:,.3g} TFLOP/s per device ({peak['source']})"
             + (f"; datasheet {peak['datasheet_tflops']:,.0f}" if peak.get("datasheet_tflops") else ""),
             *([f"- {common.peak_memory_md(record['memory'])}"] if record.get("memory") else []),
             "", common.markdown_table(COLUMNS, table_rows(record["variants"], peak["tflops"])), "",
             common.markdown_table(RATIO_COLUMNS, ratio_rows(record["ratios"]), align="lrrlll"), "",
             "Ratios from the median step time (the headline) and from the best step time (what a "
             "step costs when nothing else competes for the host).", "",
             "Variants:", ""]
    lines += [f"- `{r['name']}`: {r['about']}" for r in record["variants"]]
    if record.get("notes"):
        lines += ["", *record["notes"]]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SIZES), default="b", help="DeiT size: ti, s or b (ViT-Ti/S/B for baseline A)")
    p.add_argument("--model-kwargs", default=None, help="JSON of extra timm args for every ViT, e.g. tiny debug models")
    p.add_argument("--batch", type=int, default=256, help="images per step (per device)")
    p.add_argument("--img-size", type=int, nargs="+", default=[224],
                   help="image side; several: every variant at each side in one interleaved run, the "
                        "fastdeit students built at --native-size and resampling their position "
                        "embedding per forward (data.size_schedule), plus speed ratios between sides")
    p.add_argument("--native-size", type=int, default=None,
                   help="with several --img-size: the students' native side (default: the largest)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--zero-stage", type=int, nargs="+", default=[1], choices=[0, 1, 2])
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                   help="compile the students and the teacher (not baseline B): on, or both = every variant "
                        "eager and compiled in the same run; fastdeit variants compile as the trainer does")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"])
    p.add_argument("--teacher", default="regnety_160")
    p.add_argument("--teacher-kwargs", default=None, help="JSON of extra timm args for the teacher")
    p.add_argument("--teacher-format", choices=["channels_last", "contiguous"], default="channels_last",
                   help="memory format of fastdeit's teacher (baseline B's is always NCHW)")
    p.add_argument("--mixing", action="store_true", help="Mixup/CutMix (+ erasing for fastdeit) inside the step")
    p.add_argument("--ref-amp", choices=["auto", "fp16", "bf16"], default="auto",
                   help="baseline B's autocast dtype; auto: fp16 on GPU (as published), bf16 on CPU")
    p.add_argument("--variants", nargs="+", default=["fastdeit", "fastdeit-student", "bare", "baseline-a", "baseline-b"],
                   choices=["fastdeit", "fastdeit-student", "ds-defaults", "fastdeit-ema", "fastdeit-lamb",
                            "wrap-compiled", "bare",
                            "baseline-a", "baseline-b"])
    p.add_argument("--ds-config", default=None,
                   help="JSON merged into fastdeit's DeepSpeed config (engine.deepspeed), e.g. "
                        "'{\"zero_optimization\": {\"overlap_comm\": true}}'")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all variants")
    p.add_argument("--rewarm", type=int, default=1, help="untimed steps per variant at the start of each round")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="MFU denominator per device; default: as training runs (data sheet, else measured)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); on a shared CPU host one "
                        "thread per free core avoids OpenMP threads waiting on a descheduled peer")
    p.add_argument("--out", default=str(common.RESULTS), help="directory for the JSON / markdown / PNG record")
    p.add_argument("--name", default=None, help="suffix of the record's file name")
    p.add_argument("--readme", default=None, help="also splice the table into this markdown file")
    args = p.parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        p.error("--batch must be even (Mixup pairs images)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device, record = common.start_run("step", args, argv)   # commit and time as the run starts
    for stage in args.zero_stage:                            # what the trainer refuses, refused here too
        engine_lib.check_device(engine_lib.EngineConfig(zero_stage=stage, precision="bf16"), torch.bfloat16, device)
    started = common.ensure_distributed()
    s = Setup(args, device)
    try:
        peak = common.PeakFlops(device, args.peak_tflops, torch.bfloat16)     # the variants' dtype
        common.print_flush(f"step benchmark on {device}: {s.student} family at "
                           f"{'/'.join(map(str, args.img_size))}px, batch {args.batch}")
        rows, run_peak = measure(s, peak, on_round=lambda rows, done: common.write_partial(
            fill_record(record, args, s, device, peak, rows, None, rounds_done=done), device, args))
    finally:
        s.close()
        if started:
            from fastdeit import distributed

            distributed.teardown()
    fill_record(record, args, s, device, peak, rows, run_peak, rounds_done=args.rounds)
    print_report(record)
    return common.save_record(record, markdown(record), chart, args, device, "step")


def fill_record(record: Dict[str, Any], args: argparse.Namespace, s: Setup, device: torch.device,
                peak: common.PeakFlops, rows: List[Dict[str, Any]], run_peak: Optional[Dict[str, Any]],
                rounds_done: int) -> Dict[str, Any]:
    """The record of the rows so far: complete once ``rounds_done`` is args.rounds."""
    for r in rows:
        r["mfu"] = r["tflops_per_sec"] * 1e12 / peak.flops
    record.update(
        settings={"student": s.student, "distilled": s.distilled, "vit": s.vit, "model_kwargs": s.model_kwargs,
                  "batch": args.batch, "img_size": args.img_size[0] if len(args.img_size) == 1 else args.img_size,
                  "native_size": s.native_size, "classes": args.classes,
                  "zero_stage": args.zero_stage, "compile": args.compile, "compile_mode": args.compile_mode,
                  "teacher": args.teacher,
                  "teacher_kwargs": s.teacher_kwargs, "teacher_format": args.teacher_format, "mixing": args.mixing,
                  "ref_amp": reference_amp(args.ref_amp, device), "ds_config": args.ds_config, "warmup": args.warmup, "steps": args.steps, "rewarm": args.rewarm,
                  "rounds": args.rounds},
        peak=peak.record(),
        memory=run_peak or {},
        variants=rows,
        ratios=ratios(rows, args.zero_stage, patch=int(s.model_kwargs.get("patch_size", 16))),
    )
    record["rounds_done"] = rounds_done
    record["partial"] = rounds_done < args.rounds
    if device.type != "cuda":
        record["notes"] = ["Peak memory per variant is GPU-only (n/a on CPU; the run's max RSS is above). "
                           "Baseline B autocasts to bf16 on CPU: "
                           "fp16 matmuls have no fast CPU path, so as published (fp16) it would measure emulation."]
    return record


def size_label(settings: Dict[str, Any]) -> str:
    size = settings["img_size"]
    return "/".join(map(str, size)) if isinstance(size, list) else str(size)


def print_report(record: Dict[str, Any]) -> None:
    common.print_flush("\n" + common.text_table(COLUMNS, table_rows(record["variants"], record["peak"]["tflops"])))
    common.print_flush(common.peak_memory_md(record["memory"]))
    if record["ratios"]:
        common.print_flush("\n" + common.text_table(RATIO_COLUMNS, ratio_rows(record["ratios"])))


def chart(record: Dict[str, Any], path: Path) -> Path:
    st = record["settings"]
    rows = record["variants"]
    hw = record["hardware"].get("gpu") or (f"CPU ({record['hardware']['cpu_cores']} cores, "
                                           f"{common.plural(record['hardware']['torch_threads'], 'torch thread')})")
    notes = [f"{record['date']} · {record['commit']} · {hw} · median of {rows[0]['steps_timed']} timed steps"]
    return common.bar_chart(
        [r["name"] for r in rows], [r["img_per_sec"] for r in rows], path,
        f"Training step, {common.model_label(st['student'], st['model_kwargs'])} at {size_label(st)}px, "
        f"batch {st['batch']}",
        highlight=[r["name"] for r in rows if r["kind"].startswith("fastdeit")], notes=notes)


if __name__ == "__main__":
    main()
