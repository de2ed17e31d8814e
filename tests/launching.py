"""Helpers for tests that run the real entry points as subprocesses (2 CPU ranks over gloo).

More than one rank starts under torchrun, one of the launchers fastdeit supports alike
(fastdeit.distributed.env_from): about 3 s to the ranks' start on this 2-core machine, against
about 12 s for deepspeed's launcher, which imports DeepSpeed twice (its runner, then its
per-node launcher) before any rank starts. The tests about that launcher itself (the user's
command line, exit status 2 passed through, a signal to one of its ranks) ask for it with
launcher="deepspeed".

`train_in_process` does launch/train.py's work in the test's own process on one rank, for
tests where neither the rank count nor the launcher is what is tested (~5 s of imports saved
per run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from fastdeit.distributed import free_port
from tests.childenv import child_env

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCHERS = ("torchrun", "deepspeed")

# A tiny but complete run: DeiT with patch 8 at 32 px, 2 blocks; batch 32 over 2 ranks.
TINY = [
    "data.img_size=32", "data.scale=[0.35,1.0]", "data.rand_augment=null", "data.repeated_aug=1",
    "data.num_threads=1", "mixing.prob=0.0", "mixing.erase_prob=0.0",
    "model.drop_path=0.0", "model.kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}",
    "optim.lr=2e-3", "optim.lr_base_batch=32", "schedule.warmup_epochs=0.5",
    "engine.global_batch_size=32", "trainer.eval_every=1", "logging.log_every=2",
    "logging.progress=lines", "checkpoint.keep_last=2",
]


def env(ranks: int = 1) -> dict:
    # LOCAL_SIZE: what deepspeed's launcher exports and DeepSpeed's CPU accelerator counts its
    # devices by; under torchrun it is set here so that DeepSpeed sees the same machine.
    local = {"LOCAL_SIZE": str(ranks)} if ranks > 1 else {}
    return child_env("cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **local)


def command(script: str, *args, ranks: int = 2, launcher: str = "torchrun"):
    """Plain python for one rank; for N > 1 ``torchrun --nproc_per_node N script args`` or, with
    launcher="deepspeed", ``deepspeed --num_gpus N script args``."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    path = str(ROOT / "launch" / script)
    if ranks == 1:
        return [sys.executable, path, *args]
    if launcher == "deepspeed":
        return [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), path, *args]
    return [str(TORCHRUN), "--nproc_per_node", str(ranks), "--master_port", str(free_port()), path, *args]


def release_shm(cmd) -> None:
    """Remove the DeepSpeed shm buffers a launch may have left (a rank killed before teardown)."""
    from fastdeit.distributed import shm_buffers

    if "--master_port" in cmd:
        for path in shm_buffers("127.0.0.1", int(cmd[cmd.index("--master_port") + 1])):
            os.unlink(path)


def launch(*overrides, ranks: int = 2, check: bool = True, tiny: bool = True, script: str = "train.py",
           launcher: str = "torchrun"):
    args = [*(TINY if tiny else []), *overrides]
    cmd = command(script, *args, ranks=ranks, launcher=launcher)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(ranks), capture_output=True, text=True, timeout=600)
    finally:
        release_shm(cmd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def records(run_dir, kind):
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def train_in_process(*overrides, tiny: bool = True, config=None) -> dict:
    """load_config(config, TINY + overrides) -> build_trainer -> fit on a world of one, in this
    process: the summary; a mistake raises its FastDeitError as the entry point would report it,
    a stop (trainer.stop_after_steps) raises Stopped."""
    from fastdeit import distributed
    from fastdeit.build import build_trainer
    from fastdeit.config import load_config

    cfg = load_config(config, [*(TINY if tiny else []), *overrides])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    env = distributed.init(cfg=cfg.distributed)
    try:
        return build_trainer(cfg, env).fit()
    finally:
        distributed.teardown()
