"""The backend interface, with DDP's (and a single process's) behaviour as the defaults (train/engine/backends/)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # light on purpose: the CLI asks which backend a launch uses before torch is imported
    import torch
    from accelerate import Accelerator

    from train.config import Config
    from train.data.batches import Layout


class Backend:
    """The defaults are DDP's (and a single process's): Accelerate prepares, torch's AdamW steps."""

    name = "ddp"
    # The backend's engine runs backward and the optimizer step itself, so an update cannot be dropped from
    # outside (train.max_nonfinite_skips).
    owns_optimizer_step = False
    # Why the fast path (train/engine/fastpath.py) cannot run under this backend; empty when it can.
    fast_path_off = ""
    # The loggers of the library this backend runs on: heard (warnings, rank 0) only when it is the one launched.
    library_loggers: tuple[str, ...] = ()

    # -- start-up
    def make_accelerator(self, mixed_precision: str, accum: int, cuda: bool) -> Accelerator:
        """An Accelerator for this launch (CPU processes run over gloo)."""
        from accelerate import Accelerator

        return Accelerator(
            cpu=not cuda,  # MULTI_CPU over gloo under torchrun / accelerate launch
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=accum,
            step_scheduler_with_optimizer=False,
        )

    def make_optimizer(self, cfg: Config, groups: list[dict]) -> torch.optim.Optimizer:
        """torch's AdamW over ``groups`` with the run config's hyper-parameters."""
        if cfg.deepspeed.fused_adam:
            from train.errors import ConfigError

            raise ConfigError(
                "deepspeed.fused_adam=true needs a DeepSpeed launch (accelerate launch --config_file "
                "configs/accelerate/zero*.yaml); without DeepSpeed set deepspeed.fused_adam=false"
            )
        import torch

        t = cfg.train
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)

    def prepare(
        self, acc: Accelerator, cfg: Config, layout: Layout, *objects: Any, precision: str | None = None
    ) -> tuple:
        """``acc.prepare(*objects)`` with the backend's own settings filled from the run config first.

        ``precision``: what the run computes in (``cfg.precision`` may say ``auto``)."""
        return acc.prepare(*objects)

    # -- parameters as the backend holds them
    def param_ndim(self, p: torch.Tensor) -> int:
        return p.ndim

    def param_numel(self, p: torch.Tensor) -> int:
        return p.numel()

    # -- the step
    def grad_norm(self, acc: Accelerator, model: torch.nn.Module, max_norm: float | None):
        """Clip the global gradient norm to ``max_norm`` and return the pre-clip norm."""
        return acc.clip_grad_norm_(model.parameters(), max_norm or math.inf)

    # -- state on disk (Accelerate knows each backend's format: DeepSpeed's engine files, FSDP's sharded state)
    def save_state(self, acc: Accelerator, folder: str) -> None:
        """Collective: model, optimizer, scheduler, scaler and RNG states into ``folder``."""
        acc.save_state(folder)

    def load_state(self, acc: Accelerator, folder: str) -> None:
        """Collective: the inverse of :meth:`save_state`."""
        acc.load_state(folder)

    def checkpoint_classes(self) -> tuple[type, ...]:
        """Classes besides tensors and plain data that this backend's checkpoint files hold (allowed while one
        is restored weights-only, train/engine/safe_state.py): data classes of the backend's library only."""
        return ()

    def full_state_dict(self, acc: Accelerator, model: torch.nn.Module) -> dict:
        """Collective: the whole model's weights on the main process (gathered from shards), for an export."""
        return acc.get_state_dict(model)

    # -- what it ran with
    def describe(self, acc: Accelerator) -> dict[str, Any] | None:
        """The backend's own settings for ``run_info.json`` (None when there is nothing beyond DDP's)."""
        return None

    def title(self, acc: Accelerator) -> str:
        """One line for the start block and the summary: the backend and its layout."""
        return f"{self.name} ({acc.num_processes} processes)"

    def card(self, acc: Accelerator) -> dict[str, str]:
        """What the model card says about the backend (``run_info.json``'s ``card``): ``distributed_type`` and
        ``optimizer`` (the optimizer's name; its math is always the run config's AdamW)."""
        return {"distributed_type": self.title(acc), "optimizer": "AdamW"}
