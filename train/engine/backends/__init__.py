"""One seam for the distributed backend: DDP (also a single process), DeepSpeed ZeRO, or FSDP.

The backend is chosen by the launch (``accelerate launch --config_file configs/accelerate/<name>.yaml``), never
by the run config, and :func:`current` returns the one in use. Everything that differs between backends is a
method of :class:`Backend` (``base.py``: the interface, with DDP's behaviour as its defaults; ``ddp.py``,
``deepspeed.py`` and ``fsdp.py``: the backends); the loop, the fast path, the non-finite guard, checkpoints and
tracking ask the backend and never test which one it is. To add a backend: a module here with a subclass, a
branch in :func:`launched`/:func:`current`, an Accelerate config in ``configs/accelerate/``, and its equivalence
test against DDP (as ``tests/test_deepspeed.py`` and ``tests/test_fsdp.py``).
"""

from __future__ import annotations

import os

from train.engine.backends.base import Backend

__all__ = ["Backend", "current", "launched"]


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
        from train.engine.backends.deepspeed import DeepSpeed

        return DeepSpeed()
    if name == "fsdp":
        from train.engine.backends.fsdp import FSDP

        return FSDP()
    from train.engine.backends.ddp import DDP

    return DDP()
