"""A trained run as a model folder the ecosystem loads: timm's ``local-dir:`` layout, Hub-ready.

    <folder>/model.safetensors   the fp32 weights (the optimizer's masters, or the EMA), plain timm keys
    <folder>/config.json         timm's own format, written by timm's writer (timm.models._hub
                                 .save_config_for_hf, what push_to_hf_hub uploads): architecture,
                                 num_classes, model_args, label_names, and a pretrained_cfg whose
                                 input_size / interpolation / crop_pct / crop_mode / mean / std are
                                 the run's eval transform
    <folder>/README.md           a model card: recipe, data, epochs, final top-1 per head and of
                                 the EMA, throughput, the command that trained it

    timm.create_model("local-dir:<folder>", pretrained=True)      # the trained model
    timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))   # its eval transform

(timm builds only the architecture from a folder unless ``pretrained=True``, as for ``hf-hub:``.)
``huggingface_hub.upload_folder`` or ``timm.models.push_to_hf_hub`` take the same folder.

The folder is written to ``<folder>.partial`` and renamed, so a crash never leaves half of one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from fastdeit.errors import CheckpointError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
COMMAND_FILE = "command.txt"      # in the run dir: one line per launch of the run (train.py writes it)


def record_command(run_dir: Path, argv: Optional[List[str]] = None) -> None:
    """Append this launch's command line to ``run_dir/command.txt`` (rank 0; a resumed run adds a line)."""
    argv = sys.argv if argv is None else argv
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / COMMAND_FILE, "a") as f:
        f.write(" ".join(shlex.quote(a) for a in ["python", *argv]) + "\n")


def eval_data_config(data_cfg) -> Dict[str, Any]:
    """The run's eval transform in timm's data-config terms (fastdeit.data.loading.pipeline's val graph:
    bicubic resize of the shorter side to int(img_size / eval_crop_pct), centre crop, mean/std)."""
    size = int(data_cfg.img_size)
    return {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": float(data_cfg.eval_crop_pct),
            "crop_mode": "center", "mean": tuple(data_cfg.mean), "std": tuple(data_cfg.std)}


def _epoch_metrics(run_dir: Path, step: int) -> Dict[str, float]:
    """val/* of the last evaluation at or before optimizer step ``step`` (log.jsonl)."""
    log = run_dir / "log.jsonl"
    found: Dict[str, float] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:        # a line torn by a kill: skip it
                continue
            if row.get("kind") == "epoch" and row.get("step", 0) <= step and any(k.startswith("val/") for k in row):
                found = {**{k: v for k, v in row.items() if k.startswith("val/")}, "epoch": row.get("epoch")}
    return found


def model_card(cfg, meta: Dict[str, Any], metrics: Dict[str, float], summary: Dict[str, Any],
               commands: List[str], ema: bool) -> str:
    """The README.md of the folder (Hugging Face's model-card layout: YAML header, then text)."""
    name = cfg.model.name
    heads = [("class token head", "cls"), ("distillation head", "dist"), ("average of both (the model's output)", "avg")]
    rows = []
    for label, key in heads:
        live, avg = metrics.get(f"val/{key}_top1"), metrics.get(f"val/ema_{key}_top1")
        if live is not None or avg is not None:
            fmt = (lambda v: f"{v:.2f}" if v is not None else "-")
            rows.append(f"| {label} | {fmt(live)} | {fmt(avg)} |")
    evaluated = (f"after epoch {metrics['epoch'] + 1}, on {metrics.get('val/images', '?')} validation images"
                 if metrics else "no evaluation recorded for this checkpoint")
    teacher = (f"{cfg.teacher.name} ({cfg.teacher.weights})" if cfg.distill.type != "none" else "none")
    rate = summary.get("img_per_sec")
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-classification, timm, fastdeit, deit]",
        "---",
        "",
        f"# {name}{' (EMA weights)' if ema else ''}, trained with fastdeit",
        "",
        "```python",
        "import timm",
        "model = timm.create_model(\"local-dir:PATH_TO_THIS_FOLDER\", pretrained=True).eval()",
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
        "```",
        "",
        "## Recipe",
        "",
        f"- model: `{name}` {json.dumps(cfg.model.kwargs) if cfg.model.kwargs else ''}, "
        f"{meta['num_classes']} classes at {meta['img_size']} px",
        f"- distillation: {cfg.distill.type}, teacher {teacher}",
        f"- optimizer: {cfg.optim.name}, lr {cfg.optim.lr} per {cfg.optim.lr_base_batch} images, "
        f"weight decay {cfg.optim.weight_decay}; global batch {cfg.engine.global_batch_size}; "
        f"ZeRO stage {cfg.engine.zero_stage}, precision {cfg.engine.precision}",
        f"- EMA: {cfg.ema.decay if cfg.ema.decay else 'off'}; these weights are the "
        f"{'EMA' if ema else 'optimizer fp32 master weights'}",
        "",
        "## Data",
        "",
        f"- `{cfg.data.root}` (train split `{cfg.data.train_split}`, validation `{cfg.data.val_split}`)",
        f"- eval transform: bicubic resize to int({meta['img_size']} / {cfg.data.eval_crop_pct}), "
        f"centre crop {meta['img_size']}, mean {list(cfg.data.mean)}, std {list(cfg.data.std)}",
        "",
        "## Training",
        "",
        f"- epochs: {summary.get('epochs', cfg.trainer.epochs)}; this checkpoint: optimizer step {meta['step']}",
        f"- throughput: {rate:.1f} images/sec (steady state, all ranks)" if rate else "- throughput: not recorded",
        "",
        f"## Validation top-1 ({evaluated})",
        "",
        "| head | model | EMA |",
        "|---|---:|---:|",
        *(rows or ["| - | - | - |"]),
        "",
        "## Command",
        "",
        "```bash",
        *(commands or ["(not recorded)"]),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_folder(folder: Path, model: torch.nn.Module, weights: Dict[str, torch.Tensor], cfg,
                       meta: Dict[str, Any], card: str) -> Path:
    """Load ``weights`` into ``model`` (strictly) and write the folder atomically."""
    from timm.models._hub import save_for_hf

    from fastdeit.weights import check_state_dict

    check_state_dict(model, weights, str(folder), "the model being exported")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    model.eval()
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model_config: Dict[str, Any] = {"pretrained_cfg": {"tag": "fastdeit"}}
    if meta.get("class_names"):
        model_config["label_names"] = list(meta["class_names"])
    # timm's writer: the same config.json push_to_hf_hub uploads, and the data config it records
    # is what timm.data.resolve_data_config reads back.
    save_for_hf(model, str(partial), model_config=model_config, safe_serialization=True,
                data_config=eval_data_config(cfg.data))
    (partial / CARD_FILE).write_text(card)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
    return folder


def export_checkpoint(ckpt: Path, folder: Path, ema: bool = False, pth: Optional[Path] = None,
                      summary: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """One checkpoint of a run -> a model folder (and optionally the plain ``.pth``); returns the weights.

    The model is rebuilt from the run's config.yaml at its native size (no position-embedding
    resampling, whatever data.size_schedule trained at), its weights are the checkpoint's fp32
    masters, consolidated from the ZeRO shards of any rank count, or its EMA.
    """
    from fastdeit.checkpoint import Checkpointer, ema_state_dict, fp32_state_dict, save_state_dict
    from fastdeit.config import load_config
    from fastdeit.models import build_student

    ckpt = Path(ckpt)
    state = Checkpointer.read_state(ckpt)
    run_dir = ckpt.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir / 'config.yaml'}: missing; the export needs the run's config beside "
                              "its checkpoints folder")
    cfg = load_config(run_dir / "config.yaml")
    fp = state["fingerprint"]
    model = build_student(dataclasses.replace(cfg.model, init_weights=None), fp["img_size"], fp["num_classes"])
    if ema:
        try:
            weights = ema_state_dict(ckpt)
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
    else:
        weights = fp32_state_dict(ckpt)
    if pth is not None:
        save_state_dict(weights, str(pth), model)
    if summary is None and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    meta = {"num_classes": fp["num_classes"], "img_size": fp["img_size"], "step": state["step"],
            "class_names": state.get("class_names")}
    commands = (run_dir / COMMAND_FILE).read_text().splitlines() if (run_dir / COMMAND_FILE).is_file() else []
    card = model_card(cfg, meta, _epoch_metrics(run_dir, state["step"]), summary or {}, commands, ema)
    write_model_folder(folder, model, weights, cfg, meta, card)
    return weights
