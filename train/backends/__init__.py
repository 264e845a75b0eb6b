"""One seam for the distributed backend: DDP (also a single process), DeepSpeed ZeRO, or FSDP.

The backend is chosen by the launch (``accelerate launch --config_file configs/accelerate/<name>.yaml``), never
by the run config, and :func:`current` returns the one in use. Everything that differs between backends is a
method of :class:`Backend`; the loop, the fast path, the non-finite guard, checkpoints and tracking ask the
backend and never test which one it is. To add a backend: a module here with a subclass, a branch in
:func:`current`, an Accelerate config in ``configs/accelerate/``, and its equivalence test against DDP.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

if (
    TYPE_CHECKING
):  # this module stays light: the CLI asks which backend a launch uses before torch is imported
    import torch


class Backend:
    """The defaults are DDP's (and a single process's): Accelerate prepares, torch's AdamW steps."""

    name = "ddp"
    # The backend's engine runs backward and the optimizer step itself, so an update cannot be dropped from
    # outside (train.max_nonfinite_skips).
    owns_optimizer_step = False
    # Why the fast path (train/fastpath.py) cannot run under this backend; empty when it can.
    fast_path_off = ""

    # -- start-up
    def make_accelerator(self, mixed_precision: str, accum: int, cuda: bool):
        """An Accelerator for this launch (CPU processes run over gloo)."""
        from accelerate import Accelerator

        return Accelerator(
            cpu=not cuda,  # MULTI_CPU over gloo under torchrun / accelerate launch
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=accum,
            step_scheduler_with_optimizer=False,
        )

    def make_optimizer(self, cfg, groups: list[dict]) -> torch.optim.Optimizer:
        """torch's AdamW over ``groups`` with the run config's hyper-parameters."""
        if cfg.deepspeed.fused_adam:
            from train.config import ConfigError

            raise ConfigError(
                "deepspeed.fused_adam=true needs a DeepSpeed launch (accelerate launch --config_file "
                "configs/accelerate/zero*.yaml); without DeepSpeed set deepspeed.fused_adam=false"
            )
        import torch

        t = cfg.train
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)

    def prepare(self, acc, cfg, layout, *objects, precision: str | None = None):
        return acc.prepare(*objects)

    # -- parameters as the backend holds them
    def param_ndim(self, p: torch.Tensor) -> int:
        return p.ndim

    def param_numel(self, p: torch.Tensor) -> int:
        return p.numel()

    # -- the step
    def grad_norm(self, acc, model, max_norm: float | None):
        """Clip the global gradient norm to ``max_norm`` and return the pre-clip norm."""
        return acc.clip_grad_norm_(model.parameters(), max_norm or math.inf)

    # -- what it ran with
    def describe(self, acc) -> dict[str, Any] | None:
        """The backend's own settings for ``run_info.json`` (None when there is nothing beyond DDP's)."""
        return None

    def title(self, acc) -> str:
        if acc.num_processes > 1:
            return f"DDP ({acc.num_processes} processes, {acc.state.backend or 'default'} backend)"
        return "single process"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true")


def launched() -> str:
    """The name of the backend the launcher chose: ``deepspeed``, ``fsdp`` or ``ddp`` (no imports)."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def current() -> Backend:
    """The backend the launcher chose (Accelerate's ``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP``)."""
    name = launched()
    if name == "deepspeed":
        from train.backends.deepspeed import DeepSpeed

        return DeepSpeed()
    if name == "fsdp":
        from train.backends.fsdp import FSDP

        return FSDP()
    return Backend()
