"""Composition root: turns a resolved ``Config`` into a ready ``Trainer``.

This is the one place below the entry point that sees the whole config; it hands each component
its own section plus the few derived values it needs (world size, class count, global batch).
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from fastdeit import distributed, ema as ema_lib, engine as engine_lib, flops as flops_lib, precision as precision_lib
from fastdeit import threads as threads_lib
from fastdeit.checkpoint import Checkpointer
from fastdeit.config import Config, save_config, to_dict
from fastdeit.data import build_loader
from fastdeit.data.augment.mixing import BatchMixer
from fastdeit.data.loading.loader import resolve_placement
from fastdeit.data.loading.schedule import SizeSchedule, size_schedule
from fastdeit.data.stage import stage_data
from fastdeit.errors import CheckpointMismatchError, ConfigError, DataError
from fastdeit.losses import DeiTLoss, check_loss_targets
from fastdeit.metrics import RunLogger, StepTelemetry
from fastdeit.models import (FrozenTeacher, build_student, build_teacher, compile_mode_for, count_params, is_distilled,
                             size_multiple)
from fastdeit.optim import build_optimizer, build_scheduler, check_clipping, check_zero_stage, scaled_lr
from fastdeit.step import StepParts
from fastdeit.trainer import RunServices, Trainer


def seed_everything(seed: int, rank: int) -> None:
    # Different streams per rank: drop-path, erasing and mixing must not repeat across ranks.
    s = seed + 1000 * rank
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def resolve_precisions(cfg: Config, device: torch.device):
    """(cfg with engine.precision and teacher.dtype decided for ``device``, {key: Precision}).

    'auto' becomes bf16 or fp32 here (fastdeit.precision); a resumed run keeps the engine
    precision its checkpoint recorded (precision.for_run). The frozen teacher is in no
    checkpoint: its dtype is decided afresh from the hardware each time.
    """
    state = Checkpointer.resume_state(cfg.checkpoint, cfg.trainer.run_dir)
    recorded = (state or {}).get("precision", {})
    try:
        engine = precision_lib.for_run(cfg.engine.precision, device, recorded.get("engine"), "engine.precision")
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{state['path']}: {e}") from None
    chosen = {"engine.precision": engine}
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, precision=engine.name))
    if cfg.distill.type != "none":
        teacher = precision_lib.resolve(cfg.teacher.dtype, device, "teacher.dtype")
        chosen["teacher.dtype"] = teacher
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, dtype=teacher.name))
    return cfg, chosen


# --------------------------------------------------------------------------- the step's parts
# What fastdeit.step.TrainStep computes with, in two halves so that a benchmark can count FLOPs
# or wrap the student between them exactly where build_trainer does (benchmarks/variants.py).


@dataclasses.dataclass
class StepModels:
    """The step's parts before DeepSpeed: the plain student on the device, the frozen teacher,
    the batch mixer, the loss, the EMA's eval copy and the training sizes."""

    student: nn.Module
    teacher: Optional[FrozenTeacher]     # None without distillation
    mixer: BatchMixer
    criterion: DeiTLoss
    ema_module: Optional[nn.Module]      # None with ema.decay = 0
    sizes: SizeSchedule
    dtype: torch.dtype                   # the engine's compute dtype
    device: torch.device
    load_notes: List[str] = dataclasses.field(default_factory=list)   # what model.init_weights loaded


def resolve_batch(cfg: Config, world_size: int) -> Tuple[int, int, int]:
    """(global, micro, accumulation) for ``world_size``, refusing the combinations the step
    cannot run (CUDA graphs over accumulated gradients, LAMB clipped twice, an optimizer the ZeRO
    stage cannot shard) before any data is staged or any model built."""
    global_batch, micro, accum = engine_lib.resolve_batch(cfg.engine, world_size)
    engine_lib.check_cuda_graphs(cfg.model.compile_mode if cfg.model.compile is not False else None,
                                 cfg.engine.zero_stage, accum)
    check_clipping(cfg.optim, cfg.engine.gradient_clipping)
    check_zero_stage(cfg.optim, cfg.engine.zero_stage)
    return global_batch, micro, accum


def build_models(cfg: Config, device: torch.device, num_classes: int, micro: int) -> StepModels:
    """The student, teacher, mixer and loss of a resolved ``cfg`` (engine.precision and
    teacher.dtype decided), in the order that fixes what the seeded generators give each."""
    dtype = engine_lib.model_dtype(cfg.engine)
    mixer = BatchMixer(cfg.mixing, num_classes, device, dtype=dtype)
    mixer.check_batch_size(micro)
    check_loss_targets(cfg.loss, cfg.mixing.label_smoothing, num_classes)
    criterion = DeiTLoss(cfg.distill, cfg.loss)

    # Other training sizes than data.img_size: the student resamples its position embedding.
    # What model.init_weights loaded, logged once the run's logger exists.
    notes: List[str] = []
    model = build_student(cfg.model, cfg.data.img_size, num_classes,
                          dynamic_img_size=cfg.data.size_schedule is not None, log=notes.append).to(device)
    sizes = size_schedule(cfg.data, size_multiple(model))
    if is_distilled(model) != criterion.needs_teacher:
        raise ConfigError(
            f"model.name={cfg.model.name} {'has' if is_distilled(model) else 'has no'} distillation "
            f"head but distill.type={cfg.distill.type}: use a *_distilled_* model with soft/hard, "
            "a plain one with none"
        )
    teacher = build_teacher(cfg.teacher, num_classes, device) if criterion.needs_teacher else None
    ema_lib.check_config(cfg.ema)
    if cfg.trainer.best_of == "ema" and not cfg.ema.decay:
        raise ConfigError("trainer.best_of=ema needs an EMA: set ema.decay (e.g. 0.99996)")
    # The EMA's eval module is copied from the plain student before DeepSpeed owns its weights.
    ema_module = ema_lib.eval_copy(model, dtype) if cfg.ema.decay else None
    return StepModels(student=model, teacher=teacher, mixer=mixer, criterion=criterion, ema_module=ema_module,
                      sizes=sizes, dtype=dtype, device=device, load_notes=notes)


def build_engine(cfg: Config, models: StepModels, world_size: int, steps_per_epoch: int,
                 student: Optional[nn.Module] = None) -> StepParts:
    """The DeepSpeed engine (compiled as model.compile says), its EMA and the per-step LR around
    ``models``: the parts fastdeit.step.TrainStep runs. ``student``: the module to wrap when it
    is not ``models.student`` itself (a benchmark's torch.compile wrapper of it)."""
    model = student if student is not None else models.student
    global_batch = engine_lib.resolve_batch(cfg.engine, world_size)[0]
    # After the student exists (and before ZeRO-3 empties its tensors): ZeRO's buckets are sized
    # from its parameter count.
    ds_config = engine_lib.deepspeed_config(cfg.engine, world_size, num_params=count_params(model))
    optimizer = build_optimizer(cfg.optim, model, global_batch)
    compile_mode = compile_mode_for(cfg.model.compile, cfg.model.compile_mode, models.device)
    # One static graph per training size (the eval pass runs eager): the recompile limit.
    engine = engine_lib.initialize(model, optimizer, ds_config, compile_mode,
                                   shapes=len(models.sizes.sizes(cfg.trainer.epochs)),
                                   grad_checkpointing=cfg.model.grad_checkpointing)
    ema = ema_lib.ModelEma(cfg.ema, engine, models.ema_module) if models.ema_module is not None else None
    scheduler = build_scheduler(cfg.schedule, engine.optimizer, steps_per_epoch, cfg.trainer.epochs)
    return StepParts(engine=engine, scheduler=scheduler, mixer=models.mixer, criterion=models.criterion,
                     teacher=models.teacher, ema=ema, dtype=models.dtype)


# --------------------------------------------------------------------------- the trainer


def build_trainer(cfg: Config, env: distributed.DistEnv) -> Trainer:
    device = distributed.device_for(env)
    cfg, precisions = resolve_precisions(cfg, device)
    dtype = engine_lib.model_dtype(cfg.engine)
    # Before anything is built: the combinations that would sync the host every step on CUDA.
    engine_lib.check_device(cfg.engine, dtype, device)
    threads = threads_lib.rank_budget(cfg.runtime, resolve_placement(cfg.data, device).gpu, device.type,
                                      cfg.data.num_threads, cfg.data.host_threads)
    threads_lib.apply_budget(threads)
    seed_everything(cfg.trainer.seed, env.rank)
    run_dir = Path(cfg.trainer.run_dir)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")      # with the precisions chosen, not 'auto'

    global_batch, micro, accum = resolve_batch(cfg, env.world_size)

    loader_args = dict(rank=env.rank, world_size=env.world_size, seed=cfg.trainer.seed, device=device,
                       threads=threads)
    # data.stage_to: this node's local copy (local rank 0 copies; every rank waits for all nodes).
    # The saved config keeps data.root: the copy is a per-node detail.
    data_cfg = stage_data(cfg.data, env)
    train_loader = build_loader(data_cfg, "train", micro, **loader_args)
    val_loader = build_loader(data_cfg, "val", micro, **loader_args)
    if val_loader.num_classes != train_loader.num_classes:
        raise DataError(f"{cfg.data.root}: train has {train_loader.num_classes} classes "
                         f"but val has {val_loader.num_classes}")
    num_classes = train_loader.num_classes

    models = build_models(cfg, device, num_classes, micro)
    sizes, teacher = models.sizes, models.teacher
    train_loader.sizes = sizes      # rounded to the student's patch size, known only now
    # Counted on meta-device copies before DeepSpeed wraps the student: no memory, no hooks.
    flops_by_size = flops_lib.train_flops_by_size(
        models.student, [cfg.data.img_size, *sizes.sizes(cfg.trainer.epochs)],
        teacher.module if teacher is not None else None)
    flops_per_image = flops_by_size[cfg.data.img_size]
    num_params = count_params(models.student)
    parts = build_engine(cfg, models, env.world_size, len(train_loader) // accum)
    ema = parts.ema
    compile_mode = compile_mode_for(cfg.model.compile, cfg.model.compile_mode, device)

    logger = RunLogger(cfg.logging, str(run_dir), env.is_main, config=to_dict(cfg))
    peak, peak_source = flops_lib.peak_flops(device, cfg.logging.peak_tflops, dtype)
    telemetry = StepTelemetry(flops_per_image, peak, cfg.logging.data_wait_warn, warn=logger.info,
                              flops_by_size=flops_by_size)
    fingerprint = {"model": cfg.model.name, "num_classes": num_classes, "img_size": cfg.data.img_size,
                   "zero_stage": cfg.engine.zero_stage}
    checkpointer = Checkpointer(cfg.checkpoint, str(run_dir), fingerprint, env.is_main, ema=ema,
                                precision={k.split(".")[0]: p.name for k, p in precisions.items()},
                                class_names=train_loader.classes)
    logger.info(
        f"{cfg.model.name}: {num_params:,} params | {num_classes} classes | world {env.world_size} "
        f"(master {env.master_addr}:{env.master_port}) | "
        f"batch {global_batch} = {micro} x {accum} x {env.world_size} | lr {scaled_lr(cfg.optim, global_batch):.2e} | "
        f"{len(train_loader) // accum} steps/epoch | distill {cfg.distill.type} | {device.type}"
        f" | compile {compile_mode or 'off'}" + (f" | EMA {cfg.ema.decay}" if ema is not None else "")
    )
    for note in models.load_notes:
        logger.info(note)
    logger.info(threads.describe())
    for key, chosen in precisions.items():
        logger.info(f"{'precision' if key == 'engine.precision' else 'teacher precision'}: {chosen.name} ({chosen.why})")
    slow = precision_lib.emulated_bf16_warning(device, [k for k, p in precisions.items() if p.name == "bf16"])
    if slow:
        logger.info(slow)
    for loader in (train_loader, val_loader):
        if loader.excluded:
            count, listed = loader.excluded
            logger.info(f"{loader.split}: {count} images left out, listed in {listed}")
    logger.info(f"MFU basis: {flops_per_image / 1e9:.2f} GFLOPs per trained image (counted), "
                f"peak {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")
    if not sizes.fixed:
        logger.info(f"training resolution: {sizes.describe(cfg.trainer.epochs)}; evaluation at "
                    f"{cfg.data.img_size} px; GFLOPs per trained image: "
                    + ", ".join(f"{s} px {f / 1e9:.2f}" for s, f in sorted(flops_by_size.items())))
    run = RunServices(train_loader=train_loader, val_loader=val_loader, logger=logger, checkpointer=checkpointer,
                      telemetry=telemetry, device=device, world_size=env.world_size,
                      log_every=cfg.logging.log_every)
    return Trainer(cfg.trainer, parts, run)
