"""One rank of the data.stage_to test under srun (tests/test_data_stage.py): joins a gloo process
group through the job's rendezvous as training does, stages with fastdeit.data.stage.stage_data,
and prints one JSON line: which rank, node and copy, when it left the barrier and, for a node's
copier, when its copy ended. The copier sleeps first, so that a rank that did not wait for every
node's copy would show it.

    srun ... python tests/stage_probe.py ROOT STAGE_TO COPY_DELAY_S
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from fastdeit.data import DataConfig  # noqa: E402
from fastdeit.data import stage as stage_lib  # noqa: E402
from fastdeit.distributed import env_from  # noqa: E402


def main(root: str, stage_to: str, delay: float) -> None:
    env = env_from(os.environ)
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))
    dist.init_process_group("gloo", init_method="env://")
    copied = {}
    real_stage = stage_lib.stage

    def slow_stage(*args, **kwargs):
        time.sleep(delay)
        result = real_stage(*args, **kwargs)
        copied.update(at=time.time(), result=vars(result))
        return result

    stage_lib.stage = slow_stage
    cfg = stage_lib.stage_data(DataConfig(root=root, stage_to=stage_to), env)
    left = time.time()
    print(json.dumps(dict(rank=env.rank, local=env.local_rank, node=os.environ["SLURMD_NODENAME"], root=cfg.root,
                          left_barrier=left, **copied)), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
