"""Preemption: turn SIGUSR1/SIGTERM into a request the trainer honours at its next logging step.

SLURM sends SIGUSR1 ahead of the time limit (``--signal=USR1@300``) and SIGTERM on preemption,
to every task at about the same time; ranks may still see it on different steps, so the
trainer all-reduces the request on a logging step (where it syncs anyway) and every rank stops
after the same optimizer step, writes the checkpoint, and exits with ``PREEMPTED_EXIT_CODE``.
The sbatch templates requeue the job on that code.
"""
from __future__ import annotations

import signal
import threading
from typing import Dict, Optional

PREEMPTED_EXIT_CODE = 75   # EX_TEMPFAIL (sysexits.h): a temporary failure, worth retrying


class Stopped(Exception):
    """Training stopped early and cleanly after writing a checkpoint."""

    def __init__(self, reason: str, step: int, checkpoint: str, preempted: bool):
        super().__init__(f"stopped after optimizer step {step} ({reason}); checkpoint {checkpoint}")
        self.reason, self.step, self.checkpoint, self.preempted = reason, step, checkpoint, preempted

    @property
    def exit_code(self) -> int:
        return PREEMPTED_EXIT_CODE if self.preempted else 0


class SignalWatch:
    """Records that a stop signal arrived; installs its handlers only on the main thread."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: Dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "SignalWatch":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A preempted rank leaving here has its checkpoint written and exits with
        # PREEMPTED_EXIT_CODE. Ranks leave moments apart, and srun --kill-on-bad-exit answers
        # the first exit 75 with SIGTERM to the others: ignored from now on, so every rank
        # still exits 75 (not 143) and the template requeues the job.
        leaving = isinstance(exc, Stopped) and exc.preempted
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if leaving else previous)
        self._previous.clear()
