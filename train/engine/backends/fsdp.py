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

import logging
from typing import TYPE_CHECKING, Any

from train.engine.backends.base import Backend
from train.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from train.config import Config
    from train.data.batches import Layout

log = logging.getLogger(__name__)


def layer_units(model, named: list[str] | None = None) -> list[str]:
    """The module classes to make FSDP units of: ``named`` (the Accelerate config's
    ``fsdp_transformer_layer_cls_to_wrap``) or the model's own ``_no_split_modules``, keeping the classes the model
    instantiates, less any class whose modules hold the input embeddings.

    Accelerate (1.15 and later) shards the input embedding as a unit of its own after the layer units. When a
    model also lists its embeddings block in ``_no_split_modules`` (BERT's ``BertEmbeddings``, RoBERTa's,
    ModernBERT's, ...), the word embeddings would be sharded twice and ``fully_shard`` fails inside torch
    ("value was None when it should not be"). Leaving that class out gives the layout Accelerate means: one unit
    per layer, the word embeddings on their own, the rest of the embeddings block with the root.
    """
    names = list(named) if named else list(getattr(model, "_no_split_modules", None) or [])
    names = names or repeated_block(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    present, holders = set(), set()
    for module in model.modules():
        present.add(type(module).__name__)
        if embed is not None and any(sub is embed for sub in module.modules()):
            holders.add(type(module).__name__)
    return [n for n in names if n in present and n not in holders]


def repeated_block(model) -> list[str]:
    """The class of the model's stack of identical blocks (its largest ``ModuleList`` of one class), for models
    that name no layer classes (DistilBERT has no ``_no_split_modules``)."""
    import torch

    best, size = [], 0
    for module in model.modules():
        kinds = {type(child) for child in module} if isinstance(module, torch.nn.ModuleList) else set()
        numel = sum(p.numel() for p in module.parameters()) if len(kinds) == 1 else 0
        if numel > size:
            best, size = [next(iter(kinds)).__name__], numel
    return best


def _wraps_layers(plugin) -> bool:
    """Whether the FSDP plugin wraps by transformer layer class (``TRANSFORMER_BASED_WRAP``)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    return policy is transformer_auto_wrap_policy or str(policy).upper() == "TRANSFORMER_BASED_WRAP"


class FSDP(Backend):
    name = "fsdp"
    fast_path_off = "compiled steps under FSDP are untested here (no multi-GPU machine to test them on)"

    def make_accelerator(self, mixed_precision: str, accum: int, cuda: bool) -> Accelerator:
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

    def prepare(
        self, acc: Accelerator, cfg: Config, layout: Layout, *objects: Any, precision: str | None = None
    ) -> tuple:
        """``accelerator.prepare(*objects)``, one FSDP unit per layer class (:func:`layer_units`)."""
        import torch

        plugin = acc.state.fsdp_plugin
        models = [o for o in objects if isinstance(o, torch.nn.Module)]
        if models and _wraps_layers(plugin):
            named = plugin.transformer_cls_names_to_wrap
            units = layer_units(models[0], named)
            if named and set(named) - set(units):
                log.warning(
                    "FSDP: not wrapping %s separately (not in the model, or holding the input embeddings, which "
                    "Accelerate shards as a unit of their own)",
                    ", ".join(sorted(set(named) - set(units))),
                )
            plugin.transformer_cls_names_to_wrap = units
        return acc.prepare(*objects)

    def describe(self, acc: Accelerator) -> dict[str, Any] | None:
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

    def title(self, acc: Accelerator) -> str:
        plugin = getattr(acc.state, "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", "?")
        return f"FSDP{version} ({acc.num_processes} processes)"
