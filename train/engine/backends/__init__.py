"""One seam for the distributed backend: DDP (also a single process), DeepSpeed ZeRO, or FSDP.

The backend is chosen by the launch (``accelerate launch --config_file configs/accelerate/<name>.yaml``), never
by the run config, and :func:`current` returns the one in use. Everything that differs between backends is a
method or attribute of :class:`Backend` (``base.py``: the interface, with DDP's behaviour as its defaults;
``ddp.py``, ``deepspeed.py`` and ``fsdp.py``: the backends); the loop, the fast path, the non-finite guard,
checkpoints, tracking, the model card and the CLI's log levels ask the backend and never test which one it is.
To add a backend: a module here with a subclass, its class in :func:`_classes` and a branch in :func:`launched`,
an Accelerate config in ``configs/accelerate/``, and its equivalence test against DDP (as
``tests/test_deepspeed.py`` and ``tests/test_fsdp.py``).
"""

from __future__ import annotations

import logging
import os

from train.engine.backends.base import Backend

__all__ = ["Backend", "current", "launched", "log_levels"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true")


def launched() -> str:
    """The name of the backend the launcher chose: ``deepspeed``, ``fsdp`` or ``ddp`` (no imports)."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def _classes() -> dict[str, type[Backend]]:
    """Every backend by name (the modules import torch only where they use it)."""
    from train.engine.backends.ddp import DDP
    from train.engine.backends.deepspeed import DeepSpeed
    from train.engine.backends.fsdp import FSDP

    return {cls.name: cls for cls in (DDP, DeepSpeed, FSDP)}


def current() -> Backend:
    """The backend the launcher chose (Accelerate's ``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP``).

    Called once, where a run is built (train/engine/start.py); everything else is handed that Backend."""
    return _classes()[launched()]()


def log_levels(rank: int) -> dict[str, int]:
    """Levels for the backends' own libraries' loggers: the launched backend's library may warn (on rank 0, so N
    processes say each thing once); the others, which other libraries may import without using them, only err."""
    chosen = launched()
    return {
        logger: logging.WARNING if name == chosen and rank == 0 else logging.ERROR
        for name, cls in _classes().items()
        for logger in cls.library_loggers
    }
