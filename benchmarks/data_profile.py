"""Where the CPU data path's time goes, per image and per thread: the figures behind the thread
budget's split (fastdeit/threads.py, _DECODE_MS / _RESIZE_MS / _FINISH_MS).

    python benchmarks/data_profile.py --data /tmp/inet [--batch 32 --epochs 4]

Runs our train loader (DeiT augmentation, CPU placement) plus BatchMixer on one thread budget
(`--dali-threads`, default 1, and one host thread, so that each stage has its own thread) and
reports, over the epochs after the first:

  decode   CPU time of DALI's threads (file read, libjpeg-turbo decode of the crop window)
  feed     the feeder thread: DALI's hand-over and the resizes to the train size
  finish   the host pool: RandAugment and normalisation
  mix      the consumer's thread: random erasing, Mixup/CutMix, targets
  wait     wall time the consumer waited for a batch

as CPU ms per image (each thread's own clock, so time spent waiting for a core is not charged)
and as the share of the process's CPU time; "cores busy" is CPU seconds per wall second, and
"to first batch" the wall time from set_epoch to the first batch against the steady gap
between batches (the epoch's ramp, where the stages cannot overlap yet).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdeit.data import DataConfig, build_loader  # noqa: E402
from fastdeit.data.loading import loader as loader_module  # noqa: E402
from fastdeit.data.augment.mixing import BatchMixer, MixingConfig  # noqa: E402


def _dali_cpu_ns() -> dict:
    """{thread id: on-CPU ns} of this process's DALI threads (their names start with [DALI])."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if not f.read().startswith("[DALI]"):
                    continue
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except OSError:
            pass  # ended in between
    return out


def _timed(owner, name: str, totals: dict, key: str) -> None:
    """Charge the calling thread's CPU time in owner.name to totals[key]."""
    inner = getattr(owner, name)
    lock = threading.Lock()

    def wrapper(*args, **kwargs):
        start = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            with lock:
                totals[key] += time.thread_time() - start

    setattr(owner, name, wrapper)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder holding train/<class>/*.jpg")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dali-threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    totals = dict(feed=0.0, finish=0.0, mix=0.0, wait=0.0)
    _timed(loader_module.TrainLoader, "_read_host", totals, "feed")
    _timed(loader_module.TrainLoader, "_augment", totals, "finish")
    cfg = DataConfig(root=args.data, img_size=args.img_size, num_threads=args.dali_threads,
                     host_threads=1, rand_augment="rand-m9-mstd0.5-inc1", repeated_aug=1,
                     device="cpu")
    loader = build_loader(cfg, "train", args.batch, 0, 1, 0, torch.device("cpu"))
    mixer = BatchMixer(MixingConfig(), loader.num_classes, torch.device("cpu"))
    dali_ns, images, ramps, gaps = {}, 0, [], []
    for epoch in range(args.epochs):
        if epoch == 1:  # the first epoch warms up; count from here
            for k in totals:
                totals[k] = 0.0
            dali_ns.clear()
            wall, cpu = time.perf_counter(), time.process_time()
        start = time.perf_counter()
        loader.set_epoch(epoch, then=epoch + 1 if epoch + 1 < args.epochs else None)   # as the trainer
        last = start
        for i, (x, y) in enumerate(loader):
            now = time.perf_counter()
            c = time.thread_time()
            mixer(x, y)
            totals["mix"] += time.thread_time() - c
            if epoch:
                (ramps if i == 0 else gaps).append(now - last)   # set_epoch .. first batch; waits
                totals["wait"] += now - last if i else 0.0
                images += x.shape[0]
                dali_ns.update(_dali_cpu_ns())  # the pipeline's threads end with the epoch
            last = time.perf_counter()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    loader.close()
    stages = dict(decode=sum(dali_ns.values()) / 1e9, feed=totals["feed"],
                  finish=totals["finish"], mix=totals["mix"])
    print(f"{images} images, batch {args.batch}, DALI threads {args.dali_threads}, 1 host thread: "
          f"{images / wall:.0f} img/s, {1e3 * cpu / images:.2f} CPU ms/img, "
          f"cores busy {cpu / wall:.2f}")
    for name, seconds in stages.items():
        print(f"  {name:7s} {1e3 * seconds / images:5.2f} ms/img  {100 * seconds / cpu:4.0f}% of CPU")
    rest = cpu - sum(stages.values())
    print(f"  {'other':7s} {1e3 * rest / images:5.2f} ms/img  {100 * rest / cpu:4.0f}% of CPU "
          "(interpreter, allocator, DALI's last batch of each epoch)")
    print(f"  consumer waited {1e3 * totals['wait'] / images:.2f} ms/img between batches; to "
          f"the first batch of an epoch {1e3 * statistics.median(ramps):.0f} ms, against a "
          f"median wait of {1e3 * statistics.median(gaps):.0f} ms and "
          f"{1e3 * wall / (images / args.batch):.0f} ms of wall time per batch")


if __name__ == "__main__":
    main()
