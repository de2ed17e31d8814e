"""Fine-tuning a pretrained demo DeiT on a new task against training it from scratch.

    make finetune-demo          (the same as below, after `make data`)
    python -m benchmarks.finetune --seeds 0 1 2 [--pretrained runs/demo/student]

The pretrained model: ``--pretrained`` (any model.init_weights source; `make demo`'s distilled
student, runs/demo/student, shows the distilled -> plain mapping), else a teacher-free demo
student trained here first on the demo data (configs/demo_student.yaml, distill.type=none,
10 classes, 1,200 images, 12 epochs).

The new task is another generated dataset (fastdeit.data.synthetic with another seed and class
count: new hues, stripe families and periods per class), small on purpose (30 training images
per class), the situation fine-tuning is for. Both variants train the same plain DeiT
(configs/demo_student.yaml's shape, distill.type=none) with the same recipe for the same
epochs through the real entry point; the only difference is ``model.init_weights``:

  finetune   the pretrained weights, heads re-initialised for the new class count
             (and, from a distilled checkpoint, its distillation token and head dropped)
  scratch    timm's initialisation

Runs alternate (finetune, scratch, finetune, ...) so a busy machine slows both alike. Per run:
final val top-1 (the class head) and the wall time of the launch; the record (JSON + markdown)
goes to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("finetune", "scratch")
STUDENT_ONLY = ["model.name=deit_tiny_patch16_224", "distill.type=none", "teacher.weights=null"]
# The new task: 6 classes (the demo has 10) from another seed, 30 training images per class.
TASK = dict(classes=6, train_per_class=30, val_per_class=40, min_size=56, max_size=96, seed=11, difficulty=0.5)
# The same recipe for both variants: the demo's, at batch 32 (5 steps an epoch on 180 images).
RECIPE = ["engine.global_batch_size=32", "checkpoint.resume=null", "checkpoint.every_epochs=100",
          "logging.progress=lines", "logging.log_every=5"]


def command(ranks: int) -> List[str]:
    """Plain python for one process (what fits a shared 2-core machine), else the DeepSpeed launcher."""
    if ranks == 1:
        return [sys.executable]
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks)]


def train(args: Sequence[str], run: Path, ranks: int) -> Tuple[float, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    proc = subprocess.run([*command(ranks), "launch/train.py", "--config", "configs/demo_student.yaml",
                           *STUDENT_ONLY, f"trainer.run_dir={run}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{run} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def make_task(root: Path) -> None:
    subprocess.run([sys.executable, "-m", "fastdeit.data.synthetic", "--out", str(root),
                    *[a for k, v in TASK.items() for a in (f"--{k.replace('_', '-')}", str(v))]],
                   cwd=ROOT, check=True, capture_output=True)


def last_epoch(run: Path) -> Dict[str, Any]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"][-1]


def pretrain(out: Path, demo_data: str, ranks: int) -> Tuple[str, Dict[str, Any]]:
    run = out / "pretrain"
    if not (run / "model" / "model.safetensors").is_file():
        common.print_flush(f"pretraining a teacher-free demo student on {demo_data} -> {run}")
        train([f"data.root={demo_data}", *RECIPE[1:]], run, ranks)     # the demo's own batch (64)
    last = last_epoch(run)
    info = {"run": str(run), "data": demo_data, "epochs": last["epoch"] + 1, "top1": last["val/cls_top1"],
            "command": (run / "command.txt").read_text().strip()}
    return str(run), info                # a run dir: model.init_weights reads its model/ export


def run_one(variant: str, seed: int, out: Path, task: Path, pretrained: str, epochs: int, ranks: int,
            extra: Sequence[str]) -> Dict[str, Any]:
    run = out / f"{variant}-seed{seed}"
    shutil.rmtree(run, ignore_errors=True)          # this benchmark's own run: always a fresh start
    init = [f"model.init_weights={pretrained}"] if variant == "finetune" else []
    wall, stdout = train([f"data.root={task}", *RECIPE, f"trainer.epochs={epochs}", f"trainer.eval_every={epochs}",
                          f"trainer.seed={seed}", *init, *extra], run, ranks)
    last = last_epoch(run)
    loaded = next((line for line in stdout.splitlines() if line.startswith("model.init_weights")), None)
    return {"variant": variant, "seed": seed, "wall_s": wall, "top1": last["val/cls_top1"],
            "top5": last.get("val/cls_top5"), "val_images": last["val/images"], "init_log": loaded}


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    out = {}
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        out[v] = {"top1": statistics.mean(r["top1"] for r in mine), "wall_s": statistics.mean(r["wall_s"] for r in mine),
                  "top1_sd": statistics.stdev(r["top1"] for r in mine) if len(mine) > 1 else 0.0}
    gains = [f["top1"] - s["top1"] for f, s in zip(*[[r for r in rows if r["variant"] == v] for v in VARIANTS])]
    out["gain"] = {"mean": statistics.mean(gains), "min": min(gains), "max": max(gains)}
    return out


def markdown(record: Dict[str, Any]) -> str:
    s = record["summary"]
    t = record["settings"]
    pre = t.get("pretrain")
    where = (f"`{t['pretrained']}`" if not pre else
             f"`{pre['run']}`, a teacher-free demo student ({pre['epochs']} epochs on `{pre['data']}`, "
             f"val top-1 {pre['top1']:.1f} there): `{pre['command']}`")
    loaded = next((r["init_log"] for r in record["runs"] if r.get("init_log")), None)
    lines = [common.record_header_md(record, "Fine-tuning vs training from scratch on a new generated task"),
             "", f"- pretrained: {where}",
             f"- new task: `{t['task_root']}`, fastdeit.data.synthetic {json.dumps(t['task'])}",
             f"- recipe (both variants): configs/demo_student.yaml {' '.join(t['student_only'] + t['recipe'])} "
             f"trainer.epochs={t['epochs']}; fine-tune adds model.init_weights",
             *([f"- what the fine-tune loaded (its log line): `{loaded}`"] if loaded else []),
             "- wall s: the whole launch, on the shared 2-core machine under cpu-run (other work running):"
             " indicative only; the accuracies are the result",
             "", "| variant | seed | val top-1 (cls) | val top-5 | wall s |", "|---|---:|---:|---:|---:|"]
    for r in record["runs"]:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['top1']:.1f} | {common.fmt(r['top5'])} | {r['wall_s']:.0f} |")
    lines += ["", "| variant | mean top-1 (sd) | mean wall s |", "|---|---:|---:|"]
    for v in VARIANTS:
        lines.append(f"| {v} | {s[v]['top1']:.1f} ({s[v]['top1_sd']:.1f}) | {s[v]['wall_s']:.0f} |")
    g = s["gain"]
    lines += ["", f"fine-tune - scratch, same seed: {g['mean']:+.1f} points on average "
                  f"(from {g['min']:+.1f} to {g['max']:+.1f})"]
    if record.get("notes"):
        lines += ["", *record["notes"]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--pretrained", help="model.init_weights source; default: pretrain a demo student here")
    p.add_argument("--demo-data", default="data/demo", help="what the default pretrained model trains on")
    p.add_argument("--task", default="data/finetune_demo", help="where the new task is generated")
    p.add_argument("--ranks", type=int, default=1, help="processes (1: plain python)")
    p.add_argument("--runs", default="runs/finetune_demo", help="where the runs go")
    p.add_argument("--out", default=str(common.RESULTS))
    p.add_argument("--name", default="finetune-vs-scratch")
    p.add_argument("--note", action="append", default=[], help="a line for the record (e.g. machine load)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run of the new task")
    args = p.parse_args(argv)
    record = common.base_record("finetune", common.pick_device("cpu"), sys.argv[1:] if argv is None else argv)
    out, task = Path(args.runs), Path(args.task)
    make_task(task)
    pretrained, pre = (args.pretrained, None) if args.pretrained else pretrain(out, args.demo_data, args.ranks)
    rows = []
    for seed in args.seeds:
        for variant in VARIANTS:
            row = run_one(variant, seed, out, task, pretrained, args.epochs, args.ranks, args.overrides)
            common.print_flush(f"{variant} seed {seed}: top-1 {row['top1']:.1f}  wall {row['wall_s']:.0f}s")
            rows.append(row)
    record.update(runs=rows, summary=summarize(rows), notes=args.note,
                  settings={"pretrained": pretrained, "pretrain": pre, "task_root": str(task), "task": TASK, "epochs": args.epochs,
                            "student_only": STUDENT_ONLY, "recipe": RECIPE, "seeds": args.seeds, "ranks": args.ranks})
    stem = f"{record['date']}-{args.name}"
    paths = common.write_record(record, markdown(record), Path(args.out), stem)
    common.print_flush(markdown(record))
    common.print_flush("wrote " + ", ".join(map(str, paths.values())))
    return record


if __name__ == "__main__":
    main()
