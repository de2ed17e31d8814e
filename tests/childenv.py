"""The environment of every process a test starts: this one's, extended, never replaced.

Two rules, both learned from the GPU host (see ../shared/gpu-host/README.md in the project's
notes): DALI and DeepSpeed live there in ``.devsite``, reached only through ``PYTHONPATH``, so a
child that is handed ``PYTHONPATH=<repo>`` alone cannot import them; and a child that runs on
the GPU must not inherit ``DS_ACCELERATOR=cpu`` (``make test`` sets it for the whole run), or
DeepSpeed moves the model to the CPU while the batch sits on cuda.

    child_env("cpu", OMP_NUM_THREADS="1")    # DeepSpeed on the CPU accelerator
    child_env("cuda")                        # DeepSpeed on CUDA, whatever the parent forced
    child_env(None)                          # the accelerator left as the parent has it

tests/test_child_env.py checks every test that starts a child against these rules.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

ROOT = Path(__file__).resolve().parents[1]


def python_path(*first: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """``first`` entries, then the repository, then the parent's PYTHONPATH (duplicates dropped)."""
    environ = os.environ if environ is None else environ
    inherited = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys([*map(str, first), str(ROOT), *inherited]))


def child_env(accelerator: Optional[str] = "cpu", *, path_first=(), environ: Optional[Mapping[str, str]] = None,
              **extra: str) -> dict:
    """The parent's environment with the repository (after ``path_first``) in front of its
    PYTHONPATH, DeepSpeed's accelerator set (``"cpu"``/``"cuda"``) or left alone (None), and
    ``extra`` variables on top."""
    if accelerator not in (None, "cpu", "cuda"):
        raise ValueError(f"accelerator must be 'cpu', 'cuda' or None, got {accelerator!r}")
    environ = os.environ if environ is None else environ
    if "PYTHONPATH" in extra or "DS_ACCELERATOR" in extra:
        raise ValueError("PYTHONPATH and DS_ACCELERATOR are child_env's own: use path_first= and accelerator=")
    env = dict(environ, PYTHONPATH=python_path(*path_first, environ=environ), **extra)
    if accelerator is not None:
        env["DS_ACCELERATOR"] = accelerator
    return env
