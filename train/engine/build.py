"""Building what a run trains: tokenizer, model, data, optimizer and schedule, prepared by the backend.

:func:`build` returns a :class:`Built`; the Run holds it as it is (train/engine/run.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from train.config import Config
from train.data import batches, tokenized
from train.data.metrics import unscorable
from train.engine import dist
from train.engine.fastpath import FastPath, attach, decide_for_run, eval_rows_per_forward, use_fused_adamw
from train.engine.preempt import StopFlag
from train.errors import ConfigError, StopRequested, UserError
from train.model.load import load_model, load_tokenizer, model_inputs
from train.tasks import Split, Task

if TYPE_CHECKING:
    from accelerate import Accelerator

    from train.engine.backends import Backend

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """The tokenized splits of a run (after data.max_*_samples) and their row counts."""

    train: Any
    dev: dict[Split, Any]
    test: dict[Split, Any]
    rows: dict[str, int]
    sources: dict[str, dict]  # train and dev split name -> what its rows were read from (data_fingerprint)


@dataclass
class Data:
    """The batch plan and the loaders of a run (train/data/), built once per start."""

    train_rows: int
    sampler: batches.PlanSampler
    train_loader: Any
    eval_loaders: dict[Split, Any]
    test_loaders: dict[Split, Any]
    rows: dict[str, int]  # split name -> rows used (after data.max_*_samples)
    sources: dict[str, dict]  # the data's fingerprint: a checkpoint keeps it, a resume compares it


@dataclass
class Built:
    """The model side of a run, prepared for the backend, and its data."""

    tokenizer: Any
    inputs: batches.Inputs  # the batch fields the model takes (train/model/load.py: model_inputs)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Data
    total_steps: int
    fast: FastPath  # the step functions: compiled on the fast path, else eager (train/engine/fastpath.py)


def build_optimizer(cfg: Config, model: torch.nn.Module, backend: Backend) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = backend.param_ndim(p)  # e.g. sharded parameters are empty until gathered
            (no_decay if ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return backend.make_optimizer(cfg, groups)  # torch's AdamW, or the backend's own kernel if configured


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    """Counted in optimizer steps; stepped by the loop exactly once per optimizer step on every rank."""
    warmup = int(cfg.train.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.train.lr_scheduler == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_splits(cfg: Config, task: Task, tokenizer, acc: Accelerator, stop: StopFlag) -> Splits:
    """Every split tokenized: the main process first (it writes the cache; a signal abandons it between tokenizer
    batches), then a stop vote, then the other ranks (they read what it wrote)."""
    rows: dict[str, int] = {}
    sources: dict[str, dict] = {}

    def split_ds(split: Split, limit: int | None, trained: bool = True):
        ds, failed = None, None
        if acc.is_main_process:
            try:
                with contextlib.suppress(StopRequested):  # the vote below stops every rank
                    ds = tokenized.tokenize_split(
                        cfg.data, task, split, tokenizer, interrupted=lambda: stop.raised
                    )
            except UserError as e:  # a missing or bad file: every rank leaves with it (below)
                failed = e
        stop.check(f"tokenizing {task.name}/{split.name}")  # also the barrier: the cache entry is written
        dist.raise_from_main(failed)
        if ds is None:
            ds = tokenized.tokenize_split(cfg.data, task, split, tokenizer)
        ds = ds.select(range(min(limit, len(ds)))) if limit else ds
        problem = unscorable(task, list(ds["label"])) if limit and split.kind == "dev" else None
        if problem:
            raise ConfigError(
                f"data.max_eval_samples={limit}: the first {len(ds)} rows of {task.name}'s {split.name} split "
                f"cannot give the task's metrics ({problem}); raise data.max_eval_samples or unset it"
            )
        rows[split.name] = len(ds)
        if trained:  # the data the run's state depends on (test predictions are made afresh at the end)
            sources[split.name] = {**tokenized.data_fingerprint(cfg.data, task, split), "rows": len(ds)}
        return ds

    train_ds = split_ds(task.split("train")[0], cfg.data.max_train_samples)
    dev = {s: split_ds(s, cfg.data.max_eval_samples) for s in task.split("dev")}
    test = {s: split_ds(s, None, trained=False) for s in task.split("test")} if cfg.eval.predict_test else {}
    return Splits(train_ds, dev, test, rows, sources)


def _warn_about_workers(workers: int, processes: int) -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers > cpus:
        log.warning(
            "data.num_workers=%d starts %d loader processes per rank (%d ranks) but this process may use %d CPUs: "
            "workers beyond the CPUs only cost start-up time and memory; data.num_workers=%d or fewer suffices",
            workers,
            workers,
            processes,
            cpus,
            max(0, cpus - 1),
        )


def build_data(
    cfg: Config,
    task: Task,
    splits: Splits,
    inputs: batches.Inputs,
    layout: batches.Layout,
    acc: Accelerator,
    buckets,
) -> Data:
    collate = batches.make_collator(inputs, task.is_regression, cfg.data.pad_to_multiple_of, buckets=buckets)
    pin = acc.device.type == "cuda"
    if acc.is_main_process:  # one warning per launch
        _warn_about_workers(cfg.data.num_workers, acc.num_processes)
    lengths = batches.row_lengths(splits.train) if cfg.data.group_by_length else None
    sampler = batches.PlanSampler(len(splits.train), layout, acc.process_index, cfg.seed, lengths)
    loader = batches.train_loader(splits.train, sampler, collate, cfg.data.num_workers, pin)

    def eval_dl(ds):
        return batches.eval_loader(ds, cfg.eval.batch_size, collate, cfg.data.num_workers, pin)

    evals = {s: eval_dl(ds) for s, ds in splits.dev.items()}
    tests = {s: eval_dl(ds) for s, ds in splits.test.items()}
    return Data(len(splits.train), sampler, loader, evals, tests, splits.rows, splits.sources)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    total = steps_per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    logits = logits.float()  # the loss in fp32 whatever the autocast dtype
    if regression:
        return (logits.squeeze(-1) - labels) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def model_forward(model: torch.nn.Module, inputs: batches.Inputs):
    """batch -> logits: the model on exactly the fields its tokenizer and ``forward`` agree on."""

    def forward(batch: dict) -> torch.Tensor:
        return model(**{k: batch[k] for k in inputs.model_keys}).logits

    return forward


def build(
    cfg: Config, task: Task, acc: Accelerator, layout: batches.Layout, backend: Backend, stop: StopFlag
) -> Built:
    """Tokenizer, model, data, optimizer and schedule, prepared by the backend; the fast path compiled. A stop
    agreed after a stage (``stop.check``) raises :class:`~train.errors.StopRequested` on every rank."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # same init on every rank
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, task, tokenizer)
    inputs = model_inputs(tokenizer, model)  # before prepare: the signature of the unwrapped model
    stop.check("loading the model")
    splits = load_splits(cfg, task, tokenizer, acc, stop)
    # fast path or eager, and why (logged by attach): device, backend, and whether compiling pays off
    evaluated = [len(ds) for ds in (*splits.dev.values(), *splits.test.values())]
    eval_rows = eval_rows_per_forward(cfg.eval.batch_size, evaluated)
    decision = decide_for_run(
        cfg, acc, layout, model, inputs, task.is_regression, len(splits.train), backend, eval_rows
    )
    d = build_data(cfg, task, splits, inputs, layout, acc, decision.buckets)
    total = total_steps(cfg, d.sampler.steps_per_epoch())
    optimizer = build_optimizer(cfg, model, backend)
    if decision.fused_adamw:
        optimizer = use_fused_adamw(optimizer)
    scheduler = build_scheduler(cfg, optimizer, total)
    # The scheduler is not prepared: Accelerate would step it once per process per step. Nor is it registered
    # for Accelerate's checkpoints (a pickle): its state is JSON in trainer_state.json (train/engine/checkpointer.py).
    # backend.prepare = acc.prepare, with the backend's own settings filled from the run config
    loaders = [*d.eval_loaders.values(), *d.test_loaders.values()]
    prepared = backend.prepare(acc, cfg, layout, model, optimizer, *loaders, precision=acc.mixed_precision)
    model, optimizer, rest = prepared[0], prepared[1], list(prepared[2:])
    d.eval_loaders = dict(zip(d.eval_loaders, rest[: len(d.eval_loaders)], strict=True))
    d.test_loaders = dict(zip(d.test_loaders, rest[len(d.eval_loaders) :], strict=True))
    fast = attach(  # compiles every bucket shape up front
        decision,
        cfg=cfg,
        acc=acc,
        model=model,
        optimizer=optimizer,
        forward=model_forward(model, inputs),
        loss=lambda logits, labels: per_sample_loss(logits, labels, task.is_regression),
        inputs=inputs,
        layout=layout,
        regression=task.is_regression,
        vocab=len(tokenizer),  # the ids the tokenizer can produce
        train_rows=len(splits.train),
        eval_rows=eval_rows,
        between_shapes=lambda: stop.check("compiling"),  # one compile cannot be interrupted: between them
    )
    stop.check("compiling")
    return Built(tokenizer, inputs, model, optimizer, scheduler, d, total, fast)
