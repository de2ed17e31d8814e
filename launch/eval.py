"""Evaluate weights on a validation folder: top-1/top-5 per head, written as JSON.

    python launch/eval.py RUN_DIR                              # RUN_DIR/model.pth on the run's val set
    python launch/eval.py RUN_DIR --ema                        # RUN_DIR/model_ema.pth -> eval_ema.json
    python launch/eval.py RUN_DIR --weights best.pth data.root=/data/imagenet --out eval.json
    torchrun --nproc_per_node 8 launch/eval.py --config configs/deit_b.yaml --weights deit_b.pth

Any number of ranks (deepspeed, torchrun, srun or one process): each val image is evaluated
once. Distilled models report the class head, the distillation head and their average.
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdeit import distributed  # noqa: E402
from fastdeit.config import load_config  # noqa: E402
from fastdeit.data import build_loader  # noqa: E402
from fastdeit.cli import reported  # noqa: E402
from fastdeit.evaluate import evaluate  # noqa: E402
from fastdeit.models import build_student  # noqa: E402
from fastdeit.weights import load_weights  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", type=Path, help="a run folder (its config.yaml and model.pth)")
    parser.add_argument("--config", type=Path, help="a config instead of RUN_DIR/config.yaml")
    parser.add_argument("--weights", help="any weights source of fastdeit/weights.py: a file, model folder, URL, "
                        "hf-hub:org/repo or timm (default RUN_DIR/model.pth)")
    parser.add_argument("--ema", action="store_true",
                        help="the run's EMA weights: RUN_DIR/model_ema.pth (launch/export.py --ema), eval_ema.json")
    parser.add_argument("--batch", type=int, default=128, help="per-rank batch")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", type=Path, help="JSON output (default RUN_DIR/eval.json or ./eval.json)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    if args.run_dir is None and (args.config is None or args.weights is None):
        parser.error("give RUN_DIR, or both --config and --weights")
    if args.ema and (args.run_dir is None or args.weights):
        parser.error("--ema evaluates RUN_DIR/model_ema.pth: give RUN_DIR and no --weights")
    stem = "model_ema" if args.ema else "model"
    config = args.config or args.run_dir / "config.yaml"
    weights = args.weights or str(args.run_dir / f"{stem}.pth")
    out = args.out or (args.run_dir / f"eval{'_ema' if args.ema else ''}.json" if args.run_dir else Path("eval.json"))

    cfg = load_config(config, args.overrides)
    env = distributed.init(cfg=cfg.distributed)
    try:
        device = distributed.device_for(env)
        loader = build_loader(cfg.data, "val", args.batch, rank=env.rank, world_size=env.world_size,
                              seed=0, device=device)
        model_cfg = dataclasses.replace(cfg.model, init_weights=None)
        model = build_student(model_cfg, cfg.data.img_size, loader.num_classes)
        load_weights(model, weights, what=f"{cfg.model.name} ({loader.num_classes} classes)", model_name=cfg.model.name)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        metrics = evaluate(model.to(device=device, dtype=dtype), loader, dtype, device)
        result = {"weights": weights, "model": cfg.model.name, "val": os.path.join(cfg.data.root, cfg.data.val_split),
                  "world_size": env.world_size, "dtype": args.dtype, **metrics}
        if env.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
            print(json.dumps(result, indent=2))
        loader.close()
        return result
    except Exception as error:
        distributed.name_dead_peer(error)
        raise
    finally:
        distributed.teardown(failed=sys.exc_info()[1] or False)


if __name__ == "__main__":
    with reported():
        main()
