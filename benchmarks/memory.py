"""Memory of one train pipeline and of one distilled training step, measured.

    python -m benchmarks.memory pipeline --data /tmp/inet --batch 256 [--no-prealloc]
    python -m benchmarks.memory step --model b --batch 256
    python -m benchmarks.memory plan --config configs/deit3_l.yaml --gpu-mem 80GB --gpus 8   (benchmarks/memplan.py)

``pipeline``: one rank's train loader as training builds it (DALI graph on the GPU when there is
one, the rank's thread budget, RandAugment + normalisation on the device), three epochs of
``--batches`` batches each, every epoch a fresh DALI pipeline as in training. Per epoch: device
memory in use (cudaMemGetInfo: DALI's pools, nvJPEG's buffers, CUDA contexts and torch's cache
together), what torch's allocator holds of it, and the process's resident set (pinned host
buffers are resident). The first epoch shows the cost of a pipeline against the
preallocation predicted by fastdeit.data.loading.pipeline.preallocated_bytes; later epochs should add
nothing (DALI's pools hand the freed buffers to the next epoch's pipeline).

``step``: the trainer's step (benchmarks.variants.FastdeitStep: distilled student, frozen
RegNetY-16GF teacher, DeepSpeed ZeRO bf16 with buckets sized from the student) alone in the
process: memory after building (weights, teacher, engine), after the warm-up steps (plus
optimizer state, ZeRO buckets, allocator cache) and the peak during the timed steps. On CPU
the figures are the process's resident set and its high-water mark.

Writes one JSON record to ``--out`` (a file path) and prints a summary line per measurement.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import common
from benchmarks.common import opt

GIB = 2**30


@dataclass
class PipelineSettings:
    """``memory pipeline``: one rank's train loader over a few epochs."""

    data: str = opt(dataclasses.MISSING, "folder holding train/<class>/*.jpg")
    batch: int = 256
    img_size: int = 224
    batches: int = opt(20, "batches per epoch")
    epochs: int = 3
    threads: Optional[int] = opt(None, "DALI threads (default: the rank's budget)")
    no_prealloc: bool = opt(False, "data.decoder_preallocate=false")


@dataclass
class StepMemorySettings:
    """``memory step``: the distilled training step alone."""

    model: str = opt("b", choices=["ti", "s", "b"])
    model_kwargs: Dict[str, Any] = opt({})
    teacher: str = "regnety_160"
    teacher_kwargs: Dict[str, Any] = opt({})
    batch: int = 256
    img_size: int = 224
    classes: int = 1000
    zero_stage: int = opt(1, choices=[0, 1, 2])
    warmup: int = 3
    steps: int = 5

    def step_settings(self):
        from benchmarks.variants import StepSettings

        return StepSettings(model=self.model, model_kwargs=self.model_kwargs, batch=self.batch,
                            img_size=[self.img_size], classes=self.classes, zero_stage=[self.zero_stage],
                            teacher=self.teacher, teacher_kwargs=self.teacher_kwargs, variants=["fastdeit"])


def snapshot(device: torch.device) -> Dict[str, Optional[float]]:
    """Memory now, in GiB: the device's used memory and torch's share of it (CUDA), the
    process's resident set and its peak so far."""
    out: Dict[str, Optional[float]] = {"rss_gib": _rss_bytes() / GIB, "max_rss_gib": common.max_rss_bytes() / GIB,
                                       "device_used_gib": None, "torch_reserved_gib": None,
                                       "torch_peak_allocated_gib": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        out.update(device_used_gib=(total - free) / GIB,
                   torch_reserved_gib=torch.cuda.memory_reserved(device) / GIB,
                   torch_peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GIB)
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def diff(after: Dict[str, Optional[float]], before: Dict[str, Optional[float]], key: str) -> Optional[float]:
    if after.get(key) is None or before.get(key) is None:
        return None
    return after[key] - before[key]


# --------------------------------------------------------------------------- pipeline


def measure_pipeline(args: PipelineSettings, device: torch.device) -> Dict[str, Any]:
    from fastdeit.data import DataConfig, build_loader
    from fastdeit.data.loading.pipeline import preallocated_bytes

    if device.type == "cuda":
        torch.zeros(1, device=device)              # the CUDA context belongs to the baseline
    cfg = DataConfig(root=args.data, img_size=args.img_size, decoder_preallocate=not args.no_prealloc,
                     **({"num_threads": args.threads} if args.threads else {}))
    start = snapshot(device)
    loader = build_loader(cfg, "train", args.batch, 0, 1, 0, device)
    threads = loader.cfg.num_threads
    predicted = preallocated_bytes(loader.cfg, threads) if loader.placement.gpu else (0, 0)
    epochs: List[Dict[str, Any]] = []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for i, (images, _) in enumerate(loader):
            if i + 1 >= args.batches:
                break
        del images
        now = snapshot(device)
        epochs.append({"epoch": epoch, **now,
                       "device_used_delta_gib": diff(now, start, "device_used_gib"),
                       "rss_delta_gib": diff(now, start, "rss_gib")})
        common.print_flush(f"  epoch {epoch}: device +{common.fmt(epochs[-1]['device_used_delta_gib'], 2)} GiB, "
                           f"RSS +{epochs[-1]['rss_delta_gib']:.2f} GiB over the start")
    loader.close()
    first, last = epochs[0], epochs[-1]
    return {
        "what": "pipeline", "dali_on_gpu": loader.placement.gpu, "dali_threads": threads,
        "batch": args.batch, "batches_per_epoch": args.batches, "img_size": args.img_size,
        "decoder_preallocate": cfg.decoder_preallocate, "decoder_max_image": list(cfg.decoder_max_image),
        "predicted_prealloc_device_gib": predicted[0] / GIB, "predicted_prealloc_pinned_gib": predicted[1] / GIB,
        "start": start, "epochs": epochs,
        "first_epoch_device_gib": first["device_used_delta_gib"], "first_epoch_rss_gib": first["rss_delta_gib"],
        # What later epochs add on top of the first: ~0 when DALI's pools serve the rebuilt pipelines.
        "later_epochs_device_growth_gib": diff(last, first, "device_used_gib"),
        "later_epochs_rss_growth_gib": diff(last, first, "rss_gib"),
    }


# --------------------------------------------------------------------------- step


def measure_step(args: StepMemorySettings, device: torch.device) -> Dict[str, Any]:
    from benchmarks.variants import FastdeitStep, Setup

    s = Setup(args.step_settings(), device)
    try:
        with common.world_of_one():
            start = snapshot(device)
            v = FastdeitStep(s, args.zero_stage, distill=True)
            built = snapshot(device)
            for _ in range(args.warmup):
                v(s.fresh_images(), s.labels)
            warm = snapshot(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.steps):
                v(s.fresh_images(), s.labels)
            end = snapshot(device)
            zero = getattr(v.engine, "optimizer", None)
            buckets = {k: getattr(zero, k, None) for k in ("reduce_bucket_size", "allgather_bucket_size")}
            params = sum(p.numel() for p in v.engine.module.parameters())
    finally:
        s.close()
    cuda = device.type == "cuda"
    return {
        "what": "step", "model": s.distilled, "teacher": args.teacher, "batch": args.batch,
        "img_size": args.img_size, "zero_stage": args.zero_stage, "student_params": params, **buckets,
        "start": start, "built": built, "warm": warm, "end": end,
        # CUDA: torch's allocator (everything the step holds); CPU: the process's resident set.
        "resident_after_build_gib": (built["torch_reserved_gib"] if cuda else diff(built, start, "rss_gib")),
        "resident_after_warmup_gib": (warm["torch_reserved_gib"] if cuda else diff(warm, start, "rss_gib")),
        "peak_allocated_gib": end["torch_peak_allocated_gib"] if cuda else None,
        "device_used_gib": end["device_used_gib"],
        "max_rss_gib": end["max_rss_gib"],
    }


def summary_line(rec: Dict[str, Any]) -> str:
    f = common.fmt
    if rec["what"] == "pipeline":
        return (f"train pipeline ({'DALI on GPU' if rec['dali_on_gpu'] else 'DALI on CPU'}, {rec['dali_threads']} "
                f"threads, batch {rec['batch']}, preallocate {'on' if rec['decoder_preallocate'] else 'off'}): "
                f"first epoch device +{f(rec['first_epoch_device_gib'], 2)} GiB (predicted nvJPEG "
                f"{rec['predicted_prealloc_device_gib']:.2f}), RSS +{rec['first_epoch_rss_gib']:.2f} GiB (predicted "
                f"pinned {rec['predicted_prealloc_pinned_gib']:.2f}); later epochs device "
                f"+{f(rec['later_epochs_device_growth_gib'], 2)}, RSS +{rec['later_epochs_rss_growth_gib']:.2f}")
    return (f"{rec['model']} + {rec['teacher']} step, batch {rec['batch']}, ZeRO-{rec['zero_stage']} (buckets "
            f"{rec.get('reduce_bucket_size')} elements): resident {f(rec['resident_after_warmup_gib'], 2)} GiB after "
            f"warm-up, peak allocated {f(rec['peak_allocated_gib'], 2)} GiB, device used {f(rec['device_used_gib'], 2)} "
            f"GiB, process max RSS {rec['max_rss_gib']:.2f} GiB")


# Each subcommand: its settings and what measures them (a new one adds an entry here).
MEASURES: Dict[str, Tuple[type, Callable[[Any, torch.device], Dict[str, Any]], str]] = {
    "pipeline": (PipelineSettings, measure_pipeline, "one train loader over three epochs"),
    "step": (StepMemorySettings, measure_step, "the distilled training step alone"),
}


@dataclass
class MemoryRun:
    what: str                          # a key of MEASURES
    settings: Any                      # its settings dataclass
    device: str = "auto"
    out: Optional[str] = None          # JSON file to write


def parse_args(argv: Optional[Sequence[str]]) -> MemoryRun:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for what, (cls, _, about) in MEASURES.items():
        q = sub.add_parser(what, help=about)
        common.add_fields(q, cls)
        q.add_argument("--device", default="auto")
        q.add_argument("--out", default=None, help="JSON file to write")
    # The plan before the job: its own module (benchmarks/memplan.py), dispatched from main.
    from benchmarks import memplan

    memplan.add_arguments(sub.add_parser("plan", help="predicted per-GPU memory per ZeRO stage and checkpointing"))
    a = p.parse_args(argv)
    if a.what == "plan":
        return a
    return MemoryRun(a.what, common.from_args(MEASURES[a.what][0], a), device=a.device, out=a.out)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = parse_args(argv)
    if cli.what == "plan":
        from benchmarks import memplan

        return memplan.run(cli)
    device = common.pick_device(cli.device)
    common.quiet_deepspeed()
    record = common.base_record("memory", device, argv)
    common.print_flush(f"memory of one {cli.what} on {device}")
    record.update(MEASURES[cli.what][1](cli.settings, device))
    line = summary_line(record)
    record["summary"] = line
    common.print_flush(line)
    if cli.out:
        Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cli.out).write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
