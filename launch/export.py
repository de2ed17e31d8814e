"""Export a checkpoint's fp32 weights as a plain timm state_dict.

    python launch/export.py RUN_DIR                    # the run's latest checkpoint -> RUN_DIR/model.pth
    python launch/export.py RUN_DIR --best --out best.pth
    python launch/export.py RUN_DIR/checkpoints/step_00012000 --out model.pth
    python launch/export.py RUN_DIR --ema               # the EMA weights -> RUN_DIR/model_ema.pth

The weights are the optimizer's fp32 masters, consolidated from the ZeRO shards (whatever the
number of ranks that wrote them), or with --ema the checkpoint's fp32 EMA of them (runs with
ema.decay > 0), checked key-by-key against the model the run's config.yaml describes. Beside
the file, <out>.json records how to build the model:

    timm.create_model(name, num_classes=..., img_size=..., checkpoint_path=out, **kwargs)
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdeit.checkpoint import Checkpointer, ema_state_dict, fp32_state_dict, save_state_dict  # noqa: E402
from fastdeit.config import load_config  # noqa: E402
from fastdeit.errors import CheckpointError, reported  # noqa: E402
from fastdeit.models import build_student  # noqa: E402


def find_checkpoint(source: Path, best: bool) -> Path:
    ckpts = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    pointer = ckpts / ("best" if best else "latest")
    if pointer.is_file():
        return ckpts / pointer.read_text().strip()
    if best:
        raise CheckpointError(f"{ckpts}: no 'best' checkpoint recorded (no evaluation improved yet)")
    Checkpointer.read_state(source)          # raises a clear error if it isn't a checkpoint
    return source


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run folder, its checkpoints folder, or one checkpoint")
    parser.add_argument("--best", action="store_true", help="the best-by-accuracy checkpoint, not the latest")
    parser.add_argument("--ema", action="store_true", help="the EMA weights instead of the live model's")
    parser.add_argument("--out", type=Path, help="output file (default RUN_DIR/model.pth, with --ema model_ema.pth)")
    args = parser.parse_args(argv)

    ckpt = find_checkpoint(args.source, args.best)
    state = Checkpointer.read_state(ckpt)
    run_dir = ckpt.parent.parent
    cfg = load_config(run_dir / "config.yaml")
    fp = state["fingerprint"]
    model = build_student(dataclasses.replace(cfg.model, init_weights=None),
                          fp["img_size"], fp["num_classes"])
    out = args.out or run_dir / ("model_ema.pth" if args.ema else "model.pth")
    if args.ema:
        try:
            weights = ema_state_dict(ckpt)
        except FileNotFoundError as e:
            sys.exit(str(e))
    else:
        weights = fp32_state_dict(ckpt)
    save_state_dict(weights, str(out), model)
    recipe = {"name": cfg.model.name, "num_classes": fp["num_classes"], "img_size": fp["img_size"],
              "kwargs": cfg.model.kwargs, "checkpoint": str(ckpt), "step": state["step"], "ema": args.ema}
    Path(f"{out}.json").write_text(json.dumps(recipe, indent=2))
    print(f"exported {'the EMA of ' if args.ema else ''}{ckpt} (optimizer step {state['step']}) -> {out}")
    return out


if __name__ == "__main__":
    with reported():
        main()
