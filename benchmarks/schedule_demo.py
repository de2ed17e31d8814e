"""Fixed resolution against a resolution ramp ending at the same size, on the demo data.

    make data
    python -m benchmarks.schedule_demo --seeds 0 1 2            # 6 runs of configs/demo_student.yaml

Both variants train the demo student (configs/demo_student.yaml: DeiT with patch 8, native
64 px) for the same epochs, without the teacher (distill.type=none, so no demo teacher is
needed), through the real entry point under the DeepSpeed launcher (2 CPU ranks, or every GPU):

  fixed   every epoch at 64 px
  ramp    data.size_schedule [[1, 48], [9, 64]], data.size_multiple 8, data.size_rounding floor:
          48 px for epochs 1-5, 56 px for 6-9, 64 px for 10-12 (a ramp, 0.75 -> 1 of the final
          side; FFCV's nearest rounding would give 48 for 1-4, 56 for 5-7, 64 from 8)

Runs alternate (fixed, ramp, fixed, ...) so a busy machine slows both alike. Per run: wall time
of the launch, training time (log.jsonl: from the first logged step to the last epoch record,
the same span in both variants), final val top-1 (evaluated at 64 px in both cases). The record
(JSON + markdown) goes to benchmarks/results/. On 10 demo classes this says whether the saving
is real and what it costs on this toy task; whether it costs accuracy at ImageNet scale is the
evidence of FFCV and DeiT III, not this.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fixed": [],
    # floor rounding: the recorded runs (benchmarks/results/2026-12-01-*) predate FFCV's
    # nearest rounding as the default; pinned so a rerun trains the same sizes
    "ramp": ["data.size_schedule=[[1,48],[9,64]]", "data.size_multiple=8", "data.size_rounding=floor"],
}
STUDENT_ONLY = ["model.name=deit_tiny_patch16_224", "distill.type=none", "teacher.weights=null"]


def launcher(ranks: int) -> List[str]:
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.count("GPU")
    except FileNotFoundError:
        gpus = 0
    return [deepspeed] if gpus else [deepspeed, "--num_gpus", str(ranks)]


def run_one(variant: str, seed: int, out: Path, ranks: int, extra: Sequence[str]) -> Dict[str, Any]:
    run = out / f"{variant}-seed{seed}"
    args = ["launch/train.py", "--config", "configs/demo_student.yaml", *STUDENT_ONLY, *VARIANTS[variant],
            f"trainer.seed={seed}", f"trainer.run_dir={run}", "checkpoint.resume=null", "trainer.eval_every=12",
            "logging.progress=lines", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if "--num_gpus" in launcher(ranks):
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([*launcher(ranks), "--master_port", str(29600 + seed * 7 + len(variant)), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    # first logged step -> last epoch record: the same span in both variants (the steps before
    # the first log, start-up and one final evaluation at 64 px excluded or equal)
    train = epochs[-1]["time"] - min(r["time"] for r in rows if r["kind"] == "step")
    return {"variant": variant, "seed": seed, "wall_s": wall, "train_s": train,
            "top1": epochs[-1]["val/cls_top1"], "sizes": [r["img_size"] for r in epochs],
            "img_per_sec": json.loads((run / "summary.json").read_text())["img_per_sec"]}


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    out = {}
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        out[v] = {k: statistics.mean(r[k] for r in mine) for k in ("wall_s", "train_s", "top1")}
        out[v]["top1_sd"] = statistics.stdev(r["top1"] for r in mine) if len(mine) > 1 else 0.0
    return out


def markdown(record: Dict[str, Any]) -> str:
    lines = [common.record_header_md(record, "Resolution schedule on the demo data: fixed 64 px vs 48 -> 64 px ramp"),
             "", "| variant | seed | sizes per epoch | wall s | train s | val top-1 (cls) |",
             "|---|---:|---|---:|---:|---:|"]
    for r in record["runs"]:
        lines.append(f"| {r['variant']} | {r['seed']} | {','.join(map(str, r['sizes']))} | {r['wall_s']:.0f} | "
                     f"{r['train_s']:.0f} | {r['top1']:.1f} |")
    s = record["summary"]
    lines += ["", "| variant | mean wall s | mean train s | mean top-1 (sd) |", "|---|---:|---:|---:|"]
    for v, m in s.items():
        lines.append(f"| {v} | {m['wall_s']:.0f} | {m['train_s']:.0f} | {m['top1']:.1f} ({m['top1_sd']:.1f}) |")
    lines += ["", f"ramp / fixed: wall {s['ramp']['wall_s'] / s['fixed']['wall_s']:.2f}x, "
                  f"train {s['ramp']['train_s'] / s['fixed']['train_s']:.2f}x; top-1 "
                  f"{s['ramp']['top1'] - s['fixed']['top1']:+.1f} points"]
    if record.get("notes"):
        lines += ["", *record["notes"]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.schedule_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks when there is no GPU")
    p.add_argument("--runs", default="runs/schedule_demo", help="where the runs go")
    p.add_argument("--out", default=str(common.RESULTS))
    p.add_argument("--name", default="schedule-demo")
    p.add_argument("--note", action="append", default=[], help="a line for the record (e.g. machine load)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args(argv)
    record = common.base_record("schedule_demo", common.pick_device("cpu"), sys.argv[1:] if argv is None else argv)
    out = Path(args.runs)
    rows = []
    for seed in args.seeds:
        for variant in VARIANTS:
            row = run_one(variant, seed, out, args.ranks, args.overrides)
            common.print_flush(f"{variant} seed {seed}: top-1 {row['top1']:.1f}  wall {row['wall_s']:.0f}s  "
                               f"train {row['train_s']:.0f}s  sizes {row['sizes']}")
            rows.append(row)
    record.update(runs=rows, summary=summarize(rows), notes=args.note,
                  settings={"config": "configs/demo_student.yaml", "student_only": STUDENT_ONLY,
                            "variants": VARIANTS, "seeds": args.seeds, "ranks": args.ranks})
    stem = common.result_stem(record, common.pick_device("cpu"), args.name)
    paths = common.write_record(record, markdown(record), Path(args.out), stem)
    common.print_flush(markdown(record))
    common.print_flush("wrote " + ", ".join(map(str, paths.values())))
    return record


if __name__ == "__main__":
    main()
