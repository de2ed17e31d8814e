"""A CPU thread budget per rank: how many cores this rank may use, and how they are shared
between DALI, the host threads of the CPU data path and torch's intra-op pool.

One rule used by build.py, the loader and the benchmarks. Its own module because it knows the
data path's stages (their measured costs) while distributed.py, below everything, knows ranks
and process groups only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple

import torch


@dataclass
class RuntimeConfig:
    """The `runtime` section: how many CPU threads this rank may use and for what.

    None everywhere means derived (thread_budget). data.num_threads / data.host_threads set in
    the data section win over the derived DALI / host thread counts.
    """
    cores_per_rank: Optional[int] = None   # None: SLURM_CPUS_PER_TASK, else affinity / local ranks
    torch_threads: Optional[int] = None    # None: OMP_NUM_THREADS if set, else derived


@dataclass(frozen=True)
class ThreadBudget:
    cores: int      # CPU cores this rank may use
    source: str     # where that number came from
    dali: int       # DALI worker threads
    host: int       # CPU placement: threads finishing batches (RandAugment, normalise)
    torch: int      # torch intra-op threads

    def describe(self) -> str:
        return (f"threads: {self.cores} cores per rank ({self.source}) -> DALI {self.dali}, "
                f"host {self.host}, torch {self.torch}")


def local_world_size(environ: Mapping[str, str] = os.environ) -> int:
    """Ranks of this job on this node (1 when no launcher says)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):          # torchrun, deepspeed
        if environ.get(key):
            return max(1, int(environ[key]))
    tasks = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if tasks and "SLURM_PROCID" in environ:                 # e.g. "4(x2),3": per node, in order
        counts: List[int] = []
        for part in tasks.split(","):
            n, _, rep = part.partition("(x")
            counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
        node = int(environ.get("SLURM_NODEID", 0))
        return max(1, counts[node] if node < len(counts) else counts[0])
    return 1


def cores_per_rank(environ: Mapping[str, str] = os.environ, affinity: Optional[int] = None):
    """(cores this rank may use, where the number came from).

    srun with --cpus-per-task binds each task to its own cores: SLURM_CPUS_PER_TASK is the
    rank's share. Otherwise the ranks of a node share the cores this process may run on (its
    CPU affinity, which cgroups and taskset already narrow), evenly.
    """
    affinity = affinity or len(os.sched_getaffinity(0))
    if environ.get("SLURM_CPUS_PER_TASK") and "SLURM_PROCID" in environ:
        return min(int(environ["SLURM_CPUS_PER_TASK"]), affinity), "SLURM_CPUS_PER_TASK"
    local = local_world_size(environ)
    return max(1, affinity // local), f"{affinity} usable cores / {local} local rank{'s' * (local > 1)}"


# Where a CPU data path's time goes, per image (DeiT train augmentation, ImageNet-like JPEGs),
# measured per thread (fastdeit/data/README.md, "Data-path throughput"): DALI's decode of the
# crop window 1.1 ms; the resize to the train size 0.4 ms and RandAugment + normalisation
# 0.8 ms, both in the host pool (the feeder thread takes a share of the resizes); mixing
# 0.3 ms in the consumer's thread (benchmarks/data_profile.py on a 2-core Xeon with AVX-512/AMX;
# absolute costs differ by machine, about 2x on the AVX2-only EPYC, so the split below follows
# the shares, not one machine's times: re-run data_profile.py where the shares may differ).
_DECODE_MS, _RESIZE_MS, _FINISH_MS = 1.1, 0.4, 0.8


def _split(cores: int, dali_ms: float, host_ms: float) -> Tuple[int, int]:
    """DALI and host-pool threads for `cores` cores in proportion to their measured work."""
    dali = max(1, round(cores * dali_ms / (dali_ms + host_ms)))
    return dali, max(1, cores - dali)


def thread_budget(cores: int, data_on_gpu: bool, step_device: Optional[str], source: str = "given",
                  dali: Optional[int] = None, host: Optional[int] = None,
                  torch_threads: Optional[int] = None) -> ThreadBudget:
    """Split one rank's cores between DALI, the host threads and torch's intra-op pool.

    Every consumer defaults to "all the cores" on its own (DALI its num_threads, torch every
    core of the node per rank, the host pool its size), and together they oversubscribe:
    context switches and a run queue several times the core count, and epochs whose speed
    swings by half. The rule gives each the share of the work it does:

    * data on the GPU: DALI gets all but one core (its threads read files and feed nvJPEG),
      torch one (a training step on a GPU needs one launching thread; the per-batch CPU work
      is a few small random draws);
    * CPU decoding for a GPU step: one core for the training thread; the others split between
      DALI (decode) and the host pool (the resizes; RandAugment runs on the GPU) by their
      measured cost per image (1.1 : 0.4 ms: 11 DALI and 4 host threads of 16 cores), so that
      neither stage is the bottleneck of the other;
    * everything on the CPU: the step is by far the larger cost (DeiT-Ti at 224 px: ~14 img/s
      per step against ~390 img/s for the data path on two cores), so torch gets every core
      and the data path a quarter of them (at least one DALI and one host thread), which keeps
      the run queue near the core count;
    * no step (the data benchmark): the data path gets every core, split between DALI and the
      host pool (resize + RandAugment + normalise) by their measured costs (1.1 : 1.2 ms);
      the consumer's thread (mixing) and the feeder come on top, as on a real run.
    Explicit counts (config or OMP_NUM_THREADS) replace the derived ones.
    """
    cores = max(1, cores)
    if data_on_gpu:
        split = dict(dali=max(1, cores - 1), host=1, torch=1)
    elif step_device == "cuda":
        d, h = _split(cores - 1, _DECODE_MS, _RESIZE_MS)
        split = dict(dali=d, host=h, torch=1)
    elif step_device == "cpu":
        split = dict(dali=max(1, cores // 4), host=1, torch=cores)
    else:
        d, h = _split(cores, _DECODE_MS, _RESIZE_MS + _FINISH_MS)
        split = dict(dali=d, host=h, torch=1)
    if dali:
        split["dali"] = dali
    if host:
        split["host"] = host
    if torch_threads:
        split["torch"] = torch_threads
    return ThreadBudget(cores=cores, source=source, **split)


def rank_budget(cfg: RuntimeConfig, data_on_gpu: bool, step_device: Optional[str],
                dali: Optional[int] = None, host: Optional[int] = None,
                environ: Mapping[str, str] = os.environ) -> ThreadBudget:
    """This process's budget from the config and the environment (see thread_budget)."""
    if cfg.cores_per_rank:
        cores, source = cfg.cores_per_rank, "runtime.cores_per_rank"
    else:
        cores, source = cores_per_rank(environ)
    torch_threads = cfg.torch_threads or (int(environ["OMP_NUM_THREADS"])
                                          if environ.get("OMP_NUM_THREADS", "").isdigit() else None)
    return thread_budget(cores, data_on_gpu, step_device, source, dali, host, torch_threads)


def apply_budget(budget: ThreadBudget) -> None:
    """Size torch's intra-op pool (DALI and the host pool take theirs from the data config)."""
    torch.set_num_threads(budget.torch)
