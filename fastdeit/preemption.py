"""Preemption: turn stop signals into a request the trainer honours at its next logging step.

Which signals: ``trainer.stop_signals``, default SIGUSR2 and SIGTERM. SLURM sends the
templates' ``--signal=USR2@300`` ahead of the time limit and SIGTERM on preemption. Not SIGUSR1
by default: some NCCL versions install their own SIGUSR1 handler in every process that
initialises a communicator (NVIDIA/nccl #704), replacing ours after start-up, so the warning
would be lost and the job killed at the limit without a checkpoint; submitit moved its
default to USR2 for the same reason. A cluster whose tooling sends USR1 sets
``trainer.stop_signals=[SIGUSR1,SIGTERM]`` and the templates' ``--signal=USR1@300`` together.

SLURM sends the signal
to every task at about the same time; ranks may still see it on different steps, so the
trainer all-reduces the request on a logging step (where it syncs anyway) and every rank stops
after the same optimizer step, writes the checkpoint, and exits with ``PREEMPTED_EXIT_CODE``.
The sbatch templates requeue the job on that code.

``launch/train.py`` holds one watch for the whole life of the process (``until_exit=True``),
from just after the config is read until the interpreter leaves: a signal that lands while the
models are being built is honoured at the first logging step, and one that lands after the last
step (final evaluation, export, teardown, interpreter shutdown) is noted and otherwise ignored.
With only the training loop watched, SLURM's ``USR2@300`` arriving during the final export killed
the finished run with the default action (exit 140) and SLURM marked the job FAILED.
"""
from __future__ import annotations

import signal
import threading
from typing import Dict, Optional, Sequence

from fastdeit.errors import ConfigError

PREEMPTED_EXIT_CODE = 75   # EX_TEMPFAIL (sysexits.h): a temporary failure, worth retrying


class Stopped(Exception):
    """Training stopped early and cleanly after writing a checkpoint."""

    def __init__(self, reason: str, step: int, checkpoint: str, preempted: bool):
        super().__init__(f"stopped after optimizer step {step} ({reason}); checkpoint {checkpoint}")
        self.reason, self.step, self.checkpoint, self.preempted = reason, step, checkpoint, preempted

    @property
    def exit_code(self) -> int:
        return PREEMPTED_EXIT_CODE if self.preempted else 0


DEFAULT_STOP_SIGNALS = ("SIGUSR2", "SIGTERM")
# Signals that must keep their default action (or cannot be caught): a stop request is a polite
# request, never these.
_REFUSED = {"SIGKILL", "SIGSTOP", "SIGINT", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGCHLD"}


def check_signals(names: Sequence[str], key: str = "trainer.stop_signals") -> None:
    """ConfigError naming the value unless every name is a catchable signal ('SIGUSR2', 'SIGTERM')."""
    if not names:
        raise ConfigError(f"{key} is empty: give at least one signal (default {list(DEFAULT_STOP_SIGNALS)})")
    for name in names:
        if not isinstance(getattr(signal, str(name), None), signal.Signals) or name in _REFUSED:
            raise ConfigError(f"{key}: {name!r} is not a signal a stop can be requested with; use names such "
                              f"as SIGUSR2, SIGUSR1, SIGTERM (default {list(DEFAULT_STOP_SIGNALS)})")


class SignalWatch:
    """Records that a stop signal arrived; installs its handlers only on the main thread.

    ``until_exit``: the watch spans the rest of the process, so on leaving it the signals are
    ignored rather than given back their previous (default: terminate) action."""

    def __init__(self, signals: Sequence[str] = DEFAULT_STOP_SIGNALS, until_exit: bool = False):
        check_signals(signals)
        self.signals = tuple(signals)
        self.until_exit = until_exit
        self.received: Optional[str] = None
        self._previous: Dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "SignalWatch":
        if threading.current_thread() is threading.main_thread():
            for name in self.signals:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A preempted rank leaving here has its checkpoint written and exits with
        # PREEMPTED_EXIT_CODE. Ranks leave moments apart, and srun --kill-on-bad-exit answers
        # the first exit 75 with SIGTERM to the others: ignored from now on, so every rank
        # still exits 75 (not 143) and the template requeues the job.
        leaving = self.until_exit or (isinstance(exc, Stopped) and exc.preempted)
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if leaving else previous)
        self._previous.clear()
