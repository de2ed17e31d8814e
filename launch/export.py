"""Export a checkpoint as a model folder timm loads, and as a plain timm state_dict.

    python launch/export.py RUN_DIR                    # latest checkpoint -> RUN_DIR/model/ + RUN_DIR/model.pth
    python launch/export.py RUN_DIR --best --folder best/ --out best.pth
    python launch/export.py RUN_DIR/checkpoints/step_00012000 --folder deit_b/
    python launch/export.py RUN_DIR --ema               # the EMA -> RUN_DIR/model_ema/ + RUN_DIR/model_ema.pth

The folder (fastdeit/export.py) holds model.safetensors, timm's config.json (architecture,
num_classes, model_args, label names, and the run's eval transform as pretrained_cfg) and a
README.md model card; it is what the Hugging Face Hub takes:

    model = timm.create_model("local-dir:RUN_DIR/model", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

The weights are the optimizer's fp32 masters, consolidated from the ZeRO shards (whatever the
number of ranks that wrote them), or with --ema the checkpoint's fp32 EMA of them (runs with
ema.decay > 0), checked key-by-key against the model the run's config.yaml describes. The
.pth stays for older tooling; beside it, <out>.json records how to build the model:

    timm.create_model(name, num_classes=..., img_size=..., checkpoint_path=out, **kwargs)
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdeit.checkpoint import Checkpointer  # noqa: E402
from fastdeit.config import load_config  # noqa: E402
from fastdeit.cli import reported  # noqa: E402
from fastdeit.errors import CheckpointError  # noqa: E402
from fastdeit.export import export_checkpoint  # noqa: E402


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
    parser.add_argument("--out", type=Path, help="the .pth file (default RUN_DIR/model.pth, with --ema model_ema.pth)")
    parser.add_argument("--folder", type=Path,
                        help="the model folder (default RUN_DIR/model, with --ema RUN_DIR/model_ema)")
    args = parser.parse_args(argv)

    ckpt = find_checkpoint(args.source, args.best)
    state = Checkpointer.read_state(ckpt)
    run_dir = ckpt.parent.parent
    cfg = load_config(run_dir / "config.yaml")
    fp = state["fingerprint"]
    tag = "model_ema" if args.ema else "model"
    out = args.out or run_dir / f"{tag}.pth"
    folder = args.folder or run_dir / tag
    export_checkpoint(ckpt, folder, ema=args.ema, pth=out)
    recipe = {"name": cfg.model.name, "num_classes": fp["num_classes"], "img_size": fp["img_size"],
              "kwargs": cfg.model.kwargs, "checkpoint": str(ckpt), "step": state["step"], "ema": args.ema,
              "folder": str(folder)}
    Path(f"{out}.json").write_text(json.dumps(recipe, indent=2))
    print(f"exported {'the EMA of ' if args.ema else ''}{ckpt} (optimizer step {state['step']}) -> {folder}/, {out}")
    return folder


if __name__ == "__main__":
    with reported():
        main()
