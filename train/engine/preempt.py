"""Preemption and Ctrl-C: SIGUSR1/SIGTERM/SIGINT ask for a clean stop, honoured wherever the run is.

The CLI installs the handler before anything slow (:func:`train.cli.train_main`); it only sets a flag. The ranks
agree on it (:meth:`StopFlag.vote`, a CPU all-reduce) after every optimizer step, between start-up stages, every
few batches of an evaluation or a test prediction, between tokenizer batches and between compiled shapes. After a
step the loop checkpoints; elsewhere :meth:`StopFlag.check` raises :class:`~train.errors.StopRequested` on every
rank at once: an abandoned evaluation is redone after the resume, an abandoned start-up has nothing to save
(:meth:`StopFlag.exit_early`). Under SLURM a SIGUSR1/SIGTERM also asks for a requeue, so the job carries on from
where it stopped. A second Ctrl-C does not wait: it interrupts at once (exit 130; the previous checkpoint is intact).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from train.errors import INTERRUPTED, StopRequested, rank

log = logging.getLogger(__name__)


class StopFlag:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.signum: int | None = None  # the signal this process got (-1: a peer's)
        self.agreed = False  # every rank agreed to stop after the current step (train.engine.loop)

    def install(self) -> StopFlag:
        self.pid = os.getpid()
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if os.getpid() != self.pid:  # a forked child (DataLoader worker): torchrun signals the process group;
            return  # the training process decides when its workers end
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None:
            what = (
                "Ctrl-C (again to stop at once)" if signum == signal.SIGINT else signal.Signals(signum).name
            )
            log.warning(
                "received %s: stopping at the next safe point (after a step: with a checkpoint)", what
            )
        self.signum = signum

    @property
    def requeue(self) -> bool:
        """A scheduler's stop (SIGUSR1/SIGTERM) asks for a requeue; the user's Ctrl-C does not."""
        return self.signum not in (None, signal.SIGINT)

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def vote(self) -> bool:
        """Collective. True on every rank if any rank got a signal (a CPU all-reduce, no device sync)."""
        from train.engine import dist

        stop = dist.any_rank(self.raised)
        if stop and not self.raised:
            self.signum = -1  # a peer was signalled
        return stop

    def check(self, where: str) -> None:
        """Collective where the ranks can vote: raise :class:`StopRequested` on every rank if any got a signal.

        Before the processes of a launch form their group they cannot agree, and one leaving alone would leave
        the others waiting for it: then the check is left to the next one (a single process decides alone)."""
        if not _can_vote():
            return
        if self.vote():
            raise StopRequested(where)

    def exit_early(self, stopped: StopRequested) -> int:
        """A stop before this start trained a step: nothing new to save. One line, the requeue under SLURM, the
        process group closed; the exit code preemption always has (0; 130 for Ctrl-C)."""
        code = INTERRUPTED if self.signum == signal.SIGINT else 0
        if rank() == 0:
            sys.stderr.write(
                f"stopped while {stopped.where}, before this start trained a step: nothing new to save; rerun the "
                "same command to go on" + (" (a SLURM job requeues itself)" if self.requeue else "") + "\n"
            )
            sys.stderr.flush()
            if self.requeue:
                requeue_if_slurm()
        tdist = sys.modules.get("torch.distributed")
        if tdist is not None and tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
        return code


def _can_vote() -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return True
    tdist = sys.modules.get("torch.distributed")  # never imported here: before torch loads there is no group
    return tdist is not None and tdist.is_available() and tdist.is_initialized()


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
