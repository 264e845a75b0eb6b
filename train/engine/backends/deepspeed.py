"""The DeepSpeed backend: everything where a ZeRO launch differs from DDP (train/engine/backends/__init__.py).

What differs under a DeepSpeed launch (``accelerate launch --config_file configs/accelerate/zero*.yaml``):

- The DeepSpeed JSON is filled from the run config before ``accelerator.prepare``: micro batch, accumulation,
  ``train_batch_size`` (= micro x accumulation x world, so the effective batch stays exact), clipping,
  fp16/bf16 (bf16 accumulates gradients in fp32: ``data_types.grad_accum_dtype``), the optimizer's
  hyper-parameters. A value the JSON hard-codes must agree with the run config; otherwise a
  :class:`~train.config.ConfigError` names both values (never a silent override, never DeepSpeed's bare
  batch assertion).
- The optimizer is built here: ``torch.optim.AdamW`` by default (``zero_allow_untested_optimizer``; nothing to
  compile), DeepSpeed's fused Adam with ``deepspeed.fused_adam=true``. Its ``optimizer`` JSON section only
  documents that the values come from the run config and is removed before DeepSpeed sees it.
- Clipping is done by the engine inside its step (``gradient_clipping``); ``accelerator.clip_grad_norm_``
  then only returns the engine's pre-clip global norm (:func:`grad_norm` is the same for any backend).
- ZeRO-3 full weights for export need ``stage3_gather_16bit_weights_on_model_save`` (filled in here).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.config import Config
from train.engine import dist
from train.engine.backends.base import Backend
from train.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads this class's loggers before torch loads
    import torch
    from accelerate import Accelerator

    from train.data.batches import Layout

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]
AUTO = "auto"
OPTIMIZER_TYPES = ("adamw", "adam")  # the run config's optimizer is AdamW (Adam with decoupled decay)


def locate_config_file() -> None:
    """Let ``deepspeed_config_file: configs/deepspeed/zero2.json`` work from any working directory.

    Called before the Accelerator exists (Accelerate reads the file while it is created): a relative path
    that does not exist from the working directory is looked up under the repository root.
    """
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none" or Path(path).is_file() or path.lstrip().startswith("{"):
        return
    candidate = REPO / path
    if not Path(path).is_absolute() and candidate.is_file():
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(candidate)
        return
    raise ConfigError(
        f"the Accelerate config's deepspeed_config_file '{path}' does not exist (looked in {Path.cwd()} and {REPO})"
    )


def _plugin():
    from accelerate.state import AcceleratorState

    return AcceleratorState().deepspeed_plugin


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


def offloads_optimizer(ds_config: dict) -> bool:
    return str(_get(ds_config, "zero_optimization.offload_optimizer.device") or "none").lower() not in (
        "none",
        "",
    )


def expected_values(
    cfg: Config, per_device: int, accum: int, world: int, stage: int
) -> dict[str, tuple[Any, str]]:
    """Every DeepSpeed key the run config decides: dotted key -> (value, where it comes from)."""
    t = cfg.train
    layout = f"train.effective_batch_size={t.effective_batch_size} on {world} processes"
    fused = cfg.deepspeed.fused_adam
    values: dict[str, tuple[Any, str]] = {
        "train_micro_batch_size_per_gpu": (per_device, f"train.per_device_batch_size ({layout})"),
        "gradient_accumulation_steps": (
            accum,
            f"the derived accumulation ({layout}, {per_device} per device)",
        ),
        "train_batch_size": (per_device * accum * world, "train.effective_batch_size"),
        "gradient_clipping": (float(t.max_grad_norm or 0.0), "train.max_grad_norm (0 = no clipping)"),
        "fp16.enabled": (cfg.precision == "fp16", f"precision={cfg.precision}"),
        "bf16.enabled": (cfg.precision == "bf16", f"precision={cfg.precision}"),
        "optimizer.params.lr": (t.lr, "train.lr"),
        "optimizer.params.betas": ([t.adam_beta1, t.adam_beta2], "train.adam_beta1/train.adam_beta2"),
        "optimizer.params.eps": (t.adam_eps, "train.adam_eps"),
        "optimizer.params.weight_decay": (t.weight_decay, "train.weight_decay"),
        "zero_allow_untested_optimizer": (
            True,
            "the optimizer built from the run config (torch AdamW by default)",
        ),
        "zero_force_ds_cpu_optimizer": (fused, f"deepspeed.fused_adam={str(fused).lower()}"),
    }
    if stage == 3:
        values["zero_optimization.stage3_gather_16bit_weights_on_model_save"] = (
            True,
            "the export of best/ and final/ as full Hugging Face checkpoints",
        )
    return values


def check_and_fill(
    ds_config: dict, raw: dict, cfg: Config, per_device: int, accum: int, world: int, source: str
) -> dict:
    """Fill ``ds_config`` (the live DeepSpeed config) from the run config; reject contradicting values.

    ``raw`` is the config as the user wrote it (before Accelerate filled anything); a value there that is
    neither ``"auto"`` nor equal to the run config's is an error naming both. Returns ``ds_config``.
    """
    stage = int(_get(ds_config, "zero_optimization.stage") or 0)
    problems = []
    if "scheduler" in raw:
        problems.append(
            f"it has a 'scheduler' section, but the LR schedule comes from the run config (train.lr_scheduler, "
            f"train.warmup_ratio, train.lr={cfg.train.lr}); remove the section"
        )
    opt_type = _get(raw, "optimizer.type")
    if opt_type is not None and str(opt_type).lower() not in OPTIMIZER_TYPES:
        problems.append(
            f"optimizer.type={opt_type!r} contradicts the run config, whose optimizer is AdamW (train.lr, "
            "train.adam_*, train.weight_decay; deepspeed.fused_adam=true for DeepSpeed's fused kernel); "
            'set optimizer.type to "AdamW" or remove the section'
        )
    if (
        opt_type is not None
        and str(opt_type).lower() == "adam"
        and _get(raw, "optimizer.params.adam_w_mode") is False
    ):
        problems.append(
            "optimizer.params.adam_w_mode=false contradicts the run config's AdamW (decoupled decay)"
        )
    for key, (value, why) in expected_values(cfg, per_device, accum, world, stage).items():
        given = _get(raw, key)
        if given is not None and given != AUTO and not _same(given, value):
            problems.append(
                f"{key}={json.dumps(given)} contradicts the run config, which gives {key}={json.dumps(value)} "
                f'(from {why}); set it to "auto" in the DeepSpeed JSON or change the run config'
            )
        if not key.startswith("optimizer."):
            _set(ds_config, key, value)
    if problems:
        raise ConfigError(f"DeepSpeed config {source}: " + "; ".join(problems))
    accum_dtype = _get(ds_config, "data_types.grad_accum_dtype")
    if accum_dtype in (None, AUTO):
        if cfg.precision == "bf16":
            _set(ds_config, "data_types.grad_accum_dtype", "fp32")  # bf16 accumulation loses precision
        elif isinstance(ds_config.get("data_types"), dict):
            ds_config["data_types"].pop("grad_accum_dtype", None)  # DeepSpeed's default: the model dtype
    ds_config.pop("optimizer", None)  # documented only; the optimizer object is built from the run config
    leftover = sorted(k for k, v in _walk(ds_config) if v == AUTO and k not in _ACCELERATE_FILLS)
    if leftover:
        raise ConfigError(
            f'DeepSpeed config {source}: no value known for {", ".join(leftover)} ("auto" is only filled in for '
            "the batch, accumulation, precision, clipping and optimizer keys); give them a value"
        )
    return ds_config


# "auto" values Accelerate fills from the model's hidden size during prepare
_ACCELERATE_FILLS = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _raw_config(plugin) -> tuple[dict, str]:
    """The DeepSpeed config as the user wrote it, and where it came from (for error messages)."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none" and Path(path).is_file():
        return json.loads(Path(path).read_text()), path
    # inline `deepspeed_config:` keys of the Accelerate config file (no JSON): what Accelerate built from them
    return copy.deepcopy(plugin.deepspeed_config), "from the Accelerate config"


def _fused_adam(cfg: Config, groups: list[dict]) -> torch.optim.Optimizer:
    """DeepSpeed's fused Adam in AdamW mode (CPU Adam when the optimizer is offloaded)."""
    import torch

    t = cfg.train
    kwargs: dict[str, Any] = {"lr": t.lr, "betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_eps}
    if offloads_optimizer(_plugin().deepspeed_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if not torch.cuda.is_available():
        raise ConfigError(
            "deepspeed.fused_adam=true without optimizer offload needs a CUDA GPU (DeepSpeed's FusedAdam); on CPU "
            "use deepspeed.fused_adam=false or an Accelerate config with offload_optimizer (zero3_offload.yaml)"
        )
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, adam_w_mode=True, **kwargs)


def keep_used_weight_conversions(model: torch.nn.Module) -> None:
    """Make ``save_pretrained`` write the same tensor names under ZeRO-3 as under DDP.

    transformers 5 reverts the weight renamings it applied at load time when it saves. Its ZeRO-3 loading path
    (``zero3_init_flag``) records every renaming of the model type, used or not, so a BERT export would be
    written with legacy ``LayerNorm.gamma/beta`` names; the regular path keeps only the ones that matched a
    checkpoint key. We keep only those here, as the regular path does.
    """
    for module in model.modules():
        conversions = getattr(module, "_weight_conversions", None)
        if isinstance(conversions, list) and conversions:
            module._weight_conversions = [c for c in conversions if getattr(c, "was_used", lambda: True)()]


def _single_process_env() -> None:
    # DeepSpeed insists on a process group; without a launcher it would reach for MPI.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(dist.free_port()))


class DeepSpeed(Backend):
    """ZeRO 1/2/3 (+ offload) through Accelerate; the DeepSpeed JSON is filled from the run config."""

    name = "deepspeed"
    owns_optimizer_step = True
    fast_path_off = "DeepSpeed owns backward and the optimizer step (its engine is not compiled here)"
    library_loggers = ("DeepSpeed",)

    def make_accelerator(self, mixed_precision: str, accum: int, cuda: bool) -> Accelerator:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        locate_config_file()  # Accelerate reads the DeepSpeed JSON while it is created
        kwargs = []
        if not cuda:
            _single_process_env()
            kwargs.append(InitProcessGroupKwargs(backend="gloo"))  # cpu=True would silently drop DeepSpeed
        return Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=accum,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=kwargs,
        )

    def make_optimizer(self, cfg: Config, groups: list[dict]) -> torch.optim.Optimizer:
        """torch's AdamW by default; DeepSpeed's fused kernel with ``deepspeed.fused_adam=true``."""
        if cfg.deepspeed.fused_adam:
            return _fused_adam(cfg, groups)
        return super().make_optimizer(cfg, groups)

    def prepare(
        self, acc: Accelerator, cfg: Config, layout: Layout, *objects: Any, precision: str | None = None
    ) -> tuple:
        """``accelerator.prepare(*objects)``, with the DeepSpeed config filled from the run config first.

        ``precision``: what the run computes in (``cfg.precision`` may say ``auto``)."""
        import torch

        if precision is not None and precision != cfg.precision:
            import dataclasses

            cfg = dataclasses.replace(cfg, precision=precision)
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                keep_used_weight_conversions(obj)
        plugin = _plugin()
        raw, source = _raw_config(plugin)
        check_and_fill(
            plugin.deepspeed_config, raw, cfg, layout.per_device, layout.accum, layout.world, source
        )
        prepared = acc.prepare(*objects)
        engine = acc.deepspeed_engine_wrapped.engine if acc.deepspeed_engine_wrapped else None
        if engine is not None:
            self._check_engine(engine, cfg, layout)
        return prepared

    @staticmethod
    def _check_engine(engine, cfg: Config, layout: Layout) -> None:
        got = (
            engine.train_micro_batch_size_per_gpu(),
            engine.gradient_accumulation_steps(),
            engine.train_batch_size(),
        )
        want = (layout.per_device, layout.accum, layout.effective)
        if got != want:  # only reachable if Accelerate or DeepSpeed changed what we filled in
            raise RuntimeError(
                f"DeepSpeed runs (micro batch, accumulation, batch) = {got}, the run config {want}"
            )
        optimizer = getattr(engine, "basic_optimizer", None) or engine.optimizer
        log.info(
            "DeepSpeed ZeRO-%d: micro batch %d x accumulation %d x %d processes = %d; clipping %s; "
            "precision %s; optimizer %s",
            engine.zero_optimization_stage(),
            *got[:2],
            layout.world,
            got[2],
            engine.gradient_clipping() or "off",
            cfg.precision,
            type(optimizer).__name__,
        )

    def param_ndim(self, p: torch.Tensor) -> int:
        """The parameter's real rank: under ZeRO-3 (``zero3_init_flag``) ``p`` is an empty shard, ``ds_shape``
        the full shape (so weight decay goes to the same parameters as under DDP)."""
        shape = getattr(p, "ds_shape", None)
        return len(shape) if shape is not None else p.ndim

    def param_numel(self, p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 shards report their full size

    # grad_norm: the engine has already clipped (``gradient_clipping``) inside its step; Accelerate's
    # clip_grad_norm_ returns the engine's pre-clip norm, so the base method is right as it is.

    def checkpoint_classes(self) -> tuple[type, ...]:
        """The data classes DeepSpeed's engine pickles into its checkpoint files (found by listing the globals
        of the ZeRO-1/2/3 files it writes); its loader asks for ``weights_only=False``, which is overridden."""
        from deepspeed.runtime.fp16 import loss_scaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        scalers = [
            getattr(loss_scaler, n, None) for n in ("LossScaler", "DynamicLossScaler", "LossScaleConfig")
        ]
        profile = getattr(loss_scaler, "LossScaleProfile", None)
        return tuple(c for c in (*scalers, profile, ZeroStageEnum, fragment_address) if c is not None)

    def describe(self, acc: Accelerator) -> dict | None:
        """What DeepSpeed runs with, for ``run_info.json``."""
        wrapped = getattr(acc, "deepspeed_engine_wrapped", None)
        if wrapped is None:
            return None
        engine, ds = wrapped.engine, acc.deepspeed_config
        import deepspeed

        keys = (
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "train_batch_size",
            "gradient_clipping",
            "fp16.enabled",
            "bf16.enabled",
            "data_types.grad_accum_dtype",
            "zero_optimization.stage",
            "zero_optimization.offload_optimizer.device",
            "zero_optimization.offload_param.device",
        )
        return {
            "version": deepspeed.__version__,
            "config_file": os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"),
            "zero_stage": engine.zero_optimization_stage(),
            "optimizer": type(getattr(engine, "basic_optimizer", None) or engine.optimizer).__name__,
            "config": {k: _get(ds, k) for k in keys if _get(ds, k) is not None},
        }

    def title(self, acc: Accelerator) -> str:
        wrapped = getattr(acc, "deepspeed_engine_wrapped", None)
        stage = wrapped.engine.zero_optimization_stage() if wrapped is not None else "?"
        return f"DeepSpeed ZeRO-{stage} ({acc.num_processes} processes)"

    def card(self, acc: Accelerator) -> dict[str, str]:
        """The title with where the optimizer runs when it is offloaded, and the optimizer class DeepSpeed steps."""
        ds = self.describe(acc) or {}
        text = self.title(acc)
        offload = ds.get("config", {}).get("zero_optimization.offload_optimizer.device")
        if offload and offload != "none":
            text += f", optimizer offloaded to {offload}"
        name = ds.get("optimizer") or "AdamW"
        return {
            "distributed_type": text,
            "optimizer": name if name == "AdamW" else f"{name} (AdamW math, DeepSpeed)",
        }
