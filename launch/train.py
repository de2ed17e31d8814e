"""Train DeiT.  deepspeed launch/train.py --config configs/deit_b.yaml [key.sub=value ...]

Also runs under torchrun, srun (one task per GPU) or plain python (one process). Exit codes:
0 done (or stopped by trainer.stop_after_steps), 75 preempted by a stop signal (trainer.stop_signals: SIGUSR2/SIGTERM) after writing
a checkpoint (requeue and it resumes), 2 a mistake in the config, data, weights or checkpoint
(one line `fastdeit: error: ...` on stderr, from rank 0), 1 any other error (with its traceback).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdeit import distributed  # noqa: E402
from fastdeit.build import build_trainer  # noqa: E402
from fastdeit.config import load_config  # noqa: E402
from fastdeit.cli import reported  # noqa: E402
from fastdeit.export import record_command  # noqa: E402
from fastdeit.preemption import SignalWatch, Stopped  # noqa: E402


def main(argv=None, whole_process: bool = False) -> dict:
    """``whole_process``: this call is the program (the ``__main__`` block), so the stop signals
    stay caught, then ignored, until the interpreter exits; in-process callers get theirs back."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see configs/); omitted: the built-in defaults")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="added by the deepspeed launcher; LOCAL_RANK in the environment wins")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    cfg = load_config(args.config, args.overrides)
    # Stop signals are watched from here until the process leaves (fastdeit.preemption): one
    # that lands while the models build stops the run at its first logging step, one that lands
    # after the last step is ignored, so a finished run never dies of it mid-export.
    with SignalWatch(cfg.trainer.stop_signals, until_exit=whole_process) as signals:
        return _run(cfg, signals)


def _run(cfg, signals: SignalWatch) -> dict:
    env = distributed.init(cfg=cfg.distributed)
    failed = True
    try:
        if env.is_main:      # for the model card of the exported folder (fastdeit.export)
            record_command(Path(cfg.trainer.run_dir))
        summary = build_trainer(cfg, env).fit(signals)
        failed = False
        if signals.received and env.is_main:
            print(f"{signals.received} arrived after the last training step: nothing left to stop", flush=True)
        return summary
    except Stopped as stop:
        failed = False                      # every rank stops at the same step, checkpoint written
        sys.exit(stop.exit_code)
    except Exception as error:
        failed = error                      # teardown tells rank 0 what kind of error it was
        distributed.name_dead_peer(error)   # a dead rank: exits here naming it (status 1)
        raise
    finally:
        distributed.teardown(failed=failed)


if __name__ == "__main__":
    with reported():
        main(whole_process=True)
