"""Rank, world size and local rank from the launcher's environment, and process-group setup.

Three launchers are supported alike: ``deepspeed`` and ``torchrun`` export RANK/WORLD_SIZE/
LOCAL_RANK; ``srun`` exports SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and we derive the master
address from the job's node list. A plain ``python launch/train.py`` is a world of one.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch

from fastdeit.errors import LaunchError


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


# ---------------------------------------------------------------- device: one rule for all

def accelerator_name() -> str:
    """The accelerator DeepSpeed will build the engine for: "cuda" or "cpu".

    DeepSpeed decides it once per process (``DS_ACCELERATOR``, else CUDA if a device is usable,
    else CPU) and places the engine there whatever we say, so every other device decision
    (the batches, the teacher, the benchmarks) follows it instead of asking torch.cuda alone:
    a GPU host with DS_ACCELERATOR=cpu (the tests, the CPU demo) must stay on the CPU.
    """
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name not in ("cuda", "cpu"):
        raise LaunchError(f"DeepSpeed chose the {name!r} accelerator; fastdeit runs on cuda or cpu "
                           "(set DS_ACCELERATOR=cuda or DS_ACCELERATOR=cpu)")
    return name


def device_for(env: DistEnv, accelerator: Optional[str] = None,
               environ: Mapping[str, str] = os.environ) -> torch.device:
    """This rank's device: the CPU, or the GPU of its local rank.

    Each local rank owns one GPU: cuda:<local_rank> among the visible devices. One exception:
    a launcher that binds one GPU per task (``srun --gpus-per-task=1``, a per-rank
    CUDA_VISIBLE_DEVICES) leaves exactly one device visible, and that is this rank's. More
    local ranks than visible GPUs otherwise is an error: two ranks on one GPU would be refused
    by NCCL much later, with a less helpful message.
    """
    accelerator = accelerator or accelerator_name()
    if accelerator == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise LaunchError("DeepSpeed chose CUDA (DS_ACCELERATOR=cuda) but torch sees no GPU: check "
                           "`nvidia-smi` and torch's CUDA build, or set DS_ACCELERATOR=cpu")
    if env.local_rank < count:
        return torch.device("cuda", env.local_rank)
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if count == 1 and len(visible) == 1:
        return torch.device("cuda", 0)
    raise LaunchError(   # only the ranks past the GPU count meet it: each reports it
        f"local rank {env.local_rank} needs its own GPU but only {count} are visible "
        f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): start at most "
        f"{count} ranks per node, or give each task its own GPU (srun --gpus-per-task=1)", every_rank=False)


# ---------------------------------------------------------------- collectives: timeout, dead ranks

@dataclass
class DistributedConfig:
    """The `distributed` section: how long a collective may wait, and how a dead rank is noticed.

    timeout_minutes bounds every collective (the process group's timeout, NCCL and gloo alike).
    It must cover the longest legitimate wait of one rank for the others: a checkpoint save on
    a slow shared filesystem (ranks meet in a barrier after it) and the first torch.compile of
    the student and teacher (minutes on a cold cache, longer on a busy node); 30 minutes covers
    both with room, and torch's own NCCL default (10) does not. A rank that *dies* (OOM killer,
    a node failure, SIGKILL) is noticed much sooner by the heartbeat: every rank bumps a
    counter in the rendezvous store every heartbeat_seconds from a thread; rank 0 watches them,
    and a rank silent for 3 beats is named to every survivor, which exits (status 1) with that
    message instead of waiting in a collective for the timeout, or for ever.
    """
    timeout_minutes: float = 30.0
    heartbeat_seconds: float = 10.0      # 0: no heartbeat (dead ranks then surface at the timeout)


DEAD_RANK_EXIT_CODE = 1
_MISSED_BEATS = 3


def check_config(cfg: DistributedConfig) -> None:
    from fastdeit.errors import ConfigError

    if not cfg.timeout_minutes > 0:
        raise ConfigError(f"distributed.timeout_minutes must be > 0, got {cfg.timeout_minutes}")
    if cfg.heartbeat_seconds < 0 or (cfg.heartbeat_seconds and cfg.heartbeat_seconds * _MISSED_BEATS >=
                                     cfg.timeout_minutes * 60):
        raise ConfigError(f"distributed.heartbeat_seconds={cfg.heartbeat_seconds}: must be >= 0 (0 disables it) "
                          f"and {_MISSED_BEATS} beats shorter than distributed.timeout_minutes")


class PeerWatch:
    """The heartbeat thread (see DistributedConfig). Its own TCPStore client on the rendezvous
    store (not the process group's connection, which collectives use), off the training thread:
    nothing in the hot loop waits for it."""

    PREFIX = "fastdeit/peerwatch/"

    def __init__(self, env: DistEnv, every: float, timeout: float):
        import threading

        self.env, self.every = env, every
        self.failed_since: Dict[int, float] = {}     # rank 0: when each failed peer was seen
        self.stop_event = threading.Event()
        self.store = torch.distributed.TCPStore(env.master_addr, env.master_port, env.world_size,
                                                is_master=False, timeout=__import__("datetime").timedelta(seconds=timeout))
        self.thread = threading.Thread(target=self._run, name="fastdeit-peerwatch", daemon=True)
        self.thread.start()

    def _key(self, what: str, rank: int) -> str:
        return f"{self.PREFIX}{what}/{rank}"

    def _die(self, message: str) -> None:
        import sys

        if self.stop_event.is_set():       # this rank is leaving anyway: nothing to report
            return
        print(f"fastdeit: error: rank {self.env.rank}: {message}; exiting rather than wait in a collective",
              file=sys.stderr, flush=True)
        os._exit(DEAD_RANK_EXIT_CODE)

    def _run(self) -> None:
        import time

        ranks = range(self.env.world_size)
        last: Dict[int, tuple] = {}
        while not self.stop_event.is_set():
            try:
                self.store.add(self._key("beat", self.env.rank), 1)
                if self.env.rank == 0:
                    self._watch(ranks, last, time.monotonic())
                elif self.store.check([self.PREFIX + "dead"]):
                    self._die(self.store.get(self.PREFIX + "dead").decode())
            except Exception as e:           # the store lives in rank 0's process
                # A rank leaving normally closes its store too: wait a beat for our own teardown.
                if not self.stop_event.wait(self.every):
                    self._die(f"rank 0 ({self.env.master_addr}, which hosts the rendezvous store) is gone "
                              f"({type(e).__name__})")
                return
            self.stop_event.wait(self.every)

    def _watch(self, ranks, last: Dict[int, tuple], now: float) -> None:
        # One small request per rank per beat, on rank 0's own store: negligible next to a step.
        for r in ranks:
            if r == self.env.rank or self.store.check([self._key("left", r)]):
                continue
            if self.store.check([self._key("failed", r)]):
                # A mistake in the command (an every-rank FastDeitError) meets rank 0 too, which
                # reports it in one line: give this rank's own thread a few beats to get there
                # before naming the peer instead.
                shared = self.store.get(self._key("failed", r)) == b"every_rank"
                first = self.failed_since.setdefault(r, now)
                if shared and now - first <= _MISSED_BEATS * self.every:
                    continue
                message = f"rank {r} left with an error (its own message says which)"
                self.store.set(self.PREFIX + "dead", message)
                self._die(message)
            beat = int(self.store.get(self._key("beat", r))) if self.store.check([self._key("beat", r)]) else 0
            seen, since = last.get(r, (None, now))
            if beat != seen:
                last[r] = (beat, now)
            elif now - since > _MISSED_BEATS * self.every:
                message = (f"rank {r} stopped responding (no heartbeat for {now - since:.0f} s: killed, out of "
                           "memory, or its node failed)")
                self.store.set(self.PREFIX + "dead", message)
                self._die(message)

    def close(self, failed=False) -> None:
        """Stop beating; a rank leaving cleanly says so (else it would be reported dead).
        ``failed``: False, True, or the error this rank leaves on."""
        from fastdeit.errors import FastDeitError

        self.stop_event.set()
        shared = isinstance(failed, FastDeitError) and failed.every_rank
        try:
            self.store.set(self._key("failed" if failed else "left", self.env.rank),
                           "every_rank" if shared else "1")
        except Exception:
            pass
        self.thread.join(timeout=self.every + 1)


_WATCH: Optional[PeerWatch] = None


def name_dead_peer(error: BaseException) -> None:
    """A collective just failed with ``error`` (gloo says "Connection reset by peer" with an
    address, not a rank): give the heartbeat up to a few beats to name the dead rank, which
    exits this process with that message. Returns when no rank is found dead (the error then
    stands as it is); at once for fastdeit's own errors, which name their cause already."""
    import time

    from fastdeit.errors import FastDeitError

    if _WATCH is None or isinstance(error, FastDeitError) or not isinstance(error, RuntimeError):
        return
    deadline = time.monotonic() + (_MISSED_BEATS + 2) * _WATCH.every
    while time.monotonic() < deadline and _WATCH.thread.is_alive():
        time.sleep(0.1)


_ENV_BEFORE: Dict[str, Optional[str]] = {}   # what init() overwrote in os.environ


def init(env: Optional[DistEnv] = None, cfg: Optional[DistributedConfig] = None) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU) with the
    collective timeout of ``cfg`` and, on more than one rank, its heartbeat (PeerWatch)."""
    import datetime

    import deepspeed

    global _WATCH
    cfg = cfg or DistributedConfig()
    check_config(cfg)

    env = env or env_from(os.environ)
    if env.world_size == 1 and "MASTER_PORT" not in os.environ:
        # A lone process needs a rendezvous port too; a fixed default collides with any other
        # job on the host, so take a free one.
        env = DistEnv(master_port=free_port())
    # DeepSpeed reads these; srun does not export them. teardown() puts back what was there:
    # a process that initialises more than once (tests, notebooks) would otherwise reuse a port
    # whose store may still be open, and every child it starts would inherit a rank and a port.
    ours = dict(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    _ENV_BEFORE.clear()
    _ENV_BEFORE.update({k: os.environ.get(k) for k in ours})
    os.environ.update(ours)
    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    watch = env.world_size > 1 and cfg.heartbeat_seconds > 0
    if env.is_main:
        print(f"process group: {backend}, world {env.world_size}, collective timeout {cfg.timeout_minutes:g} min "
              "(distributed.timeout_minutes)" + (f", heartbeat every {cfg.heartbeat_seconds:g} s (a rank silent for "
                                                 f"{_MISSED_BEATS * cfg.heartbeat_seconds:g} s is reported dead)"
                                                 if watch else ""), flush=True)
    if watch:
        _WATCH = PeerWatch(env, cfg.heartbeat_seconds, timeout=60 * cfg.timeout_minutes)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it): for a rendezvous
    on this host. Free when asked, not reserved: the caller uses it right away."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_buffers(master_addr: str, master_port: int, ranks=None) -> List[str]:
    """DeepSpeed's CPU shared-memory all-reduce buffers (/dev/shm, 66 MB per rank) of one job."""
    import glob

    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_"
    return [p for p in glob.glob(pattern + "*") if ranks is None or p[len(pattern):] in {str(r) for r in ranks}]


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the process groups it makes (a clone of the world group, data-parallel,
    expert groups) in module globals of deepspeed.utils.groups and has no call to drop them; after
    destroy_process_group they name dead groups, and the next deepspeed.initialize in the same
    process fails ("Group ... is not registered"). Reset the ones this DeepSpeed has."""
    try:
        from deepspeed.utils import groups
    except ImportError:
        return
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
                 "_MPU_TENSOR_MODEL_PARALLEL_RANK", "mpu"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            setattr(groups, name, {})


def teardown(env: Optional[DistEnv] = None, failed=False) -> None:
    """Leave the process group. ``failed`` (True, or the error itself): this rank leaves on an
    error (the others may be waiting for it in a collective): the heartbeat stops without a
    goodbye, so rank 0 names it, unless it is a mistake in the command every rank meets
    (an every-rank FastDeitError), which rank 0 reports itself."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.close(failed)
        _WATCH = None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    env = env or env_from(os.environ)
    torch.distributed.destroy_process_group()
    _forget_deepspeed_groups()
    for key, value in _ENV_BEFORE.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _ENV_BEFORE.clear()
    # DeepSpeed's CPU shm all-reduce never unlinks its buffer: in tmpfs it holds RAM until
    # reboot, and many runs on one host exhaust memory. Each rank removes its own; peers map
    # each other's buffers once, at initialisation, so unlinking now is safe (no barrier:
    # a rank leaving on an error must not wait for the others).
    for path in shm_buffers(env.master_addr, env.master_port, ranks={env.rank, env.local_rank}):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
