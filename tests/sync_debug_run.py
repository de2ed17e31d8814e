"""20 training steps on one GPU with every host synchronisation between logging steps an error.

    DS_ACCELERATOR=cuda python tests/sync_debug_run.py WORKDIR
    DS_ACCELERATOR=cpu python tests/sync_debug_run.py WORKDIR --dry-run   # plumbing, on CPU

Run by tests/test_host_copies.py::test_twenty_training_steps_without_a_host_sync (in its own
process: DeepSpeed picks its accelerator once per process). The real Trainer from build_trainer
with the recipe's per-step features on: the GPU DALI pipeline, RandAugment, random erasing,
Mixup/CutMix, a distilled DeiT with a frozen teacher and hard distillation, DeepSpeed ZeRO-1 in
bf16 with torch's fused AdamW (engine defaults), on a tiny model and 32-pixel images.

Two detectors are armed from the end of the first logging step (the first steps make the device
constants and warm the allocator, cuDNN and DeepSpeed up) to the end of the epoch, and disarmed
inside every logging step, whose meter read and flag all-reduce are the permitted syncs:

  * torch.cuda.set_sync_debug_mode("error"): any synchronising CUDA call that torch makes
    (.item(), a blocking copy, torch.cuda.synchronize, a stream or event wait) raises, from any
    thread (the mode is process-wide);
  * tests/copyspy.py's CopySpy with real pinning: a non_blocking copy from pageable memory is
    synchronous in the driver but invisible to the debug mode, so the spy counts those in the
    training thread.

Prints "armed steps N" and "blocking copies K" and exits 0 only when N = 20 and K = 0;
otherwise the traceback of the first synchronising call, or the copies' sources. --dry-run runs
the same steps on the CPU (CPU DALI, fp32 teacher) without the debug mode, which needs CUDA,
to check this script itself where there is no GPU.
"""
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdeit import distributed  # noqa: E402
from fastdeit.build import build_trainer  # noqa: E402
from fastdeit.config import load_config  # noqa: E402
from fastdeit.data.synthetic import generate  # noqa: E402
from tests.copyspy import CopySpy  # noqa: E402

LOG_EVERY = 5
MICRO = 16
STEPS = 25            # one epoch: a first logging window to warm up, then 20 armed steps


def main(workdir: str, dry_run: bool = False) -> int:
    if not dry_run and not torch.cuda.is_available():
        print("needs CUDA (or --dry-run)")
        return 2
    work = Path(workdir)
    data = generate(str(work / "data"), classes=4, train_per_class=STEPS * MICRO // 4,
                    val_per_class=2, min_size=36, max_size=56, seed=0, workers=4)
    teacher = work / "teacher.pth"
    torch.save(timm.create_model("resnet10t", num_classes=4).state_dict(), teacher)
    cfg = load_config(None, [
        f"data.root={data}", f"data.device={'cpu' if dry_run else 'gpu'}", "data.img_size=32",
        "data.num_threads=2", f"teacher.dtype={'fp32' if dry_run else 'bf16'}",
        "data.repeated_aug=1",
        "model.name=deit_tiny_distilled_patch16_224",
        "model.kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}",
        "distill.type=hard", "teacher.name=resnet10t", f"teacher.weights={teacher}",
        f"engine.global_batch_size={MICRO}", "engine.zero_stage=1", "engine.precision=bf16",
        # The engine's defaults as a user gets them (engine.overlap_comm is off: see engine.py).
        "trainer.epochs=1", f"trainer.run_dir={work / 'run'}",
        f"logging.log_every={LOG_EVERY}", "logging.progress=lines",
    ])
    env = distributed.init()
    try:
        trainer = build_trainer(cfg, env)
        assert trainer.device.type == ("cpu" if dry_run else "cuda"), trainer.device
        assert len(trainer.train_loader) == STEPS, len(trainer.train_loader)
        return run(trainer, debug_mode=(lambda mode: None) if dry_run else torch.cuda.set_sync_debug_mode)
    finally:
        if not dry_run:
            torch.cuda.set_sync_debug_mode("default")
        distributed.teardown()


def run(trainer, debug_mode) -> int:
    spy = CopySpy(fake_pinning=False)
    state = {"armed_at": None, "steps": 0, "copies": []}

    def arm():
        spy.take()
        state["armed_at"] = trainer.engine.global_steps
        debug_mode("error")

    def disarm():
        debug_mode("default")
        if state["armed_at"] is not None:
            state["steps"] += trainer.engine.global_steps - state["armed_at"]
            state["copies"] += spy.take()
        state["armed_at"] = None

    log_step, maybe_stop = trainer._log_step, trainer._maybe_stop

    def logged(*args, **kwargs):          # a logging step: the permitted syncs
        disarm()
        return log_step(*args, **kwargs)

    def stopped(*args, **kwargs):          # the logging step's end: arm for the next window
        maybe_stop(*args, **kwargs)
        arm()

    trainer._log_step, trainer._maybe_stop = logged, stopped
    with spy:
        try:
            trainer.train_epoch(0)
        finally:
            disarm()
    blocking = CopySpy.blocking(state["copies"])
    print(f"armed steps {state['steps']}")
    print(f"blocking copies {len(blocking)}")
    for c in blocking:
        print(f"  {c.what} at {c.where}")
    return 0 if state["steps"] == STEPS - LOG_EVERY and not blocking else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], dry_run="--dry-run" in sys.argv[2:]))
