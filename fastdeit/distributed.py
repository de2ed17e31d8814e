"""Rank, world size and local rank from the launcher's environment, and process-group setup.

Three launchers are supported alike: ``deepspeed`` and ``torchrun`` export RANK/WORLD_SIZE/
LOCAL_RANK; ``srun`` exports SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and we derive the master
address from the job's node list. A plain ``python launch/train.py`` is a world of one.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM's compact host list ('gpu[01-03,07],login1') -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1']."""
    hosts: List[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(prefix + str(i).zfill(len(lo)))
    return hosts


def env_from(environ: Mapping[str, str]) -> DistEnv:
    """The distributed layout described by a process environment."""
    port = int(environ.get("MASTER_PORT", 29500))
    if "RANK" in environ and "WORLD_SIZE" in environ:  # deepspeed, torchrun
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:  # srun, one task per GPU
        nodes = expand_nodelist(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", ""))
        master = environ.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1")
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=master,
            master_port=port,
        )
    return DistEnv(master_port=port)


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(env: Optional[DistEnv] = None) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU)."""
    import deepspeed

    env = env or env_from(os.environ)
    if env.world_size == 1 and "MASTER_PORT" not in os.environ:
        # A lone process needs a rendezvous port too; a fixed default collides with any other
        # job on the host, so take a free one.
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env = DistEnv(master_port=s.getsockname()[1])
    # DeepSpeed reads these; srun does not export them.
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for(env))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return env


def shm_buffers(master_addr: str, master_port: int, ranks=None) -> List[str]:
    """DeepSpeed's CPU shared-memory all-reduce buffers (/dev/shm, 66 MB per rank) of one job."""
    import glob

    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_"
    return [p for p in glob.glob(pattern + "*") if ranks is None or p[len(pattern):] in {str(r) for r in ranks}]


def teardown(env: Optional[DistEnv] = None) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    env = env or env_from(os.environ)
    torch.distributed.destroy_process_group()
    # DeepSpeed's CPU shm all-reduce never unlinks its buffer: in tmpfs it holds RAM until
    # reboot, and many runs on one host exhaust memory. Each rank removes its own; peers map
    # each other's buffers once, at initialisation, so unlinking now is safe (no barrier:
    # a rank leaving on an error must not wait for the others).
    for path in shm_buffers(env.master_addr, env.master_port, ranks={env.rank, env.local_rank}):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
