"""SignalWatch: the configured stop signals (trainer.stop_signals, default SIGUSR2/SIGTERM)
recorded while training; others left alone; ignored once a preempted rank leaves."""
import contextlib
import os
import signal

import pytest

from fastdeit.config import load_config
from fastdeit.errors import ConfigError
from fastdeit.preemption import DEFAULT_STOP_SIGNALS, PREEMPTED_EXIT_CODE, SignalWatch, Stopped, check_signals

WATCHED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in WATCHED}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_default_is_usr2_not_usr1_and_the_templates_agree():
    # NCCL may take SIGUSR1 over (NVIDIA/nccl #704): the default must not rely on it, and the
    # sbatch templates must ask SLURM for the signal the trainer listens to.
    assert DEFAULT_STOP_SIGNALS == ("SIGUSR2", "SIGTERM")
    assert load_config(None).trainer.stop_signals == ["SIGUSR2", "SIGTERM"]
    root = os.path.join(os.path.dirname(__file__), "..", "launch", "slurm")
    for template in ("single_node.sbatch", "multi_node.sbatch"):
        with open(os.path.join(root, template)) as f:
            assert "#SBATCH --signal=USR2@300\n" in f.read(), template


def test_records_the_default_signal_and_restores_handlers(restore_signals):
    before = {s: signal.getsignal(s) for s in WATCHED}
    with SignalWatch() as watch:
        assert signal.getsignal(signal.SIGUSR1) is before[signal.SIGUSR1]    # not ours by default
        os.kill(os.getpid(), signal.SIGUSR2)
        assert watch.received == "SIGUSR2"
    assert all(signal.getsignal(s) is before[s] for s in WATCHED)


def test_configured_signals_only(restore_signals):
    hits = []
    signal.signal(signal.SIGUSR2, lambda *a: hits.append("USR2"))
    with SignalWatch(["SIGUSR1", "SIGTERM"]) as watch:
        os.kill(os.getpid(), signal.SIGUSR2)          # someone else's: its own handler runs
        assert watch.received is None and hits == ["USR2"]
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.received == "SIGUSR1"


@pytest.mark.parametrize("bad", [["SIGFOO"], ["USR2"], ["SIGKILL"], []])
def test_bad_signal_names_are_one_line_config_errors(bad):
    with pytest.raises(ConfigError, match="trainer.stop_signals"):
        check_signals(bad)
    with pytest.raises(ConfigError, match="stop_signals"):
        SignalWatch(bad)


@pytest.mark.parametrize("preempted", [True, False])
def test_a_preempted_rank_ignores_the_kill_of_its_peers_exit(restore_signals, preempted):
    # srun --kill-on-bad-exit sends SIGTERM to the remaining ranks when the first exits 75:
    # they have written the checkpoint too and must keep their own exit status 75.
    before = {s: signal.getsignal(s) for s in WATCHED}
    with pytest.raises(Stopped) as stop:
        with SignalWatch():
            raise Stopped("signal SIGUSR2", 12, "ckpt", preempted=preempted)
    assert stop.value.exit_code == (PREEMPTED_EXIT_CODE if preempted else 0)
    for s in DEFAULT_STOP_SIGNALS:
        s = getattr(signal, s)
        assert signal.getsignal(s) is (signal.SIG_IGN if preempted else before[s])
    if preempted:
        os.kill(os.getpid(), signal.SIGTERM)        # would end this process if not ignored


@pytest.mark.parametrize("stop", [None, Stopped("signal SIGUSR2", 12, "ckpt", preempted=False)])
def test_a_watch_held_until_exit_leaves_the_signals_ignored(restore_signals, stop):
    # launch/train.py holds one watch for the process: after it (teardown, interpreter shutdown)
    # a late SIGUSR2/SIGTERM must not turn a finished run into a job killed by a signal.
    with pytest.raises(Stopped) if stop else contextlib.nullcontext():
        with SignalWatch(until_exit=True) as watch:
            if stop:
                raise stop
    assert watch.received is None
    for s in DEFAULT_STOP_SIGNALS:
        assert signal.getsignal(getattr(signal, s)) is signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGUSR2)            # would end this process if not ignored
