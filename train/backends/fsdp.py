"""The FSDP backend: fully sharded data parallel through Accelerate (FSDP2 where the installed versions have it).

Launched with ``accelerate launch --config_file configs/accelerate/fsdp.yaml``: parameters, gradients and
optimizer states are sharded over the processes (``FULL_SHARD``, one unit per transformer layer), the math is
DDP's (same losses, learning rates and weights), checkpoints are sharded (``SHARDED_STATE_DICT``, one file set per
rank, resumed exactly), and ``best/``/``final/`` are gathered into one plain Hugging Face folder.

**Not on CPU.** Accelerate (1.0 to 1.15, read in ``accelerate/state.py``) switches a launch to FSDP only from a
GPU-like distributed type (``MULTI_GPU``, ``MULTI_NPU``, ``MULTI_XPU``, ...); a CPU launch is ``MULTI_CPU`` and
keeps plain data parallel, so an FSDP launch on a machine without GPUs would silently train unsharded copies. This
backend refuses that with an error instead; its equivalence with DDP is checked by ``gpu``-marked tests.
"""

from __future__ import annotations

from typing import Any

from train.backends.base import Backend
from train.config import ConfigError


class FSDP(Backend):
    name = "fsdp"
    fast_path_off = "compiled steps under FSDP are untested here (no multi-GPU machine to test them on)"

    def make_accelerator(self, mixed_precision: str, accum: int, cuda: bool):
        if not cuda:
            raise ConfigError(
                "an FSDP launch (configs/accelerate/fsdp.yaml) needs GPUs: Accelerate runs FSDP only on a GPU-like "
                "device, and on CPU it would silently train unsharded copies. On CPU use "
                "configs/accelerate/ddp.yaml (or torchrun); the training is the same"
            )
        acc = super().make_accelerator(mixed_precision, accum, cuda)
        if "FSDP" not in str(acc.distributed_type).upper():  # the same guard for any other unexpected type
            raise ConfigError(
                f"the launch asked for FSDP but Accelerate formed a {acc.distributed_type} run; check the "
                "Accelerate config (distributed_type: FSDP) and the installed accelerate version"
            )
        return acc

    def describe(self, acc) -> dict[str, Any] | None:
        plugin = getattr(acc.state, "fsdp_plugin", None)
        if plugin is None:
            return None
        keys = (
            "fsdp_version",
            "sharding_strategy",
            "reshard_after_forward",
            "state_dict_type",
            "cpu_offload",
        )
        out = {k: str(getattr(plugin, k)) for k in keys if getattr(plugin, k, None) is not None}
        out["auto_wrap_policy"] = getattr(plugin.auto_wrap_policy, "__name__", str(plugin.auto_wrap_policy))
        return out

    def title(self, acc) -> str:
        plugin = getattr(acc.state, "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", "?")
        return f"FSDP{version} ({acc.num_processes} processes)"
