"""Non-finite loss / gradient policy, without a host-device sync per step.

- fp16: the loss scaler skips overflow steps itself; the loop counts them (``train/skipped_steps``).
- bf16 / fp32: every optimizer step records, on the device, whether its gradient norm (or, when the backend
  gives none, its loss) is finite and the first step that was not. The flag is read only where the loop
  already waits for the device: the log window, before a checkpoint, before an evaluation and at the end.
  So a bad step ``k`` is detected at the first of those after it (at most ``train.log_every - 1`` steps
  later) and, since every checkpoint is preceded by the check, nothing computed after ``k`` is ever saved.
  With ``train.max_nonfinite_skips = N > 0`` the norm is read on the host at every step (one sync per step,
  opt-in) and up to N bad steps are skipped (their gradients dropped, no update, no scheduler step).

Test hook: ``GLUE_TRAIN_DEBUG_NAN_AT_STEP=5`` (or ``3,5``; ``5@1`` = rank 1 only) makes the loss of those
optimizer steps NaN.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import torch

from train.engine.backends.base import Backend
from train.errors import ConfigError, NonFiniteError

log = logging.getLogger(__name__)
NAN_ENV = "GLUE_TRAIN_DEBUG_NAN_AT_STEP"


def nan_steps(rank: int) -> frozenset[int]:
    """Optimizer steps (1-based) whose loss the debug hook turns into NaN on this rank."""
    steps = set()
    for item in os.environ.get(NAN_ENV, "").replace(" ", "").split(","):
        if not item:
            continue
        step, _, only = item.partition("@")
        if not only or int(only) == rank:
            steps.add(int(step))
    return frozenset(steps)


class Guard:
    def __init__(
        self,
        acc,
        model: torch.nn.Module,
        precision: str,
        max_skips: int,
        last_checkpoint: Callable[[], object] = lambda: None,
        backend: Backend | None = None,
    ):
        """``backend``: the run's Backend (default: the base one, whose engine leaves the optimizer step to us)."""
        self.acc, self.model, self.precision, self.max_skips = acc, model, precision, max_skips
        backend = backend or Backend()
        if max_skips > 0 and backend.owns_optimizer_step:
            raise ConfigError(
                f"train.max_nonfinite_skips={max_skips} is not supported under {backend.name}: its engine owns the "
                "gradients, so a step cannot be dropped from outside. Set train.max_nonfinite_skips=0 (the run "
                "stops at a non-finite step and resumes from the last good checkpoint), or use fp16, whose "
                "loss scaler skips overflow steps itself"
            )
        self.last_checkpoint = last_checkpoint  # () -> str | None, for the error message
        self.inject = nan_steps(acc.process_index)
        # device-side: the first bad optimizer step since the last check (0 = none)
        self.first_bad = torch.zeros((), dtype=torch.long, device=acc.device)
        self.skipped_now = False  # this step's gradients were dropped (bf16/fp32, max_skips > 0)
        self.skips = 0  # steps dropped since this process started (the limit is per start, not per run)

    def poison(self, losses: torch.Tensor, step: int) -> torch.Tensor:
        """The NaN-injection hook (a no-op unless the env var names ``step``)."""
        return losses * float("nan") if step in self.inject else losses

    def after_backward(self, step: int, norm, loss: torch.Tensor) -> None:
        """At the optimizer step's last micro-batch, before ``optimizer.step()``: record (and maybe skip)."""
        self.skipped_now = False
        if self.precision == "fp16":
            return  # the scaler finds and skips overflow steps; the loop counts them
        value = norm if norm is not None else loss
        value = torch.as_tensor(value, device=self.first_bad.device, dtype=torch.float32)
        if self.max_skips > 0:  # opt-in: one host sync per step, to drop the update before it happens
            if math.isfinite(float(value)):
                return
            self.skips += 1
            if self.skips > self.max_skips:
                self._fail(step, f"more than train.max_nonfinite_skips={self.max_skips} such steps")
            log.warning(
                "non-finite gradient norm at step %d: update skipped (%d of at most %d)",
                step,
                self.skips,
                self.max_skips,
            )
            for p in self.model.parameters():
                p.grad = None  # torch optimizers leave parameters without a gradient untouched
            self.skipped_now = True
            return
        bad = ~torch.isfinite(value)
        self.first_bad = torch.where(
            bad & (self.first_bad == 0), torch.full_like(self.first_bad, step), self.first_bad
        )

    def check(self, where: str) -> None:
        """Collective (every rank calls it at the same point): raise on every rank if any saw a bad step."""
        if self.precision == "fp16" or self.max_skips > 0:
            return
        first = self.first_bad
        if self.acc.num_processes > 1:
            first = self.acc.gather(first.reshape(1))
        bad = [int(s) for s in first.reshape(-1).tolist() if s > 0]
        if bad:
            self._fail(min(bad), f"detected {where}")

    def _fail(self, step: int, how: str) -> None:
        last = self.last_checkpoint()
        raise NonFiniteError(
            f"non-finite training loss or gradient norm at optimizer step {step} (precision "
            f"{self.precision or 'no'}; {how}). The run stopped without writing a checkpoint after that step; "
            + (
                f"the last good checkpoint is {last} and checkpoint.resume=auto resumes from it. "
                if last
                else "there is no earlier checkpoint. "
            )
            + "Lower train.lr, enable train.max_grad_norm, "
            + ("use precision=no instead of bf16, " if self.precision == "bf16" else "")
            + "or set train.max_nonfinite_skips=N to skip up to N such steps"
        )
