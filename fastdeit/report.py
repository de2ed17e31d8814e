"""Draw a run's curves: ``python -m fastdeit.report RUN_DIR [--out PNG]``.

Reads RUN_DIR/log.jsonl (the trainer's step and epoch records) and writes RUN_DIR/report.png,
a 2x2 figure over optimizer steps: training loss; validation top-1 per head; learning rate;
images/sec with MFU and the data-wait share when the run logged them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HEAD_STYLE = {"cls": "-", "dist": "--", "avg": "-"}


def read_log(path: Path) -> Dict[str, List[Dict[str, Any]]]:
    """{'step': [...], 'epoch': [...]} records, one per step / epoch in order; unreadable lines
    are skipped (a run killed mid-write leaves a partial last line)."""
    kinds: Dict[str, List[Dict[str, Any]]] = {"step": [], "epoch": []}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("kind") in kinds:
                kinds[row["kind"]].append(row)
    # A resumed run re-runs the steps after its checkpoint (after a crash or a divergence) and
    # appends their records again: the last record of each step or epoch is the one that counts.
    for kind, key in (("step", "step"), ("epoch", "epoch")):
        last = {r.get(key): r for r in kinds[kind]}
        kinds[kind] = sorted(last.values(), key=lambda r: (r.get(key) is None, r.get(key) or 0))
    return kinds


def _series(rows: List[Dict[str, Any]], key: str):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def draw(run_dir: Path, out: Optional[Path] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{log} does not exist: is {run_dir} a fastdeit run directory?")
    records = read_log(log)
    steps, epochs = records["step"], records["epoch"]
    if not steps and not epochs:
        raise ValueError(f"{log} holds no step or epoch records")

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    (ax_loss, ax_top1), (ax_lr, ax_speed) = axes

    # Training loss: every logging step, and the per-epoch mean on top.
    x, y = _series(steps, "loss")
    ax_loss.plot(x, y, lw=1, alpha=0.6, label="train loss (logging steps)")
    x, y = _series(epochs, "train/loss")
    if x:
        ax_loss.plot(x, y, "o-", lw=1.5, ms=4, label="train loss (epoch mean)")
    if any("loss_dist" in r for r in steps):          # distillation: show both terms
        for part in ("loss_cls", "loss_dist"):
            x, y = _series(steps, part)
            ax_loss.plot(x, y, lw=0.8, alpha=0.6, label=part)
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=8)

    # Validation top-1 per head.
    heads = sorted({k[len("val/"):-len("_top1")] for r in epochs for k in r if k.startswith("val/") and k.endswith("_top1")})
    for head in heads:
        x, y = _series(epochs, f"val/{head}_top1")
        ax_top1.plot(x, y, HEAD_STYLE.get(head, "-"), marker="o", ms=4, label=f"{head} head")
    ax_top1.set_ylim(0, 100)
    if heads:
        best = max(max(_series(epochs, f"val/{h}_top1")[1] or [0]) for h in heads)
        ax_top1.set_title(f"validation top-1 % (best {best:.2f})")
        ax_top1.legend(fontsize=8)
    else:
        ax_top1.set_title("validation top-1 % (no evaluation yet)")

    x, y = _series(steps, "lr")
    ax_lr.plot(x, y)
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    x, y = _series(steps, "img_per_sec")
    ax_speed.plot(x, y, color="C0", label="img/s")
    ax_speed.set_ylabel("images / second", color="C0")
    ax_speed.set_ylim(bottom=0)
    title = "throughput"
    if y:
        steady = y[1:] or y
        title += f" (mean {sum(steady) / len(steady):,.0f} img/s after the first window)"
    ax_speed.set_title(title)
    mx, my = _series(steps, "mfu")
    wx, wy = _series(steps, "data_wait")
    if mx or wx:
        twin = ax_speed.twinx()
        if mx:
            twin.plot(mx, [100 * v for v in my], color="C2", lw=1, label="MFU %")
        if wx:
            twin.plot(wx, [100 * v for v in wy], color="C3", lw=1, ls="--", label="data wait %")
        twin.set_ylabel("%")
        twin.set_ylim(0, 100)
        lines = ax_speed.get_lines() + twin.get_lines()
        ax_speed.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="lower right")

    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir), fontsize=10)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "report.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m fastdeit.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a training run directory (holds log.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/report.png)")
    args = p.parse_args(argv)
    try:
        path = draw(Path(args.run_dir), Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    print(path)
    return path


if __name__ == "__main__":
    main()
