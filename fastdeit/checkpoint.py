"""Checkpoints: DeepSpeed's engine state plus ours (epoch, step, schedule, RNG), resume, export.

Layout under ``<run_dir>/checkpoints``: DeepSpeed's tag folders (``epoch_0003``...) and its
``latest`` file. DeepSpeed rewrites ``latest`` only after every rank has written its shards, so
a crash mid-save leaves ``latest`` naming the previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from fastdeit.models import CheckpointMismatchError, check_state_dict


@dataclass
class CheckpointConfig:
    every_epochs: int = 1              # save at the end of every N-th epoch (and the last)
    keep_last: int = 2                 # older epoch checkpoints are deleted
    resume: Optional[str] = "auto"     # auto: latest in the run dir if any; a path; null: fresh
    export: bool = True                # write model.pth (plain timm state_dict) at the end


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: str, fingerprint: Dict[str, Any], is_main: bool):
        self.cfg = cfg
        self.dir = Path(run_dir) / "checkpoints"
        self.fingerprint = fingerprint   # what must match on resume: model name, classes, ...
        self.is_main = is_main

    def should_save(self, epoch: int, last_epoch: int) -> bool:
        return (epoch + 1) % max(self.cfg.every_epochs, 1) == 0 or epoch == last_epoch

    def save(self, engine, epoch: int, state: Dict[str, Any]) -> str:
        """Collective: every rank calls it. ``state`` is our trainer state (epoch-boundary)."""
        tag = f"epoch_{epoch:04d}"
        # RNG states are per rank; DeepSpeed's client_state is saved by rank 0 only, so each
        # rank writes its own small file beside the shards.
        client = {**state, "fingerprint": self.fingerprint}
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        torch.save(rng_state(), self.dir / tag / f"rng_rank{rank}.pt")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if self.is_main:
            self._prune(keep=tag)
        return tag

    def _prune(self, keep: str) -> None:
        tags = sorted(p for p in self.dir.glob("epoch_*") if p.is_dir())
        for old in tags[: max(len(tags) - self.cfg.keep_last, 0)]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def resume_path(self) -> Optional[Path]:
        """The checkpoint folder to resume from, per ``checkpoint.resume``; None for a fresh run."""
        if not self.cfg.resume:
            return None
        if self.cfg.resume == "auto":
            return self.dir if (self.dir / "latest").is_file() else None
        path = Path(self.cfg.resume)
        if not (path / "latest").is_file() and not path.is_dir():
            raise FileNotFoundError(f"checkpoint.resume={path}: no such checkpoint folder")
        return path

    def load(self, engine, path: Path) -> Dict[str, Any]:
        """Restore engine + trainer state from ``path`` (a checkpoints folder or one tag inside it)."""
        load_dir, tag = (path, None) if (path / "latest").is_file() else (path.parent, path.name)
        try:
            loaded, client = engine.load_checkpoint(str(load_dir), tag=tag)
        except RuntimeError as e:
            raise CheckpointMismatchError(f"{path}: does not fit this model: {e}") from e
        if loaded is None or client is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint found")
        saved = client.get("fingerprint", {})
        diffs = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if diffs:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
            raise CheckpointMismatchError(f"{loaded}: was written for another setup ({detail})")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng_file = Path(loaded) / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return client


def export_state_dict(module: torch.nn.Module, path: str) -> None:
    """A plain timm state_dict in fp32 that ``timm.create_model(name, checkpoint_path=path)``
    loads. Written to a temporary file and renamed, so a crash never leaves a torn file."""
    state = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
    check_state_dict(module, state, path, "the exported model")
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
