"""The distributed environment: one Accelerator, the right backend for the hardware, and loud failures.

Launch pitfalls handled here (measured): ``torchrun`` with a plain ``Accelerator()`` on a machine without
GPUs makes every process rank 0, and ``accelerate launch --cpu --num_processes 2`` runs ONE process. We read
the launcher's WORLD_SIZE, choose CPU+gloo ourselves when there is no GPU, and refuse to go on if the
Accelerator's world differs from the launcher's (never N unsynchronised copies).
"""

from __future__ import annotations

import os
import socket

from train.errors import ConfigError

# torch is imported inside the functions that use it: launch scripts call free_port() from bash.


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's global rank as the launcher set it (0 without a launcher), before any Accelerator."""
    return int(os.environ.get("RANK", "0"))


def resolve_precision(precision: str, cuda: bool) -> str:
    if precision == "auto":
        if cuda:
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if precision == "fp16" and not cuda:
        raise ConfigError(
            "precision=fp16 needs a CUDA GPU (Accelerate would silently train in fp32 on CPU); "
            "use precision=bf16 or precision=no on CPU"
        )
    return precision


def free_port() -> int:
    """A free TCP port on the loopback (the one helper for it: launchers, tests and a backend's one-process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_accelerator(precision: str, accum: int, backend):
    """The backend's Accelerator for this launch (``backend``: train.engine.backends.current()); ``accum`` is derived
    from the world size before it exists. A world that did not form one group is refused."""
    import torch

    cuda = torch.cuda.is_available()
    acc = backend.make_accelerator(resolve_precision(precision, cuda), accum, cuda)
    world = launched_world_size()
    if acc.num_processes != world:
        raise RuntimeError(
            f"the launcher started a world of {world} processes (WORLD_SIZE) but Accelerate formed one of "
            f"{acc.num_processes}; refusing to train unsynchronised copies. On CPU use "
            "`torchrun --nproc_per_node N -m train` or `accelerate launch --multi_gpu --num_processes N -m train` "
            "(not `accelerate launch --cpu`, which starts one process)"
        )
    return acc


def device_name(acc) -> str:
    if acc.device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(acc.device)
    return acc.device.type


_cpu_group = None


def _group():
    """A CPU (gloo) group over all ranks: votes and small objects never wait for the device."""
    import torch.distributed as tdist

    global _cpu_group
    if _cpu_group is None:
        same = tdist.get_backend() == "gloo"
        _cpu_group = tdist.group.WORLD if same else tdist.new_group(backend="gloo")
    return _cpu_group


def from_main(obj):
    """Every rank gets the main process's ``obj`` (a small picklable value)."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, group=_group())
    return box[0]


def raise_from_main(error: BaseException | None) -> None:
    """Collective, after work only the main process did while the others waited for it (tokenizing into the
    cache): its :class:`~train.errors.UserError` raised on every rank, so each leaves with the same sentence (said
    once) instead of losing its peer in the next collective. ``error`` None: it succeeded."""
    from train.errors import UserError

    mine = error if isinstance(error, UserError) else None
    shared = from_main(mine)
    if mine is not None:
        raise mine
    if shared is not None:
        raise shared


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank; a CPU (gloo) all-reduce, never a device sync."""
    import torch
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    tdist.all_reduce(t, group=_group())
    return bool(t.item())
