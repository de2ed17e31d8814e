"""End-to-end training throughput from a JPEG folder: fastdeit's data path and engine against
the usual PyTorch pipeline, side by side in one run.

    python -m benchmarks.e2e --data /datasets/imagenet --model b --batch 256 --workers 8
    python -m benchmarks.e2e --model ti --batch 32 --workers 2      # generated JPEGs (CPU record)

Both sides read the same folder (``<data>/train``, class sub-folders), train the same model
size at the same batch and resolution with DeiT's augmentation recipe, and get the same
number of loader workers:

  fastdeit   fastdeit.data.build_loader: DALI decode, RandomResizedCrop bicubic and flip
             (on the GPU when there is one), batched RandAugment rand-m9-mstd0.5-inc1 and
             normalise, repeated augmentation x3, then BatchMixer on the device (random
             erasing, Mixup/CutMix, label smoothing) and fastdeit's engine step
             (benchmarks/step.py, student only, ZeRO --zero-stage, bf16).
  baseline   torchvision ImageFolder + PIL + timm.data.create_transform with DeiT's settings
             (RandomResizedCrop bicubic, flip, RandAugment, random erasing 0.25 'pixel', in
             the workers), a DataLoader with the same number of worker processes and pinned
             memory, timm's Mixup/CutMix on the device and the plain loop of baseline A
             (timm ViT, autocast bf16, torch AdamW, soft-target cross entropy).

Per side: sustained images/sec (timed images / wall time between device syncs, after warm-up;
epoch boundaries included), median step time, the share of time blocked waiting for the loader
(the same StepTelemetry as training runs), peak memory (GPU) and MFU. Both sides stay built
and alternate in rounds, so load from other processes hits both alike.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from benchmarks import common
from benchmarks.step import SIZES, FastdeitStep, Setup, ViTRecipeStep
from fastdeit.data import DataConfig, build_loader, scan_image_folder
from fastdeit.metrics import StepTelemetry

DEFAULT_DATA = common.ROOT / "data" / "bench-synthetic"


# --------------------------------------------------------------------------- loaders


def fastdeit_loader(args: argparse.Namespace, device: torch.device):
    # --workers DALI threads (decode, crop, resize) and, on CPU placement, as many host threads
    # for batched RandAugment + normalise; the DeiT recipe otherwise (repeated augmentation x3).
    cfg = DataConfig(root=args.data, img_size=args.img_size, num_threads=args.workers,
                     host_threads=args.workers)
    return build_loader(cfg, "train", args.batch, rank=0, world_size=1, seed=0, device=device)


def baseline_loader(args: argparse.Namespace, device: torch.device):
    """What a PyTorch DeiT/ViT user writes: ImageFolder + timm's DeiT transform + DataLoader."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(os.path.join(args.data, "train"), transform=common.deit_train_transform(args.img_size))
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        prefetch_factor=2 if args.workers > 0 else None)


def endless(loader) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Batches across epoch boundaries (set_epoch for fastdeit's loader, as the trainer does)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# --------------------------------------------------------------------------- one side


class Side:
    """One pipeline + step, kept alive across rounds. While the other side runs, this one's
    loader fills its prefetch queue and then blocks, so it steals no time; the first steps
    after a switch (``--rewarm``) drain that queue untimed."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device):
        self.name, self.device = name, device
        self.loader = fastdeit_loader(args, device) if name == "fastdeit" else baseline_loader(args, device)
        self.num_classes = self.loader.num_classes if name == "fastdeit" else len(self.loader.dataset.classes)
        setup = Setup(step_args(args, self.num_classes), device)
        torch.manual_seed(0)
        if name == "fastdeit":
            self.variant = FastdeitStep(setup, args.zero_stage, distill=False, compiled=args.compile)
            gpu = getattr(getattr(self.loader, "placement", None), "gpu", False)
            self.about = (f"DALI {'GPU' if gpu else 'CPU'} placement ({args.workers} DALI threads"
                          f"{'' if gpu else f', {args.workers} host threads'}) + repeated aug x3 + "
                          f"BatchMixer on {device.type} + DeepSpeed ZeRO-{args.zero_stage} bf16 step")
        else:
            self.variant = ViTRecipeStep(setup, mixup=True, compiled=args.compile)
            self.about = (f"ImageFolder + PIL + timm DeiT transform, DataLoader ({args.workers} worker "
                          f"processes{', pinned' if device.type == 'cuda' else ''}) + timm Mixup + "
                          "plain autocast bf16 loop")
        self.telemetry = StepTelemetry(warn=lambda message: None)
        self.batches = iter(self.telemetry.timed(_Endless(self.loader)))
        self.step_ms: List[float] = []
        self.images = 0
        self.wall = 0.0
        self.waited = 0.0

    def step(self) -> int:
        images, labels = next(self.batches)
        if images.device != self.device:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        self.variant.forward(images, labels)
        self.variant.backward()
        self.variant.update()
        return images.shape[0]

    def run(self, n: int, timed: bool) -> None:
        """n steps; when timed, their images, wall time (between device syncs), per-step host
        times and time blocked on the loader are added to this side's totals."""
        common.synchronize(self.device)
        self.telemetry.start_epoch()
        t0 = last = time.perf_counter()
        images = 0
        step_ms = []
        for _ in range(n):
            images += self.step()
            now = time.perf_counter()
            step_ms.append((now - last) * 1e3)
            last = now
        common.synchronize(self.device)
        if timed:
            self.wall += time.perf_counter() - t0
            self.images += images
            self.step_ms += step_ms
            self.waited += self.telemetry.waited

    def close(self) -> None:
        self.batches = None
        if hasattr(self.loader, "close"):
            self.loader.close()
        self.loader = self.variant = None
        gc.collect()


def measure(args: argparse.Namespace, device: torch.device, peak: common.PeakFlops,
            log=common.print_flush) -> List[Dict[str, Any]]:
    probe = common.MemoryProbe(device)
    sides: List[Side] = []
    mem: Dict[str, Dict[str, Any]] = {}
    try:
        for name in args.sides:
            before = probe.allocated()
            t0 = time.perf_counter()
            side = Side(name, args, device)
            side.run(args.warmup, timed=False)             # loader start-up, allocator, kernels
            mem[name] = {"resident": probe.allocated() - before if before is not None else None, "transient": 0}
            sides.append(side)
            log(f"  {name}: built and warmed up ({args.warmup} steps, {time.perf_counter() - t0:.1f} s)")
        for r in range(args.rounds):
            k = r % len(sides)
            for side in sides[k:] + sides[:k]:             # rotate: no side always goes first
                side.run(args.rewarm, timed=False)
                start = probe.start()
                side.run(args.steps, timed=True)
                transient = probe.transient(start)
                if transient is not None:
                    mem[side.name]["transient"] = max(mem[side.name]["transient"], transient)
            peak.sample()
            log(f"  round {r + 1}/{args.rounds} done")
        rows = []
        for side in sides:
            rate = side.images / side.wall
            resident = mem[side.name]["resident"]
            rows.append({
                "name": side.name, "about": side.about, "img_per_sec": rate, "wall_s": side.wall,
                "images": side.images, "ms_per_step": common.summarize(side.step_ms)["median"],
                "data_wait": min(side.waited / side.wall, 1.0),
                "peak_mem_gib": (resident + mem[side.name]["transient"]) / 2**30 if resident is not None else None,
                "flops_per_image": side.variant.flops_per_image,
                "tflops_per_sec": rate * side.variant.flops_per_image / 1e12,
                "steps_timed": len(side.step_ms), "num_classes": side.num_classes,
            })
            log(f"  {side.name}: {rate:,.1f} img/s, data wait {100 * rows[-1]['data_wait']:.0f}%")
        return rows
    finally:
        for side in sides:
            side.close()


class _Endless:
    """An iterable over ``endless(loader)``: TimedLoader calls iter() once, so every epoch
    boundary (DALI pipeline rebuild, DataLoader re-shuffle) lands inside the timed window."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return endless(self.loader)


def step_args(args: argparse.Namespace, num_classes: int) -> argparse.Namespace:
    """The slice of benchmarks.step's options its variants read."""
    return argparse.Namespace(
        model=args.model, model_kwargs=args.model_kwargs, batch=args.batch, img_size=args.img_size,
        classes=num_classes, teacher="none", teacher_kwargs=None, teacher_format="channels_last",
        mixing=True, ds_config=args.ds_config, compile="on" if args.compile else "off", compile_mode="default")


# --------------------------------------------------------------------------- report


COLUMNS = ["side", "img/s", "ms/step", "data wait", "peak GiB", "GFLOP/img", "MFU"]


def table_rows(rows: List[Dict[str, Any]]) -> List[List[str]]:
    return [[r["name"], f"{r['img_per_sec']:,.1f}", f"{r['ms_per_step']:,.1f}", f"{100 * r['data_wait']:.0f}%",
             common.fmt(r["peak_mem_gib"], 2), f"{r['flops_per_image'] / 1e9:,.2f}", f"{100 * r['mfu']:.1f}%"]
            for r in rows]


def ratio_rows(rs: List[Dict[str, Any]]) -> List[List[str]]:
    return [[r["name"], f"{r['value']:.3f}", f"{r['numerator']} / {r['denominator']} ({r['of']})", r["meaning"]]
            for r in rs]


def markdown(record: Dict[str, Any]) -> str:
    st = record["settings"]
    model = common.model_label(st["model"], st["model_kwargs"])
    lines = [common.record_header_md(record, f"End to end: {model} at {st['img_size']}px, batch {st['batch']}, "
                                              f"{common.plural(st['workers'], 'loader worker')}"),
             f"- data: {st['data']} ({st['train_images']} train images, {st['classes']} classes)",
             f"- timing: {st['warmup']} warm-up steps per side, then {st['rounds']} rounds alternating the sides, "
             f"each {st['rewarm']} untimed + {st['steps']} timed steps per side; img/s = timed images / wall "
             f"time between device syncs",
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
                            f"End to end from JPEGs, {common.model_label(st['model'], st['model_kwargs'])} at "
                            f"{st['img_size']}px, batch {st['batch']}, {common.plural(st['workers'], 'loader worker')}",
                            highlight=["fastdeit"], notes=notes)


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder with train/<class>/*.jpg; default: generated JPEGs")
    p.add_argument("--generate", default="10x300", help="classes x images per class to generate when --data is unset")
    p.add_argument("--model", choices=sorted(SIZES), default="b")
    p.add_argument("--model-kwargs", default=None, help="JSON of extra timm args, e.g. tiny debug models")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DALI threads for fastdeit, DataLoader worker processes for the baseline")
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--ds-config", default=None, help="JSON merged into fastdeit's DeepSpeed config")
    p.add_argument("--sides", nargs="+", default=["fastdeit", "baseline"], choices=["fastdeit", "baseline"])
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side after building it")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds alternating the sides")
    p.add_argument("--rewarm", type=int, default=3,
                   help="untimed steps per side at the start of each round: they drain the batches "
                        "its loader prefetched while the other side ran")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); on a shared CPU host one "
                        "thread per free core avoids OpenMP threads waiting on a descheduled peer")
    p.add_argument("--out", default=str(common.RESULTS))
    p.add_argument("--name", default=None)
    p.add_argument("--readme", default=None)
    args = p.parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        p.error("--batch must be even (Mixup pairs images)")
    return args


def ensure_data(args: argparse.Namespace) -> None:
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
    args = parse_args(argv)
    device, record = common.start_run("e2e", args, argv)   # commit and time as the run starts
    ensure_data(args)
    started = common.ensure_distributed()
    try:
        peak = common.PeakFlops(device, args.peak_tflops, torch.bfloat16)     # both sides train in bf16
        common.print_flush(f"e2e benchmark on {device}: {args.data}, deit_{SIZES[args.model]} at {args.img_size}px, "
                           f"batch {args.batch}, {args.workers} workers")
        rows = measure(args, device, peak)
    finally:
        if started:
            from fastdeit import distributed

            distributed.teardown()
    for r in rows:
        r["mfu"] = r["tflops_per_sec"] * 1e12 / peak.flops
    by = {r["name"]: r for r in rows}
    ratios = []
    if "fastdeit" in by and "baseline" in by:
        ratios.append({"name": "speed-up", "numerator": "fastdeit", "denominator": "baseline", "of": "img_per_sec",
                       "value": by["fastdeit"]["img_per_sec"] / by["baseline"]["img_per_sec"],
                       "meaning": "fastdeit end-to-end img/s / PyTorch ImageFolder+DataLoader pipeline img/s"})
    record.update(
        settings={"data": args.data, "model": f"deit_{SIZES[args.model]}", "model_kwargs": args.model_kwargs,
                  "batch": args.batch, "img_size": args.img_size, "workers": args.workers,
                  "zero_stage": args.zero_stage, "compile": args.compile, "ds_config": args.ds_config,
                  "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "rewarm": args.rewarm,
                  "classes": rows[0]["num_classes"],
                  "train_images": len(scan_image_folder(os.path.join(args.data, "train"))[0])},
        peak=peak.record(), sides=rows, ratios=ratios)
    if device.type != "cuda":
        record["notes"] = ["On CPU the loaders and the training step share the same cores, so this measures "
                           "total CPU cost per image; DALI runs its CPU graph here (no GPU decode). "
                           "Peak memory is GPU-only (n/a on CPU)."]
    common.print_flush("\n" + common.text_table(COLUMNS, table_rows(rows)))
    if ratios:
        common.print_flush("\n" + common.text_table(["ratio", "value", "of", "meaning"], ratio_rows(ratios)))
    return common.save_record(record, markdown(record), chart, args, device, "e2e")


if __name__ == "__main__":
    main()
