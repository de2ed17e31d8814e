"""Checkpoints that survive crashes, preemption and a change of GPU count.

Layout under ``<run_dir>/checkpoints``::

    step_00012000/               one complete checkpoint (DeepSpeed shards + ours)
        mp_rank_00_model_states.pt, *zero_pp_rank_*_optim_states.pt   DeepSpeed
        rng_rank<r>.pt           each rank's torch/numpy/python RNG state
        ema.pt                   the EMA weights by parameter name, fp32 (when ema.decay > 0)
        trainer_state.json       epoch, optimizer step, steps into the epoch, world size, ...
    step_00012000.universal/     the same state re-sharded by DeepSpeed's universal format,
                                 made on demand when the world size changes
    latest                       the tag of the newest complete checkpoint
    best                         the tag of the best-by-accuracy checkpoint (kept by pruning)

Atomicity: every rank writes into ``<tag>.partial/``; after a barrier rank 0 renames the
folder to ``<tag>`` and only then replaces ``latest`` (write to a temp file, ``os.replace``).
A crash or kill at any point leaves ``latest`` naming a complete checkpoint; leftovers named
``*.partial`` are removed by the next save.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from fastdeit.errors import CheckpointError, CheckpointMismatchError, RunExistsError
from fastdeit.weights import check_state_dict

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.pt"


@dataclass
class CheckpointConfig:
    every_epochs: int = 1              # save at the end of every N-th epoch (and the last)
    keep_last: int = 2                 # newest N checkpoints kept, plus the best one
    resume: Optional[str] = "auto"     # auto: the run dir's latest if any; a path; null: fresh
    export: bool = True                # write model.pth (plain timm state_dict) at the end


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    # Only a run that uses CUDA has CUDA RNG state worth saving; asking a CPU run on a GPU host
    # would create a CUDA context on GPU 0 in every rank.
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: str, fingerprint: Dict[str, Any], is_main: bool,
                 ema=None, precision: Optional[Dict[str, str]] = None, class_names: Optional[list] = None):
        self.cfg = cfg
        self.dir = Path(run_dir) / "checkpoints"
        self.fingerprint = fingerprint   # what must match on resume: model, classes, resolution
        self.is_main = is_main
        self.ema = ema                   # a fastdeit.ema.ModelEma saved and restored with the engine
        # {'engine': 'bf16'|'fp32', 'teacher': ...}: what the run computes in, recorded in every
        # checkpoint so that engine.precision=auto resumes as it started (fastdeit.precision.for_run).
        self.precision = dict(precision or {})
        # Recorded (not compared) in trainer_state.json: the exported model folder's label_names.
        self.class_names = list(class_names) if class_names else None

    def should_save(self, epoch: int, last_epoch: int) -> bool:
        return (epoch + 1) % max(self.cfg.every_epochs, 1) == 0 or epoch == last_epoch

    # ------------------------------------------------------------------ save

    def save(self, engine, state: Dict[str, Any], best: bool = False) -> Path:
        """Collective: every rank calls it. ``state`` must hold 'epoch' and 'epoch_step'."""
        tag = f"step_{engine.global_steps:08d}"
        final, partial = self.dir / tag, self.dir / f"{tag}.partial"
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        client = {
            # DeepSpeed's universal-checkpoint converter requires this key in the client state.
            "universal_checkpoint_info": {"universal_checkpoint_version": 0.2},
        }
        engine.save_checkpoint(str(self.dir), tag=partial.name, client_state=client, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{_rank()}.pt")
        if self.ema is not None:
            # Assembled from every rank's partition and stored by name: loads on any world size.
            weights = self.ema.state_dict()
            if self.is_main:
                torch.save({k: v.detach().cpu().clone() for k, v in weights.items()}, partial / EMA_FILE)
        _barrier()
        if self.is_main:
            meta = {**state, "step": engine.global_steps, "world_size": _world(), "fingerprint": self.fingerprint,
                    "precision": self.precision, "class_names": self.class_names}
            _write_atomic(partial / STATE_FILE, json.dumps(meta, indent=2))
            shutil.rmtree(final, ignore_errors=True)         # the same step saved twice
            os.replace(partial, final)
            _write_atomic(self.dir / "latest", tag)
            if best:
                _write_atomic(self.dir / "best", tag)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        best = (self.dir / "best").read_text().strip() if (self.dir / "best").is_file() else None
        latest = (self.dir / "latest").read_text().strip()
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir() and "." not in p.name)
        keep = set(tags[-max(self.cfg.keep_last, 1):]) | {best, latest}
        for name in tags:
            if name not in keep:
                shutil.rmtree(self.dir / name, ignore_errors=True)
                shutil.rmtree(self.dir / f"{name}.universal", ignore_errors=True)
        for leftover in self.dir.glob("*.partial"):
            shutil.rmtree(leftover, ignore_errors=True)

    # ------------------------------------------------------------------ resume

    def latest(self) -> Optional[Path]:
        """This run's newest complete checkpoint, if any."""
        pointer = self.dir / "latest"
        return self.dir / pointer.read_text().strip() if pointer.is_file() else None

    def resume_path(self) -> Optional[Path]:
        """The checkpoint folder to resume from, per ``checkpoint.resume``; None for a fresh run."""
        if not self.cfg.resume:
            if self.latest() is not None:
                # A fresh run here would interleave its checkpoints and log with the old run's.
                raise RunExistsError(
                    f"{self.dir.parent} already holds a run (checkpoint {self.latest().name}); resume it "
                    "with checkpoint.resume=auto, or start afresh in another trainer.run_dir")
            return None
        if self.cfg.resume == "auto":
            return self.latest()
        path = Path(self.cfg.resume)
        if (path / "latest").is_file():                     # a checkpoints folder
            return path / (path / "latest").read_text().strip()
        if (path / "checkpoints" / "latest").is_file():     # a run folder
            return path / "checkpoints" / (path / "checkpoints" / "latest").read_text().strip()
        if (path / STATE_FILE).is_file():                   # one checkpoint
            return path
        raise CheckpointError(f"checkpoint.resume={path}: not a run, checkpoints or checkpoint folder")

    @classmethod
    def resume_state(cls, cfg: CheckpointConfig, run_dir: str) -> Optional[Dict[str, Any]]:
        """The trainer state of the checkpoint this run will resume (None: a fresh run); read
        before the engine exists, to decide the run's precision from what it started with."""
        path = cls(cfg, run_dir, {}, is_main=False).resume_path()
        return {**cls.read_state(path), "path": str(path)} if path is not None else None

    @staticmethod
    def read_state(path: Path) -> Dict[str, Any]:
        file = Path(path) / STATE_FILE
        if not file.is_file():
            raise CheckpointError(f"{path}: no {STATE_FILE}; not a complete fastdeit checkpoint")
        return json.loads(file.read_text())

    def load(self, engine, path: Path) -> Dict[str, Any]:
        """Restore engine and trainer state from one checkpoint folder; returns the trainer state.

        Same world size: DeepSpeed's own shards, and each rank's RNG state (exact resume).
        Another world size: ZeRO's optimizer partitions depend on it, so the checkpoint is
        converted once to DeepSpeed's universal format and loaded from there; parameters and
        optimizer moments carry over exactly, the per-rank RNG streams start afresh.
        """
        path = Path(path)
        state = self.read_state(path)
        saved = state.get("fingerprint", {})
        diffs = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if diffs:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
            raise CheckpointMismatchError(f"{path} was written for another setup ({detail})")
        same_world = state["world_size"] == _world()
        load_dir = path if same_world else self._universal(path)
        # DeepSpeed reads this flag from its config when loading; whether the checkpoint needs
        # the universal loader is only known now, after the engine was built.
        engine._config.load_universal_checkpoint = not same_world
        try:
            loaded, _ = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name,
                                               load_lr_scheduler_states=False)
        except RuntimeError as e:
            raise CheckpointMismatchError(f"{path}: does not fit this model: {e}") from e
        finally:
            engine._config.load_universal_checkpoint = False
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed found no checkpoint there")
        if not same_world:
            _untie_steps(engine.optimizer)
        if same_world:
            set_rng_state(torch.load(path / f"rng_rank{_rank()}.pt", weights_only=False))
        state["resharded_from"] = None if same_world else state["world_size"]
        if self.ema is not None:
            if (path / EMA_FILE).is_file():
                self.ema.load_state_dict(torch.load(path / EMA_FILE, map_location="cpu", weights_only=True),
                                         str(path / EMA_FILE))
                state["ema"] = "restored"
            else:                       # EMA switched on for a run that had none so far
                self.ema.reset()
                state["ema"] = "started from the resumed weights"
        return state

    def _universal(self, path: Path) -> Path:
        """``<tag>.universal``: the checkpoint re-sharded for any world size (rank 0 converts)."""
        out = path.with_name(path.name + ".universal")
        if self.is_main and not (out / STATE_FILE).is_file():
            tmp = path.with_name(path.name + ".universal.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                   "--output_folder", str(tmp), "--num_extract_workers", "2", "--num_merge_workers", "2"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"converting {path} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
            (tmp.parent / "latest_universal").unlink(missing_ok=True)   # the converter's own pointer
            shutil.copy(path / STATE_FILE, tmp / STATE_FILE)
            os.replace(tmp, out)
        _barrier()
        return out


def _untie_steps(wrapper) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal loader (load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    puts one and the same ``step`` tensor into every sub-group's optimizer state; torch's AdamW
    increments it in place once per sub-group, so after a resharded resume the step (and Adam's
    bias correction) ran ahead by the number of groups each update (tests/test_zero3.py caught
    14 after step 13). Each state gets its own copy; a no-op where they are distinct."""
    optimizer = getattr(wrapper, "optimizer", wrapper)
    for state in getattr(optimizer, "state", {}).values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def fp32_state_dict(checkpoint: Path) -> Dict[str, torch.Tensor]:
    """The fp32 master weights (plus buffers) of a checkpoint, consolidated from its ZeRO shards.

    Under bf16 the live module holds bf16 copies; the exact weights are the optimizer's fp32
    partitions, which DeepSpeed's zero_to_fp32 reassembles.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = Path(checkpoint)
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    return {k: v.float() for k, v in state.items()}


def ema_state_dict(checkpoint: Path) -> Dict[str, torch.Tensor]:
    """The EMA weights (fp32, by parameter name) saved in a checkpoint."""
    path = Path(checkpoint) / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no EMA weights ({EMA_FILE}); the run trained with ema.decay=0")
    return torch.load(path, map_location="cpu", weights_only=True)


def save_state_dict(state: Dict[str, torch.Tensor], path: str, model: Optional[torch.nn.Module] = None) -> None:
    """Write a plain state_dict that ``timm.create_model(name, checkpoint_path=path)`` loads,
    checked against ``model`` if given; temp file + rename, so a crash never leaves a torn file."""
    if model is not None:
        check_state_dict(model, state, path, "the model being exported")
    tmp = f"{path}.tmp"
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)
