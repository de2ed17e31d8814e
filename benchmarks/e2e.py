"""End-to-end training throughput from a JPEG folder: fastdeit's data path and engine against
the usual PyTorch pipeline, side by side in one run.

    python -m benchmarks.e2e --data /datasets/imagenet --model b --batch 256 --workers 8
    python -m benchmarks.e2e --model ti --batch 32 --workers 2      # generated JPEGs (CPU record)
    python -m benchmarks.e2e --data /datasets/imagenet --model b --teacher regnety_160   # DeiT-B distilled

Both sides read the same folder (``<data>/train``, class sub-folders), train the same model
size at the same batch and resolution with DeiT's augmentation recipe, and get the same
number of loader workers:

  fastdeit   fastdeit.data.build_loader: DALI decode, RandomResizedCrop bicubic and flip
             (on the GPU when there is one), batched RandAugment rand-m9-mstd0.5-inc1 and
             normalise, repeated augmentation x3, then BatchMixer on the device (random
             erasing, Mixup/CutMix, label smoothing) and fastdeit's engine step
             (benchmarks/variants.py: the trainer's own step, ZeRO --zero-stage, in --precision:
             auto = bf16 where the device runs it natively, else fp32): the student alone, or
             with --teacher the distilled student and the frozen channels-last teacher.
  baseline   torchvision ImageFolder + PIL + timm.data.create_transform with DeiT's settings
             (RandomResizedCrop bicubic, flip, RandAugment, random erasing 0.25 'pixel', in
             the workers), a DataLoader with the same number of worker processes and pinned
             memory, then the step: without a teacher timm's Mixup/CutMix on the device and
             the plain loop of baseline A (timm ViT, autocast bf16, torch AdamW, soft-target
             cross entropy); with --teacher the DeiT reference step of baseline B (timm Mixup,
             fp16 autocast + GradScaler, fp32 NCHW teacher, loss.item() every step).

Per side: sustained images/sec in steady state (timed images / wall time between device
syncs, after warm-up), median step time, the share of time blocked waiting for the loader,
peak memory (GPU) and MFU. Both sides stay built and alternate in rounds, so load from other
processes hits both alike.

Epoch boundaries are never timed: a timed window that would cross one starts in the next epoch
instead. The boundary (DALI's per-epoch pipeline rebuild and nvJPEG preallocation, the
DataLoader's queue refill) is reported on its own line: the host time blocked at an epoch's
first batch, against the median blocked time of a steady step. On a small benchmark folder an
epoch is a few dozen batches, so a boundary inside the timed window would weigh hundreds of
times what it does over an ImageNet epoch (5,000 batches of 256).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from benchmarks import common
from benchmarks.common import opt
from benchmarks.variants import (SIZES, DeiTReferenceStep, FastdeitStep, Setup, StepSettings, ViTRecipeStep,
                                 bench_precision)
from fastdeit.data import DataConfig, build_loader, scan_image_folder

DEFAULT_DATA = common.ROOT / "data" / "bench-synthetic"


@dataclass
class E2ESettings:
    """What the two sides are built from: the CLI's options, less the harness's."""

    data: Optional[str] = opt(None, "folder with train/<class>/*.jpg; default: generated JPEGs")
    generate: str = opt("10x300", "classes x images per class to generate when --data is unset")
    model: str = opt("b", choices=sorted(SIZES))
    model_kwargs: Dict[str, Any] = opt({}, "JSON of extra timm args, e.g. tiny debug models")
    batch: int = 256
    img_size: int = 224
    workers: int = opt(lambda: min(8, os.cpu_count() or 1),
                       "DALI threads for fastdeit, DataLoader worker processes for the baseline")
    zero_stage: int = opt(1, choices=[0, 1, 2])
    compile: bool = False
    teacher: str = opt("none", "a timm model name: distilled DeiT (the student's distillation token, hard "
                       "distillation) against the DeiT reference step; none: the student alone")
    teacher_kwargs: Dict[str, Any] = opt({}, "JSON of extra timm args for the teacher")
    precision: str = opt("auto", "both sides' compute dtype: bf16 or fp32; auto as the trainer's "
                          "engine.precision (bf16 where the device runs it natively, else fp32)",
                          choices=["auto", "bf16", "fp32"])
    ref_amp: str = opt("auto", "with --teacher, the reference step's autocast dtype; auto: fp16 on GPU (as "
                       "published), else --precision's", choices=["auto", "fp16", "bf16"])
    ds_config: Dict[str, Any] = opt({}, "JSON merged into fastdeit's DeepSpeed config")
    sides: List[str] = opt(["fastdeit", "baseline"], choices=["fastdeit", "baseline"])

    def __post_init__(self):
        if self.batch < 2 or self.batch % 2:
            raise ValueError("--batch must be even (Mixup pairs images)")

    def step_settings(self, num_classes: int) -> StepSettings:
        """The slice of the step benchmark's settings its variants read."""
        return StepSettings(
            model=self.model, model_kwargs=self.model_kwargs, batch=self.batch, img_size=[self.img_size],
            classes=num_classes, teacher=self.teacher, teacher_kwargs=self.teacher_kwargs, mixing=True,
            ds_config=self.ds_config, compile="on" if self.compile else "off", precision=self.precision,
            ref_amp=self.ref_amp)


@dataclass
class E2ERun:
    settings: E2ESettings
    rounds: common.Rounds
    run: common.RunSettings


# --------------------------------------------------------------------------- loaders


def fastdeit_loader(args: E2ESettings, device: torch.device):
    # --workers DALI threads (decode, crop, resize) and, on CPU placement, as many host threads
    # for batched RandAugment + normalise; the DeiT recipe otherwise (repeated augmentation x3).
    cfg = DataConfig(root=args.data, img_size=args.img_size, num_threads=args.workers,
                     host_threads=args.workers)
    return build_loader(cfg, "train", args.batch, rank=0, world_size=1, seed=0, device=device)


def baseline_loader(args: E2ESettings, device: torch.device):
    """What a PyTorch DeiT/ViT user writes: ImageFolder + timm's DeiT transform + DataLoader."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(os.path.join(args.data, "train"), transform=common.deit_train_transform(args.img_size))
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        prefetch_factor=2 if args.workers > 0 else None)


# --------------------------------------------------------------------------- one side


class Side:
    """One pipeline + step, kept alive across rounds. While the other side runs, this one's
    loader fills its prefetch queue and then blocks, so it steals no time; the first steps
    after a switch (``--rewarm``) drain that queue untimed.

    Epochs are walked here (set_epoch, then one pass), as the trainer does, so that every epoch
    boundary is seen: ``window`` never lets one fall inside a timed window, and the host time
    blocked at each epoch's first batch (after the first epoch) is kept apart."""

    def __init__(self, name: str, args: E2ESettings, device: torch.device):
        self.name, self.device = name, device
        self.loader = fastdeit_loader(args, device) if name == "fastdeit" else baseline_loader(args, device)
        self.num_classes = self.loader.num_classes if name == "fastdeit" else len(self.loader.dataset.classes)
        self.setup = Setup(args.step_settings(self.num_classes), device)
        self.distilled = args.teacher != "none"
        torch.manual_seed(0)
        if name == "fastdeit":
            self.variant = FastdeitStep(self.setup, args.zero_stage, distill=self.distilled, compiled=args.compile)
            gpu = getattr(getattr(self.loader, "placement", None), "gpu", False)
            self.about = (f"DALI {'GPU' if gpu else 'CPU'} placement ({args.workers} DALI threads"
                          f"{'' if gpu else f', {args.workers} host threads'}) + repeated aug x3 + "
                          f"BatchMixer on {device.type} + DeepSpeed ZeRO-{args.zero_stage} {self.variant.compute_dtype} step"
                          + (f", distilled student + frozen {self.variant.compute_dtype} channels_last {args.teacher} teacher"
                             if self.distilled else ""))
        else:
            loader = (f"ImageFolder + PIL + timm DeiT transform, DataLoader ({args.workers} worker "
                      f"processes{', pinned' if device.type == 'cuda' else ''}) + timm Mixup + ")
            if self.distilled:
                self.variant = DeiTReferenceStep(self.setup)
                self.about = loader + (f"DeiT reference step ({self.variant.compute_dtype}"
                                       f"{' autocast' if self.variant.amp_dtype else ''} + GradScaler, fp32 NCHW "
                                       f"{args.teacher} teacher, loss.item() + sync every step)")
            else:
                self.variant = ViTRecipeStep(self.setup, mixup=True, compiled=args.compile)
                self.about = loader + ("plain autocast bf16 loop" if self.setup.autocast else "plain fp32 loop")
        self.per_epoch = len(self.loader)
        self.epoch, self.left, self.batches = -1, 0, None
        self.step_ms: List[float] = []
        self.waits_ms: List[float] = []          # timed steps: host time blocked in next()
        self.boundary_ms: List[float] = []       # each later epoch's first batch (untimed)
        self.images = 0
        self.wall = 0.0
        self.waited = 0.0

    def next_batch(self):
        """(images, labels, seconds blocked); a new epoch when this one is used up."""
        t0 = time.perf_counter()
        boundary = self.left == 0
        if boundary:
            self.epoch += 1
            if self.name == "fastdeit":      # as the trainer: the next epoch's batches made ahead
                self.loader.set_epoch(self.epoch, then=self.epoch + 1)
            elif hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(self.epoch)
            self.batches, self.left = iter(self.loader), self.per_epoch
        images, labels = next(self.batches)
        self.left -= 1
        wait = time.perf_counter() - t0
        if boundary and self.epoch > 0:
            self.boundary_ms.append(wait * 1e3)
        return images, labels, wait

    def step(self):
        images, labels, wait = self.next_batch()
        if images.device != self.device:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        self.variant(images, labels)
        return images.shape[0], wait

    def run(self, n: int, timed: bool) -> None:
        """n steps; when timed, their images, wall time (between device syncs), per-step host
        times and time blocked on the loader are added to this side's totals."""
        common.synchronize(self.device)
        t0 = last = time.perf_counter()
        images, waited = 0, 0.0
        step_ms, waits_ms = [], []
        for _ in range(n):
            batch, wait = self.step()
            images += batch
            waited += wait
            now = time.perf_counter()
            step_ms.append((now - last) * 1e3)
            waits_ms.append(wait * 1e3)
            last = now
        common.synchronize(self.device)
        if timed:
            self.wall += time.perf_counter() - t0
            self.images += images
            self.step_ms += step_ms
            self.waits_ms += waits_ms
            self.waited += waited

    def window(self, rewarm: int, steps: int) -> None:
        """``rewarm`` untimed steps then ``steps`` timed ones, all inside one epoch: if they
        would cross a boundary, the rest of this epoch and the boundary go untimed first."""
        if self.left < rewarm + steps:
            self.run(self.left, timed=False)
            rewarm = max(rewarm, 1)               # the next epoch's first batch: the boundary
        self.run(rewarm, timed=False)
        self.run(steps, timed=True)

    def close(self) -> None:
        self.batches = None
        if hasattr(self.loader, "close"):
            self.loader.close()
        self.setup.close()
        self.loader = self.variant = None
        gc.collect()


def measure(cli: E2ERun, device: torch.device, peak: common.PeakFlops,
            log=common.print_flush, on_round=None) -> List[Dict[str, Any]]:
    """A row per side; ``on_round(rows, rounds_done)`` gets the rows so far after every round."""
    args, rd = cli.settings, cli.rounds
    runs = common.Interleaved(device, log)

    def warm(side: Side) -> None:
        if side.per_epoch < rd.steps + max(rd.rewarm, 1):
            raise SystemExit(f"--steps {rd.steps} + --rewarm {max(rd.rewarm, 1)}: more than one epoch of "
                             f"{args.data}/train for {side.name} ({side.per_epoch} batches of {args.batch}); "
                             "a timed window must fit inside an epoch: more images or fewer steps")
        t0 = time.perf_counter()
        side.run(rd.warmup, timed=False)             # loader start-up, allocator, kernels
        log(f"  {side.name}: built and warmed up ({rd.warmup} steps, {time.perf_counter() - t0:.1f} s)")

    try:
        for name in args.sides:
            runs.build(lambda name=name: Side(name, args, device), warm)
        runs.run(rd.rounds, lambda side: side.window(rd.rewarm, rd.steps), peak,
                 on_round and (lambda done: on_round(side_rows(runs), done)))
        rows = side_rows(runs)
        for row in rows:
            log(f"  {row['name']}: {row['img_per_sec']:,.1f} img/s, data wait {100 * row['data_wait']:.0f}%")
        return rows
    finally:
        for side in runs.built:
            side.close()


def side_rows(runs: common.Interleaved) -> List[Dict[str, Any]]:
    rows = []
    for side in runs.built:
        rate = side.images / side.wall
        boundary = common.summarize(side.boundary_ms)["median"] if side.boundary_ms else None
        rows.append({
            "name": side.name, "about": side.about, "img_per_sec": rate, "wall_s": side.wall,
            "images": side.images, "ms_per_step": common.summarize(side.step_ms)["median"],
            "data_wait": min(side.waited / side.wall, 1.0),
            "peak_mem_gib": runs.peak_mem_gib(side.name),
            "flops_per_image": side.variant.flops_per_image, "compute_dtype": side.variant.compute_dtype,
            "distilled": side.distilled,
            "tflops_per_sec": rate * side.variant.flops_per_image / 1e12,
            "steps_timed": len(side.step_ms), "num_classes": side.num_classes,
            "batches_per_epoch": side.per_epoch, "epochs_seen": side.epoch + 1,
            "boundaries": len(side.boundary_ms), "boundary_wait_ms": boundary,
            "steady_wait_ms": common.summarize(side.waits_ms)["median"],
        })
    return rows


# --------------------------------------------------------------------------- report


COLUMNS = ["side", "img/s", "ms/step", "data wait", "peak GiB", "GFLOP/img", "MFU"]


def table_rows(rows: List[Dict[str, Any]]) -> List[List[str]]:
    return [[r["name"], f"{r['img_per_sec']:,.1f}", f"{r['ms_per_step']:,.1f}", f"{100 * r['data_wait']:.0f}%",
             common.fmt(r["peak_mem_gib"], 2), f"{r['flops_per_image'] / 1e9:,.2f}", f"{100 * r['mfu']:.1f}%"]
            for r in rows]


def ratio_rows(rs: List[Dict[str, Any]]) -> List[List[str]]:
    return [[r["name"], f"{r['value']:.3f}", f"{r['numerator']} / {r['denominator']} ({r['of']})", r["meaning"]]
            for r in rs]


def boundary_lines(rows: List[Dict[str, Any]]) -> List[str]:
    """One line per side: what an epoch boundary costs, measured outside the timed windows."""
    out = []
    for r in rows:
        if r["boundary_wait_ms"] is None:
            out.append(f"- epoch boundary, {r['name']}: not crossed ({r['batches_per_epoch']} batches per epoch)")
            continue
        out.append(f"- epoch boundary, {r['name']}: {r['boundary_wait_ms']:,.1f} ms blocked at an epoch's first "
                   f"batch (median of {r['boundaries']}; steady steps {r['steady_wait_ms']:,.1f} ms), every "
                   f"{r['batches_per_epoch']} batches here, untimed")
    return out


def title(st: Dict[str, Any]) -> str:
    model = common.model_label(st["model"], st["model_kwargs"])
    distilled = st.get("teacher", "none") != "none"
    return (f"End to end: {model}{' distilled (teacher ' + st['teacher'] + ')' if distilled else ''} at "
            f"{st['img_size']}px, batch {st['batch']}, {common.plural(st['workers'], 'loader worker')}")


def markdown(record: Dict[str, Any]) -> str:
    st = record["settings"]
    lines = [common.record_header_md(record, title(st)),
             f"- data: {st['data']} ({st['train_images']} train images, {st['classes']} classes)",
             f"- timing: {st['warmup']} warm-up steps per side, then {st['rounds']} rounds alternating the sides, "
             f"each {st['rewarm']} untimed + {st['steps']} timed steps per side, never across an epoch "
             f"boundary; img/s = timed images / wall time between device syncs",
             *boundary_lines(record["sides"]),
             f"- MFU peak: {record['peak']['tflops']:,.3g} TFLOP/s per device ({record['peak']['source']})",
             "", common.markdown_table(COLUMNS, table_rows(record["sides"])), "",
             common.markdown_table(["ratio", "value", "of", "meaning"], ratio_rows(record["ratios"]), align="lrll"),
             "", "Sides:", ""]
    lines += [f"- `{r['name']}`: {r['about']}" for r in record["sides"]]
    if record.get("notes"):
        lines += ["", *record["notes"]]
    return "\n".join(lines)


def chart(record: Dict[str, Any], path: Path) -> Path:
    st = record["settings"]
    rows = record["sides"]
    hw = record["hardware"].get("gpu") or (f"CPU ({record['hardware']['cpu_cores']} cores, "
                                           f"{common.plural(record['hardware']['torch_threads'], 'torch thread')})")
    notes = [f"{record['date']} · {record['commit']} · {hw} · {rows[0]['steps_timed']} timed steps per side · "
             + " · ".join(f"{r['name']} data wait {100 * r['data_wait']:.0f}%" for r in rows)]
    return common.bar_chart([r["name"] for r in rows], [r["img_per_sec"] for r in rows], path,
                            title(st).replace("End to end:", "End to end from JPEGs:"),
                            highlight=["fastdeit"], notes=notes)


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> E2ERun:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_fields(p, E2ESettings)
    common.add_fields(p, common.Rounds, defaults={"warmup": 5, "rewarm": 3}, help={
        "warmup": "untimed steps per side after building it", "steps": "timed steps per side per round",
        "rounds": "rounds alternating the sides",
        "rewarm": "untimed steps per side at the start of each round: they drain the batches its loader "
                  "prefetched while the other side ran"})
    common.add_fields(p, common.RunSettings)
    a = p.parse_args(argv)
    try:
        settings = common.from_args(E2ESettings, a)
    except ValueError as e:
        p.error(str(e))
    return E2ERun(settings, common.from_args(common.Rounds, a), common.from_args(common.RunSettings, a))


def ensure_data(args: E2ESettings) -> None:
    if args.data is not None:
        if not os.path.isdir(os.path.join(args.data, "train")):
            raise SystemExit(f"{args.data}/train does not exist (expected class sub-folders of JPEGs)")
        return
    from fastdeit.data.synthetic import generate

    classes, per_class = (int(x) for x in args.generate.lower().split("x"))
    args.data = str(DEFAULT_DATA / f"{classes}x{per_class}")
    generate(args.data, classes=classes, train_per_class=per_class, val_per_class=1, min_size=200, max_size=500,
             seed=0, quality=90)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = parse_args(argv)
    args = cli.settings
    device, record = common.start_run("e2e", cli.run, argv)   # commit and time as the run starts
    ensure_data(args)
    with common.world_of_one():
        chosen = bench_precision(args.precision, device)
        peak = common.PeakFlops(device, cli.run.peak_tflops, chosen.dtype)     # both sides train in this dtype
        common.print_flush(f"precision: {chosen.name} ({chosen.why})")
        common.print_flush(f"e2e benchmark on {device}: {args.data}, deit_{SIZES[args.model]} at {args.img_size}px, "
                           f"batch {args.batch}, {args.workers} workers")
        rows = measure(cli, device, peak, on_round=lambda rows, done: common.write_partial(
            fill_record(record, cli, peak, rows, done), device, cli.run))
    fill_record(record, cli, peak, rows, cli.rounds.rounds)
    common.print_flush("\n" + common.text_table(COLUMNS, table_rows(rows)))
    common.print_flush("\n".join(boundary_lines(rows)))
    if record["ratios"]:
        common.print_flush("\n" + common.text_table(["ratio", "value", "of", "meaning"], ratio_rows(record["ratios"])))
    return common.save_record(record, markdown(record), chart, cli.run, device, "e2e")


def fill_record(record: Dict[str, Any], cli: E2ERun, peak: common.PeakFlops,
                rows: List[Dict[str, Any]], rounds_done: int) -> Dict[str, Any]:
    """The record of the rows so far: complete once ``rounds_done`` is the rounds asked for."""
    args, rd = cli.settings, cli.rounds
    for r in rows:
        r["mfu"] = r["tflops_per_sec"] * 1e12 / peak.flops
    by = {r["name"]: r for r in rows}
    ratios = []
    if "fastdeit" in by and "baseline" in by:
        ratios.append({"name": "speed-up", "numerator": "fastdeit", "denominator": "baseline", "of": "img_per_sec",
                       "value": by["fastdeit"]["img_per_sec"] / by["baseline"]["img_per_sec"],
                       "meaning": ("fastdeit distilled end-to-end img/s / DeiT reference (ImageFolder+DataLoader, "
                                   "reference step) img/s" if args.teacher != "none" else
                                   "fastdeit end-to-end img/s / PyTorch ImageFolder+DataLoader pipeline img/s")})
    record.update(
        settings={"data": args.data, "model": f"deit_{SIZES[args.model]}", "model_kwargs": args.model_kwargs,
                  "batch": args.batch, "img_size": args.img_size, "workers": args.workers,
                  "zero_stage": args.zero_stage, "compile": args.compile,
                  "ds_config": json.dumps(args.ds_config) if args.ds_config else None,
                  "teacher": args.teacher, "teacher_kwargs": args.teacher_kwargs,
                  "precision": peak.record().get("dtype"),
                  "warmup": rd.warmup, "steps": rd.steps, "rounds": rd.rounds, "rewarm": rd.rewarm,
                  "classes": rows[0]["num_classes"],
                  "train_images": record.get("settings", {}).get("train_images")
                  or len(scan_image_folder(os.path.join(args.data, "train"))[0])},
        peak=peak.record(), sides=rows, ratios=ratios, rounds_done=rounds_done, partial=rounds_done < rd.rounds)
    if record["hardware"]["device"] != "cuda":
        record["notes"] = ["On CPU the loaders and the training step share the same cores, so this measures "
                           "total CPU cost per image; DALI runs its CPU graph here (no GPU decode). "
                           "Peak memory is GPU-only (n/a on CPU)."]
    return record


if __name__ == "__main__":
    main()
