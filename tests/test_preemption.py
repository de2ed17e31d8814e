"""SignalWatch: SIGUSR1/SIGTERM recorded while training; ignored once a preempted rank leaves."""
import os
import signal

import pytest

from fastdeit.preemption import PREEMPTED_EXIT_CODE, SignalWatch, Stopped


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_records_the_signal_and_restores_handlers(restore_signals):
    before = signal.getsignal(signal.SIGTERM)
    with SignalWatch() as watch:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("preempted", [True, False])
def test_a_preempted_rank_ignores_the_kill_of_its_peers_exit(restore_signals, preempted):
    # srun --kill-on-bad-exit sends SIGTERM to the remaining ranks when the first exits 75:
    # they have written the checkpoint too and must keep their own exit status 75.
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    with pytest.raises(Stopped) as stop:
        with SignalWatch():
            raise Stopped("signal SIGUSR1", 12, "ckpt", preempted=preempted)
    assert stop.value.exit_code == (PREEMPTED_EXIT_CODE if preempted else 0)
    for s, handler in before.items():
        assert signal.getsignal(s) is (signal.SIG_IGN if preempted else handler)
    if preempted:
        os.kill(os.getpid(), signal.SIGTERM)        # would end this process if not ignored
