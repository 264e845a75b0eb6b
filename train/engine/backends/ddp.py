"""The DDP backend (also a single process): Accelerate prepares the model, torch's AdamW steps, the loop clips.

Launched by ``torchrun``, ``accelerate launch --config_file configs/accelerate/ddp.yaml`` (or ``single.yaml``), or
plain ``python -m train``. Its behaviour is :class:`~train.engine.backends.base.Backend`'s defaults, which the other
backends override where they differ; this class only names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from train.engine.backends.base import Backend

if TYPE_CHECKING:
    from accelerate import Accelerator


class DDP(Backend):
    name = "ddp"

    def title(self, acc: Accelerator) -> str:
        if acc.num_processes > 1:
            return f"DDP ({acc.num_processes} processes, {acc.state.backend or 'default'} backend)"
        return "single process"
