"""One typed config tree: dataclass defaults < YAML file < dotted CLI overrides.

Every field carries a one-line doc (shown by ``python -m train --help``). Unknown keys and values of the
wrong type are errors that name the key and where it came from; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key and its source."""


def f(default: Any, doc: str) -> Any:
    """A dataclass field with a doc line; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    name_or_path: str = f(
        "bert-base-uncased",
        "Hugging Face Hub id or local directory of the encoder; 'builtin:tiny-bert' is the bundled tiny model",
    )
    revision: str | None = f(None, "Hub revision (branch, tag or commit) of the model")
    dropout: float | None = f(
        None, "override hidden and attention dropout (0 makes runs comparable bit for bit)"
    )
    ignore_mismatched_sizes: bool = f(
        False, "allow a checkpoint whose classification head has another size (the head is re-initialised)"
    )


@dataclass
class DataConfig:
    task: str = f("mnli", "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
    glue_dir: str | None = f(
        None,
        "root of a local GLUE download (official layout: SST-2/train.tsv, ...); "
        "'builtin:glue-sample' = the bundled sample; unset = the Hub dataset nyu-mll/glue",
    )
    hub_dataset: str = f(
        "nyu-mll/glue", "Hub dataset id used when data.glue_dir is unset (or a local copy of that repo)"
    )
    max_length: int = f(128, "truncate each (pair of) sentence(s) to this many tokens")
    max_train_samples: int | None = f(None, "use only the first N training rows (a fixed subset)")
    max_eval_samples: int | None = f(None, "use only the first N rows of each dev split")
    cache_dir: str | None = f(
        None, "where tokenized datasets are cached; unset = $GLUE_TRAIN_CACHE or ~/.cache/glue-train"
    )
    num_workers: int = f(0, "DataLoader worker processes per rank")
    pad_to_multiple_of: int | None = f(
        None, "pad each batch's length up to a multiple of N (None: longest in batch)"
    )
    group_by_length: bool = f(
        False,
        "build each optimizer step's batch from rows of similar length (shuffled per epoch, deterministic per "
        "seed and epoch; every row once per epoch). Less padding, but it CHANGES the batch composition, so runs "
        "are not comparable step for step with group_by_length=false",
    )


@dataclass
class TrainConfig:
    effective_batch_size: int = f(16, "samples per optimizer step, summed over processes and accumulation")
    per_device_batch_size: int | None = f(
        None, "samples per process per forward; unset = effective_batch_size / world_size (no accumulation)"
    )
    epochs: int = f(5, "passes over the training set")
    max_steps: int | None = f(
        None, "stop after this many optimizer steps (caps epochs; the LR schedule spans it)"
    )
    lr: float = f(2e-5, "peak learning rate")
    warmup_ratio: float = f(0.0, "fraction of optimizer steps with linear warm-up")
    lr_scheduler: Literal["linear", "constant"] = f("linear", "LR schedule after warm-up")
    weight_decay: float = f(0.0, "AdamW decoupled weight decay (not applied to biases and LayerNorm)")
    adam_beta1: float = f(0.9, "AdamW beta1")
    adam_beta2: float = f(0.999, "AdamW beta2")
    adam_eps: float = f(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = f(1.0, "clip the global gradient norm to this (None: no clipping)")
    log_every: int = f(10, "log train metrics every N optimizer steps")
    max_nonfinite_skips: int = f(
        0,
        "bf16/fp32: skip up to N optimizer steps whose loss or grad norm is not finite, then stop with an "
        "error (0: stop at the first, detected at the next log/checkpoint/eval; N>0 reads the norm every step). "
        "fp16: overflow steps are skipped by the loss scaler and counted in train/skipped_steps",
    )


@dataclass
class EvalConfig:
    batch_size: int = f(16, "eval samples per process per forward")
    every_epoch: bool = f(True, "evaluate at the end of every epoch (always at the end of training)")
    every_steps: int | None = f(None, "also evaluate every N optimizer steps")
    predict_test: bool = f(True, "write GLUE test-set predictions (from the best model) into predictions/")


@dataclass
class CheckpointConfig:
    every_steps: int | None = f(None, "save a full training checkpoint every N optimizer steps")
    keep_last: int = f(2, "how many periodic checkpoints to keep (the best model is never deleted)")
    resume: str = f(
        "auto", "'auto' = newest complete checkpoint in output_dir, 'never', or a checkpoint path"
    )


@dataclass
class DeepSpeedConfig:
    fused_adam: bool = f(
        False,
        "under a DeepSpeed launch, use DeepSpeed's fused Adam (FusedAdam on GPU, DeepSpeedCPUAdam when the "
        "optimizer is offloaded; compiled on first use) instead of torch.optim.AdamW; same AdamW math",
    )


@dataclass
class WandbConfig:
    project: str | None = f(
        None,
        "W&B project; unset = $WANDB_PROJECT; W&B is off when neither is set (metrics.jsonl is always written)",
    )
    entity: str | None = f(None, "W&B entity (user or team); unset = $WANDB_ENTITY or your default entity")
    mode: Literal["online", "offline", "disabled"] | None = f(
        None,
        "online, offline (compute nodes without network; `wandb sync` later) or disabled; unset = $WANDB_MODE or online",
    )
    name: str | None = f(None, "run name; unset = <task>-<model>-s<seed>")
    group: str | None = f(None, "run group, e.g. the sweep name")
    tags: list[str] = f([], "run tags (comma-separated on the command line)")
    dir: str | None = f(
        None, "where W&B writes its files (a wandb/ folder inside); unset = $WANDB_DIR or output_dir"
    )


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class FastConfig:
    enabled: bool | Literal["auto"] = f(
        "auto",
        "fast path (torch.compile + CUDA graphs, bucketed padding, fused AdamW; train/fastpath.py): auto = on for "
        "CUDA without DeepSpeed; true forces it (CPU too: compile only); the reason is logged when it is off",
    )
    compile: bool = f(True, "fast path: torch.compile forward+loss (+backward) for train and eval")
    compile_mode: Literal[
        "auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = f("auto", "torch.compile mode; auto = reduce-overhead (CUDA graphs) on one GPU, default otherwise")
    backend: str = f(
        "inductor", "torch.compile backend; aot_eager traces the same graphs without code generation"
    )
    bucket_multiple: int = f(
        32, "fast path: pad batch lengths up to a multiple of N (capped at data.max_length)"
    )
    buckets: list[int] | None = f(
        None,
        "fast path: a fixed set of padded lengths instead of multiples (data.max_length is always added)",
    )
    fused_adamw: bool = f(True, "fast path: torch.optim.AdamW(fused=True), one kernel for the whole update")
    precompile: bool = f(
        True, "fast path: compile every bucket shape before the first step (no compiles later)"
    )


@dataclass
class Config:
    seed: int = f(42, "seed for model init, data order and dropout")
    precision: Literal["auto", "no", "bf16", "fp16"] = f(
        "auto", "mixed precision: auto = bf16 where the GPU has it, else fp16 on GPU, else no"
    )
    output_dir: str = f("runs/{task}-{model}-s{seed}", "run folder; {task}, {model} and {seed} are filled in")
    overwrite: bool = f(False, "allow reusing an output_dir that holds a run with a different config")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


# ----------------------------------------------------------------------------------------------------------
# loading


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; strings from the CLI are parsed once more."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: '{key}' cannot be None")
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() not in args:
            value = {False: "no", True: "yes"}[value]  # YAML 1.1 reads a bare `no` as False
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], key, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "2e-5" as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{source}: '{key}' must be {name}, got {value!r} ({type(value).__name__})")


def _unknown(key: str, cls: type, prefix: str, source: str) -> ConfigError:
    valid = [k.name for k in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
    return ConfigError(
        f"{source}: unknown config key '{prefix}{key}'{hint} (valid keys {where}: {', '.join(valid)}). "
        "Run `python -m train --help` for every key."
    )


def _merge(obj: Any, data: dict, source: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix[:-1] or '<root>'}' must be a mapping, got {data!r}")
    hints = _hints(type(obj))
    for key, value in data.items():
        if key not in hints:
            raise _unknown(str(key), type(obj), prefix, source)
        tp = hints[key]
        if _is_section(tp):
            _merge(getattr(obj, key), value or {}, source, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(value, tp, prefix + key, source))


def _set_dotted(cfg: Config, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        hints = _hints(type(obj))
        if part not in hints:
            raise _unknown(part, type(obj), ".".join(parts[:i]) + ("." if i else ""), "command line")
        tp = hints[part]
        if i == len(parts) - 1:
            if _is_section(tp):
                raise ConfigError(
                    f"command line: '{dotted}' is a section; set one of its keys, e.g. {dotted}.<key>=…"
                )
            value = yaml.safe_load(raw) if raw.strip() else ""
            setattr(obj, part, _coerce(value, tp, dotted, "command line"))
        else:
            if not _is_section(tp):
                raise ConfigError(f"command line: '{'.'.join(parts[: i + 1])}' is not a section")
            obj = getattr(obj, part)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config: defaults, then the YAML file, then ``key.sub=value`` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        _merge(cfg, data, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(cfg, key.strip(), raw)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that do not need the world size or the model."""
    from train.tasks import TASKS

    if cfg.data.task not in TASKS:
        raise ConfigError(f"data.task: unknown GLUE task '{cfg.data.task}'; choose one of {', '.join(TASKS)}")
    positive = {
        "train.effective_batch_size": cfg.train.effective_batch_size,
        "train.epochs": cfg.train.epochs,
        "eval.batch_size": cfg.eval.batch_size,
        "data.max_length": cfg.data.max_length,
        "train.log_every": cfg.train.log_every,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "fast.bucket_multiple": cfg.fast.bucket_multiple,
    }
    for opt in (
        "train.per_device_batch_size",
        "train.max_steps",
        "eval.every_steps",
        "checkpoint.every_steps",
        "data.pad_to_multiple_of",
        "data.max_train_samples",
        "data.max_eval_samples",
    ):
        section, key = opt.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None:
            positive[opt] = value
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.train.max_nonfinite_skips < 0:
        raise ConfigError(f"train.max_nonfinite_skips must be >= 0, got {cfg.train.max_nonfinite_skips}")
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {cfg.train.warmup_ratio}")
    if cfg.fast.buckets is not None and (not cfg.fast.buckets or min(cfg.fast.buckets) <= 0):
        raise ConfigError(f"fast.buckets must be positive lengths, got {cfg.fast.buckets}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {cfg.train.lr}")
    if cfg.model.dropout is not None and not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every leaf, in declaration order, for --help and docs."""
    rows = []
    obj = cls()
    hints = _hints(cls)
    for fld in dataclasses.fields(cls):
        if _is_section(hints[fld.name]):
            rows += describe(hints[fld.name], f"{prefix}{fld.name}.")
        else:
            rows.append((prefix + fld.name, fld.metadata.get("doc", ""), getattr(obj, fld.name)))
    return rows
