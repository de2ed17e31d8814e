"""Print a table of finished runs: python launch/summary.py RUN_DIR [RUN_DIR ...]

Reads each run's summary.json (written by the trainer at the end of fit).
"""
import json
import sys
from pathlib import Path


def main(run_dirs):
    rows = []
    for run in run_dirs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            sys.exit(f"{path} does not exist: did the run in {run} finish?")
        s = json.loads(path.read_text())
        final = s["final"]
        heads = " ".join(f"{h}={final[f'val/{h}_top1']:.1f}%" for h in ("cls", "dist", "avg")
                         if f"val/{h}_top1" in final)
        rows.append((run, heads, s["img_per_sec"], s["optimizer_steps"]))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'run':<{width}}  {'val top-1':<34} {'img/s':>8} {'steps':>6}")
    for run, heads, ips, steps in rows:
        print(f"{run:<{width}}  {heads:<34} {ips:>8.0f} {steps:>6}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
