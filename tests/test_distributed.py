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
