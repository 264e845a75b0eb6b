"""Preemption and Ctrl-C: SIGUSR1/SIGTERM/SIGINT ask for a clean stop at the next optimizer-step boundary.

The handler only sets a flag; the loop agrees on it across ranks, checkpoints, and (under SLURM, for SIGUSR1 and
SIGTERM) asks for a requeue, so the job carries on from exactly where it stopped. A second Ctrl-C does not wait
for the checkpoint: it interrupts at once (the program exits 130; the previous checkpoint is intact).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None  # the signal this process got (-1: a peer's)
        self.agreed = (
            False  # every rank agreed to stop after the current step (train.engine.loop.should_stop)
        )

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None:
            what = (
                "Ctrl-C (again to stop at once)" if signum == signal.SIGINT else signal.Signals(signum).name
            )
            log.warning("received %s: stopping after the current optimizer step, with a checkpoint", what)
        self.signum = signum

    @property
    def requeue(self) -> bool:
        """A scheduler's stop (SIGUSR1/SIGTERM) asks for a requeue; the user's Ctrl-C does not."""
        return self.signum not in (None, signal.SIGINT)

    @property
    def raised(self) -> bool:
        return self.signum is not None


def requeue_if_slurm() -> bool:
    """Ask SLURM to requeue this job (it restarts and resumes from the checkpoint just written)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    if os.environ.get("SLURM_ARRAY_JOB_ID"):  # an array task is requeued by its own <array>_<task> id
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode:
        log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        return False
    log.warning("requeued SLURM job %s", job)
    return True
