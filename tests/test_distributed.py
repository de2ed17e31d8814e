"""Rank layout from deepspeed/torchrun and SLURM environments."""
from fastdeit.distributed import env_from, expand_nodelist


def test_deepspeed_or_torchrun_env():
    env = env_from({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (5, 16, 1, "n1", 1234)


def test_slurm_env():
    env = env_from({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                    "SLURM_JOB_NODELIST": "gpu[007-008],login3"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (9, 16, 1, "gpu007")
    assert not env.is_main


def test_single_process():
    env = env_from({})
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (0, 1, 0, True)


def test_expand_nodelist():
    assert expand_nodelist("node[1-3,10],gpu05") == ["node1", "node2", "node3", "node10", "gpu05"]
    assert expand_nodelist("a[08-10]") == ["a08", "a09", "a10"]
    assert expand_nodelist("single") == ["single"]


# ------------------------------------------------------------------ one device rule

import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastdeit import distributed  # noqa: E402
from fastdeit import threads  # noqa: E402
from fastdeit.distributed import DistEnv, device_for  # noqa: E402
from fastdeit.threads import thread_budget  # noqa: E402


@pytest.fixture
def fresh_accelerator(monkeypatch):
    """DeepSpeed's accelerator decided anew under a simulated host (it caches its choice)."""
    from deepspeed.accelerator import real_accelerator

    def choose(ds_env, cuda_gpus):
        monkeypatch.setattr(real_accelerator, "ds_accelerator", None)
        if ds_env is None:
            monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        else:
            monkeypatch.setenv("DS_ACCELERATOR", ds_env)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_gpus)
        return distributed.accelerator_name()

    yield choose
    real_accelerator.ds_accelerator = None   # the next user decides under the real host


def test_gpu_host_with_ds_accelerator_cpu_stays_on_cpu(fresh_accelerator):
    # `make test` on a GPU workstation: DS_ACCELERATOR=cpu puts the engine on the CPU, so the
    # batches and the teacher must go there too, whatever torch.cuda says.
    assert fresh_accelerator("cpu", cuda_gpus=2) == "cpu"
    for local in (0, 1):
        assert device_for(DistEnv(local_rank=local, world_size=2)) == torch.device("cpu")


def test_gpu_host_auto_gives_each_local_rank_its_gpu(fresh_accelerator):
    assert fresh_accelerator(None, cuda_gpus=8) == "cuda"
    devices = [device_for(DistEnv(rank=8 + r, local_rank=r, world_size=16)) for r in range(8)]
    assert devices == [torch.device("cuda", r) for r in range(8)]


def test_cpu_host_auto_is_cpu(fresh_accelerator):
    assert fresh_accelerator(None, cuda_gpus=0) == "cpu"
    assert device_for(DistEnv()) == torch.device("cpu")


def test_more_local_ranks_than_gpus_is_an_error_not_a_shared_gpu():
    env = DistEnv(local_rank=1, world_size=2)
    with pytest.raises(RuntimeError, match="local rank 1 needs its own GPU but only 1"):
        with_gpus(1, lambda: device_for(env, "cuda", environ={"CUDA_VISIBLE_DEVICES": "0,1"}))
    # srun --gpus-per-task=1: each task sees exactly its own GPU as device 0
    assert with_gpus(1, lambda: device_for(env, "cuda", environ={"CUDA_VISIBLE_DEVICES": "3"})) \
        == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="torch sees no GPU"):
        with_gpus(0, lambda: device_for(env, "cuda", environ={}))


def with_gpus(n, fn):
    real = torch.cuda.device_count
    torch.cuda.device_count = lambda: n
    try:
        return fn()
    finally:
        torch.cuda.device_count = real


def test_benchmarks_follow_the_same_rule(fresh_accelerator, monkeypatch):
    from benchmarks.common import pick_device

    fresh_accelerator("cpu", cuda_gpus=1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert pick_device("auto") == torch.device("cpu")
    fresh_accelerator(None, cuda_gpus=2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == torch.device("cuda", 1)


def test_the_data_placement_follows_the_device(fresh_accelerator):
    from fastdeit.data import DataConfig
    from fastdeit.data.loading.loader import resolve_placement

    fresh_accelerator("cpu", cuda_gpus=1)
    device = device_for(DistEnv())
    assert resolve_placement(DataConfig(device="auto"), device).device_id is None


# ------------------------------------------------------------------ thread budget per rank

def test_cores_per_rank_from_affinity_launchers_and_slurm():
    assert threads.cores_per_rank({}, affinity=16) == (16, "16 usable cores / 1 local rank")
    assert threads.cores_per_rank({"LOCAL_SIZE": "8"}, affinity=128)[0] == 16        # deepspeed
    assert threads.cores_per_rank({"LOCAL_WORLD_SIZE": "4"}, affinity=16)[0] == 4     # torchrun
    assert threads.cores_per_rank({"LOCAL_SIZE": "8"}, affinity=4)[0] == 1            # never 0
    srun = {"SLURM_PROCID": "9", "SLURM_CPUS_PER_TASK": "12", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}
    assert threads.cores_per_rank(srun, affinity=12) == (12, "SLURM_CPUS_PER_TASK")
    # srun without --cpus-per-task: the node's cores shared by its tasks (node 2 runs 3)
    srun = {"SLURM_PROCID": "17", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "8(x2),3"}
    assert threads.local_world_size(srun) == 3
    assert threads.cores_per_rank(srun, affinity=96)[0] == 32


def test_thread_budget_splits_and_never_oversubscribes_the_data_path():
    # data on the GPU: DALI all but one core, torch one
    b = thread_budget(16, data_on_gpu=True, step_device="cuda")
    assert (b.dali, b.host, b.torch) == (15, 1, 1)
    # CPU decoding feeding a GPU: the training thread keeps a core; decode and resize split
    # the rest by their cost per image (1.1 : 0.4 ms)
    b = thread_budget(16, data_on_gpu=False, step_device="cuda")
    assert (b.dali, b.host, b.torch) == (11, 4, 1)
    assert 1.1 / 11 == pytest.approx(0.4 / 4, rel=0.1)           # equal time per image per thread
    # all on the CPU: the step gets every core, the data path a quarter
    b = thread_budget(8, data_on_gpu=False, step_device="cpu")
    assert (b.dali, b.host, b.torch) == (2, 1, 8)
    b = thread_budget(1, data_on_gpu=False, step_device="cpu")        # the demo's ranks
    assert (b.dali, b.host, b.torch) == (1, 1, 1)
    b = thread_budget(2, data_on_gpu=False, step_device=None)         # the data benchmark
    assert (b.dali, b.host, b.torch) == (1, 1, 1)
    b = thread_budget(16, data_on_gpu=False, step_device=None)        # decode 1.1 : host 1.2 ms
    assert (b.dali, b.host, b.torch) == (8, 8, 1)                     # was 15 + 8: oversubscribed
    # explicit counts win
    b = thread_budget(8, False, "cpu", dali=3, host=2, torch_threads=4)
    assert (b.dali, b.host, b.torch) == (3, 2, 4)


def test_rank_budget_honours_config_and_omp_num_threads():
    cfg = threads.RuntimeConfig()
    env = {"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}
    b = threads.rank_budget(cfg, False, "cpu", environ=env)
    assert b.torch == 3 and "local ranks" in b.source
    b = threads.rank_budget(threads.RuntimeConfig(cores_per_rank=6, torch_threads=5), False,
                                "cpu", dali=4, environ=env)
    assert (b.cores, b.dali, b.torch, b.source) == (6, 4, 5, "runtime.cores_per_rank")
    assert "DALI 4, host 1, torch 5" in b.describe()


def test_teardown_gives_the_environment_back(monkeypatch):
    """A lone process's init() writes RANK, WORLD_SIZE, MASTER_PORT, ... for DeepSpeed;
    teardown() puts back what was there. Otherwise every process the caller starts later
    (a test's training run, an sbatch job) inherits rank 0 of 1 and a port whose store may
    still be open in this process (EADDRINUSE), and a second init() reuses that port."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    first = distributed.init()
    try:
        assert os.environ["MASTER_PORT"] == str(first.master_port) and os.environ["WORLD_SIZE"] == "1"
    finally:
        distributed.teardown()
    assert {k: os.environ.get(k) for k in keys} == dict.fromkeys(keys) | {"MASTER_ADDR": "127.0.0.1"}
    second = distributed.init()          # a fresh port: the first store may still hold its own
    distributed.teardown()
    assert second.master_port != first.master_port
    assert "MASTER_PORT" not in os.environ


def test_deepspeed_initializes_again_after_teardown(monkeypatch):
    """DeepSpeed caches its process groups in module globals; teardown() drops them, so a second
    init() + deepspeed.initialize in the same process (tests, notebooks) trains instead of
    failing on a group of the destroyed process group."""
    from fastdeit import engine as engine_lib

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for _ in range(2):
        distributed.init()
        try:
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 2)
            ds = engine_lib.deepspeed_config(engine_lib.EngineConfig(global_batch_size=2, zero_stage=1,
                                                                     precision="fp32"), world_size=1)
            engine = engine_lib.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), ds)
            engine.backward(engine(torch.ones(2, 4)).sum())
            engine.step()
            assert engine.global_steps == 1
        finally:
            distributed.teardown()


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_is_named_and_the_others_exit(dataset, tmp_path, victim):
    """Two ranks started as srun starts them, with no launcher to kill the survivor: SIGKILL
    one mid-training (what the OOM killer does); the other must exit within the heartbeat's
    3 beats (plus start-up) naming the dead rank, never sit in a collective until the timeout.
    The start-up line prints the collective timeout."""
    import signal
    import subprocess
    import sys
    import time

    from tests.launching import ROOT, TINY, env as launch_env, free_port, records

    run = tmp_path / "run"
    port = free_port()
    args = [*TINY, f"data.root={dataset}", f"trainer.run_dir={run}", "model.name=deit_tiny_patch16_224",
            "distill.type=none", "trainer.epochs=50", "logging.log_every=1",
            "distributed.timeout_minutes=5", "distributed.heartbeat_seconds=1"]
    procs = []
    for rank in range(2):
        env = dict(launch_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((run / "log.jsonl").is_file() and records(run, "step")):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.5)
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.time()
        survivor = procs[1 - victim]
        out, _ = survivor.communicate(timeout=120)
        waited = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        from fastdeit.distributed import shm_buffers
        for path in shm_buffers("127.0.0.1", port):
            os.unlink(path)
    assert survivor.returncode != 0
    assert f"rank {victim}" in out and "exiting rather than wait in a collective" in out, out[-3000:]
    assert waited < 60, waited                                  # 3 beats of 1 s, not the 5 min timeout
    if victim == 1:
        assert "collective timeout 5 min (distributed.timeout_minutes)" in out


@pytest.mark.parametrize("kind, dies", [("every_rank", False), ("1", True)])
def test_rank_0_waits_for_its_own_report_of_an_every_rank_mistake(monkeypatch, kind, dies):
    """A peer that left on a mistake every rank meets (a config or path error) does not get rank 0
    killed before rank 0's own thread reports the same mistake in one line (CI saw a 2-rank
    bad-resume run exit 1, 'rank 1 left with an error', where the error line and status 2 were
    expected); a peer that left on any other error is named at the next beat."""
    import time

    from fastdeit.distributed import PeerWatch, free_port
    from fastdeit.errors import ConfigError

    died = []
    monkeypatch.setattr(PeerWatch, "_die", lambda self, message: died.append(message))
    port = free_port()
    master = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    watch = PeerWatch(DistEnv(rank=0, world_size=2, master_addr="127.0.0.1", master_port=port), 0.05, 5)
    try:
        master.set(PeerWatch.PREFIX + "failed/1", kind)
        time.sleep(0.1)                     # two beats: within the grace of three
        assert bool(died) == dies, died
        watch.close(failed=ConfigError("checkpoint.resume=x: not a run"))   # rank 0 reports it
        assert master.get(PeerWatch.PREFIX + "failed/0") == b"every_rank"
        assert bool(died) == dies, died
    finally:
        watch.close()
