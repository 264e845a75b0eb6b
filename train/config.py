"""One typed config tree: dataclass defaults < YAML file < dotted CLI overrides.

Every field carries a one-line doc (shown by ``python -m train --help``). Unknown keys and values of the
wrong type are errors that name the key and where it came from; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from train.errors import ConfigError
from train.tasks import TASKS


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
        None,
        "set every dropout probability in the model's config (each numeric field whose name contains "
        "'dropout', whatever the family calls it) to this; 0 makes runs comparable bit for bit",
    )
    ignore_mismatched_sizes: bool = f(
        False, "allow a checkpoint whose classification head has another size (the head is re-initialised)"
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = f(
        "auto", "attention kernel passed to from_pretrained; auto = what transformers picks for the family"
    )
    trust_remote_code: bool = f(
        False,
        "allow a checkpoint that needs Python code from its own repository (loading it RUNS that code)",
    )
    init_from: str | None = f(
        None,
        "start from other weights than model.name_or_path's: a run folder (its best/ model), a model folder, or "
        "SWEEP_DIR@task (the best seed of that task's selected override set in a sweep folder, as train.sweeps.report "
        "selects it); the tokenizer saved with those weights is used and model.name_or_path only names the run "
        "(train/model/warm_start.py); recorded in run_info.json",
    )
    init_head: Literal["auto", "new", "map"] = f(
        "auto",
        "with model.init_from: auto = keep the saved classification head when it predicts this task's labels "
        "(same names, same order), else a new one; new = always a new head; map = like auto, but build the "
        "head from the saved one when every label maps by name (X from X, not_X from the other labels: "
        "MNLI -> RTE, QNLI, WNLI)",
    )


@dataclass
class DataConfig:
    task: str = f("mnli", f"GLUE task: {', '.join(TASKS)}")
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
    early_stopping_patience: int | None = f(
        None,
        "stop after N evaluations in a row without improvement of the task score (the best/ model and its "
        "predictions stay; eval_results.json says so under early_stopped); unset = off",
    )
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
    group: str | None = f(
        None, "run group; unset = tracking.wandb.sweep_name (glue-train sweep sets it), else none"
    )
    job_type: str | None = f(
        None,
        "run job type; unset = the task for a sweep's runs (tracking.wandb.sweep_name set), else 'train'",
    )
    sweep_name: str | None = f(
        None,
        "the glue-train sweep sweep this run belongs to (glue-train sweep sets it to its --out folder's name); "
        "the default of group, and it makes job_type default to the task",
    )
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
        "fast path (torch.compile + CUDA graphs, bucketed padding, fused AdamW; train/engine/fastpath.py): auto = on for "
        "CUDA without DeepSpeed when compiling pays off for the run's steps (cold/warm compile cache); true forces "
        "it (CPU too: compile only); the reason is logged when it is off",
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
    dynamic: bool = f(
        False,
        "fast path: one compiled graph over every bucket length (the sequence dimension symbolic) instead of one "
        "per bucket: a cold compile about len(buckets) times shorter; CUDA graphs are still recorded per bucket",
    )
    fused_adamw: bool = f(True, "fast path: torch.optim.AdamW(fused=True), one kernel for the whole update")
    precompile: bool = f(
        True, "fast path: compile every bucket shape before the first step (no compiles later)"
    )
    cache_dir: str | None = f(
        None,
        "torch.compile's caches (inductor, AOTAutograd, mega-cache), shared by every run and rank; unset = "
        "compile/ beside the tokenized cache (data.cache_dir or $GLUE_TRAIN_CACHE or ~/.cache/glue-train)",
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


def _parse_cli_value(raw: str, tp: Any) -> Any:
    """A command-line value as YAML would read it; text for string keys that YAML would make a mapping
    (``output_dir={task}-x``) or cannot parse."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    takes_str = tp is str or str in typing.get_args(tp)
    return raw if takes_str and isinstance(value, (dict, list)) else value


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
            value = _parse_cli_value(raw, tp)
            setattr(obj, part, _coerce(value, tp, dotted, "command line"))
        else:
            if not _is_section(tp):
                raise ConfigError(f"command line: '{'.'.join(parts[: i + 1])}' is not a section")
            obj = getattr(obj, part)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one silently)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key '{key}' is written twice in the same mapping (lines {seen[key]} and "
                f"{key_node.start_mark.line + 1}); keep one",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's data; unreadable, non-UTF-8, invalid or duplicate-key files are ConfigErrors naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def load_config(
    paths: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = ()
) -> Config:
    """Build the config: defaults, then each YAML file in order (later files win), then ``key.sub=value``."""
    cfg = Config()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in paths or ():
        _merge(cfg, read_yaml(path) or {}, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(cfg, key.strip(), raw)
    expand_paths(cfg)
    validate(cfg)
    return cfg


# Path-valued keys: ``~`` and ``$VARS`` are expanded where the config is loaded (so config.yaml holds real paths).
PATH_KEYS = (
    "output_dir",
    "model.name_or_path",
    "model.init_from",
    "data.glue_dir",
    "data.hub_dataset",
    "data.cache_dir",
    "checkpoint.resume",
    "tracking.wandb.dir",
)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _put(cfg: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, leaf, value)


def expand_paths(cfg: Config) -> None:
    import os

    for key in PATH_KEYS:
        value = _get(cfg, key)
        if isinstance(value, str) and ("~" in value or "$" in value):
            expanded = os.path.expandvars(os.path.expanduser(value))
            if "$" in expanded:
                raise ConfigError(
                    f"{key}={value!r}: the environment variable in it is not set; export it or write the path"
                )
            _put(cfg, key, expanded)


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


OUTPUT_FIELDS = ("task", "model", "seed")


def _check_output_template(template: str) -> None:
    import string

    if not template.strip():
        raise ConfigError("output_dir is empty; give a folder, e.g. output_dir=runs/{task}-{model}-s{seed}")
    try:
        names = [name for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(
            f"output_dir={template!r} is not a valid template ({e}); write {{{{ and }}}} for literal braces"
        ) from None
    bad = [n for n in names if n not in OUTPUT_FIELDS]
    if bad:
        raise ConfigError(
            f"output_dir={template!r} names {{{bad[0]}}}; a template may only use "
            + ", ".join(f"{{{n}}}" for n in OUTPUT_FIELDS)
        )


def validate(cfg: Config) -> None:
    """Value checks that do not need the world size or the model (those live where they are known)."""
    if cfg.data.task not in TASKS:
        raise ConfigError(f"data.task: unknown GLUE task '{cfg.data.task}'; choose one of {', '.join(TASKS)}")
    _check_output_template(cfg.output_dir)
    _check(0 <= cfg.seed < 2**32, "seed", cfg.seed, "in [0, 2^32)")
    at_least_one = (
        "train.effective_batch_size",
        "train.epochs",
        "train.log_every",
        "eval.batch_size",
        "data.max_length",
        "checkpoint.keep_last",
        "fast.bucket_multiple",
    )
    one_or_none = (
        "train.per_device_batch_size",
        "train.max_steps",
        "eval.every_steps",
        "checkpoint.every_steps",
        "data.pad_to_multiple_of",
        "data.max_train_samples",
        "data.max_eval_samples",
        "train.early_stopping_patience",
    )
    for key in at_least_one:
        value = _get(cfg, key)
        _check(value >= 1, key, value, "at least 1")
    for key in one_or_none:
        value = _get(cfg, key)
        _check(value is None or value >= 1, key, value, "at least 1 (or null)")
    for key in ("train.max_nonfinite_skips", "data.num_workers"):
        value = _get(cfg, key)
        _check(value >= 0, key, value, ">= 0")
    t = cfg.train
    for key in (
        "train.lr",
        "train.adam_eps",
        "train.weight_decay",
        "train.warmup_ratio",
        "train.adam_beta1",
        "train.adam_beta2",
    ):
        value = _get(cfg, key)
        _check(math.isfinite(value), key, value, "a finite number")
    _check(t.lr > 0, "train.lr", t.lr, "> 0")
    _check(t.adam_eps > 0, "train.adam_eps", t.adam_eps, "> 0")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    _check(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", t.warmup_ratio, "in [0, 1)")
    for key in ("train.adam_beta1", "train.adam_beta2"):
        value = _get(cfg, key)
        _check(0.0 <= value < 1.0, key, value, "in [0, 1)")
    if t.max_grad_norm is not None:
        _check(
            math.isfinite(t.max_grad_norm) and t.max_grad_norm > 0,
            "train.max_grad_norm",
            t.max_grad_norm,
            "> 0 (or null for no clipping)",
        )
    if cfg.fast.buckets is not None:
        _check(
            bool(cfg.fast.buckets) and min(cfg.fast.buckets) >= 1,
            "fast.buckets",
            cfg.fast.buckets,
            "a non-empty list of positive lengths",
        )
    if cfg.model.dropout is not None:
        _check(
            math.isfinite(cfg.model.dropout) and 0.0 <= cfg.model.dropout < 1.0,
            "model.dropout",
            cfg.model.dropout,
            "in [0, 1)",
        )
    for key in ("model.name_or_path", "data.hub_dataset", "checkpoint.resume"):
        value = _get(cfg, key)
        _check(bool(value and value.strip()), key, value, "a non-empty string")


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


def model_short_name(name_or_path: str) -> str:
    """The model's folder or repository name: ``bert-base-uncased`` for ``google-bert/bert-base-uncased``."""
    return Path(str(name_or_path).replace("builtin:", "")).name


def run_folder(cfg: Config) -> Path:
    """The run folder ``output_dir`` names, with {task}, {model} and {seed} filled in (the one home of this rule)."""
    model = model_short_name(cfg.model.name_or_path)
    return Path(cfg.output_dir.format(task=cfg.data.task, model=model, seed=cfg.seed))
