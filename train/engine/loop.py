"""The training loop: setup -> train -> train_one_epoch -> evaluate.

It never names DDP or DeepSpeed: Accelerate and the launch config decide that.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.config import Config, run_folder, to_dict
from train.data import batches, tokenized
from train.data.metrics import compute_metrics
from train.engine import backends, checkpoint, dist
from train.engine.fastpath import FastPath, attach, decide_for_run, use_fused_adamw
from train.engine.nonfinite import Guard
from train.engine.preempt import StopFlag, requeue_if_slurm
from train.engine.progress import Progress
from train.files import write_atomic
from train.folders import runfolder
from train.model.load import load_model, load_tokenizer, model_inputs
from train.outputs import submission, summary
from train.outputs.card import write_model_cards
from train.outputs.curves import plot_run
from train.tasks import Split, Task, get_task
from train.tracking.panels import summary_numbers
from train.tracking.tracker import Tracker

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler/RNG that a resumed run needs."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps of ``epoch`` already done
    best_score: float = -math.inf
    best: dict = field(default_factory=dict)  # {"step", "epoch", "splits"} of the best eval
    last_eval: dict = field(default_factory=dict)  # the same for the latest eval
    wandb_run_id: str | None = None  # the W&B run a resume continues (train/tracking/tracker.py)
    skipped_steps: int = 0  # optimizer steps without an update (fp16 overflow, train.max_nonfinite_skips)
    train_seconds: float = 0.0  # wall time of the training steps, summed over starts (no eval, no start-up)
    samples: int = 0  # real samples trained on, summed over starts
    tokens: int = 0  # real (non-pad) tokens of them
    evals_without_improvement: int = 0  # since the best eval (train.early_stopping_patience)
    early_stopped: dict | None = None  # {"at_step", "epoch", "patience", "best_step"} once patience ran out

    @property
    def last_eval_step(self) -> int:
        return self.last_eval.get("step", -1)


@dataclass(kw_only=True)
class Run:
    """Everything a started run holds, built once by :func:`setup` (the config itself is never changed)."""

    cfg: Config
    task: Task
    out: Path
    acc: object
    layout: batches.Layout
    tokenizer: object
    inputs: batches.Inputs  # the batch fields the model takes (train/model/load.py: model_inputs)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: batches.PlanSampler
    train_loader: object
    eval_loaders: dict[Split, object]
    test_loaders: dict[Split, object]
    total_steps: int
    metrics: Tracker  # metrics.jsonl + W&B (train/tracking/tracker.py)
    stop: StopFlag  # signals, and whether every rank agreed to stop (train/engine/preempt.py)
    state: TrainState  # what a resume restores (checkpointed)
    fast: FastPath  # the step functions: compiled on the fast path, else eager (train/engine/fastpath.py)
    guard: Guard  # non-finite loss/grad policy (train/engine/nonfinite.py)
    bar: Progress  # progress over optimizer steps (train/engine/progress.py), main process only
    precision: str  # what the run computes in (cfg.precision may say auto)
    backend: backends.Backend  # DDP, DeepSpeed or FSDP (train/engine/backends/)
    info: dict = field(default_factory=dict)  # run_info.json's content (derived values)


# ----------------------------------------------------------------------------------------------------------
# setup


def output_dir(cfg: Config) -> Path:
    return run_folder(cfg)


def build_optimizer(cfg: Config, model: torch.nn.Module, backend: backends.Backend) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = backend.param_ndim(p)  # e.g. ZeRO-3 partitioned parameters are empty until gathered
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


def run(cfg: Config, argv: list[str] | None = None) -> int:
    """The whole program after the config is loaded; returns the exit code (errors raise, see train/cli.py)."""
    started = setup(cfg)
    if started is None:
        return 0  # finished before: setup printed its summary
    results = train(started)
    if results is None and started.stop.signum == signal.SIGINT:
        if started.acc.is_main_process:
            log.warning(
                "interrupted (Ctrl-C): checkpoint of step %d saved in %s; resume with the same command:\n  "
                "python -m train %s",
                started.state.global_step,
                started.out / "checkpoints",
                shlex.join(argv or []),
            )
        return 130
    return 0


@dataclass
class Splits:
    """The tokenized splits of a run (after data.max_*_samples) and their row counts."""

    train: object
    dev: dict[Split, object]
    test: dict[Split, object]
    rows: dict[str, int]


def load_splits(cfg: Config, task: Task, tokenizer, acc) -> Splits:
    rows: dict[str, int] = {}

    def split_ds(split: Split, limit: int | None):
        ds = tokenized.tokenize_split(cfg.data, task, split, tokenizer, acc.main_process_first)
        ds = ds.select(range(min(limit, len(ds)))) if limit else ds
        rows[split.name] = len(ds)
        return ds

    train_ds = split_ds(task.split("train")[0], cfg.data.max_train_samples)
    dev = {s: split_ds(s, cfg.data.max_eval_samples) for s in task.split("dev")}
    test = {s: split_ds(s, None) for s in task.split("test")} if cfg.eval.predict_test else {}
    return Splits(train_ds, dev, test, rows)


@dataclass
class Data:
    """The batch plan and the loaders of a run (train/data/), built once per start."""

    train_rows: int
    sampler: batches.PlanSampler
    train_loader: object
    eval_loaders: dict[Split, object]
    test_loaders: dict[Split, object]
    rows: dict[str, int]  # split name -> rows used (after data.max_*_samples)


def build_data(
    cfg: Config, task: Task, splits: Splits, inputs: batches.Inputs, layout: batches.Layout, acc, buckets
) -> Data:
    collate = batches.make_collator(inputs, task.is_regression, cfg.data.pad_to_multiple_of, buckets=buckets)
    pin = acc.device.type == "cuda"
    lengths = batches.row_lengths(splits.train) if cfg.data.group_by_length else None
    sampler = batches.PlanSampler(len(splits.train), layout, acc.process_index, cfg.seed, lengths)
    loader = batches.train_loader(splits.train, sampler, collate, cfg.data.num_workers, pin)

    def eval_dl(ds):
        return batches.eval_loader(ds, cfg.eval.batch_size, collate, cfg.data.num_workers, pin)

    evals = {s: eval_dl(ds) for s, ds in splits.dev.items()}
    tests = {s: eval_dl(ds) for s, ds in splits.test.items()}
    return Data(len(splits.train), sampler, loader, evals, tests, splits.rows)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    total = steps_per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def setup(cfg: Config) -> Run | None:
    """Everything a run needs; None when the run folder holds this run already finished (its summary is shown).

    The run folder is only read until the model and the data have loaded (runfolder.claim writes it), so a start
    that fails on a typo leaves nothing behind that would block the corrected rerun.
    """
    task = get_task(cfg.data.task)
    start = runfolder.inspect(cfg, lambda p: dist.resolve_precision(p, torch.cuda.is_available()))
    if not start.trains:
        if dist.launched_rank() == 0:
            log.info("%s: nothing to train.\n%s", start.reason, "\n".join(summary.lines(start.out)))
        return None
    layout = batches.Layout.derive(
        cfg.train.effective_batch_size, cfg.train.per_device_batch_size, dist.launched_world_size()
    )
    backend = backends.current()  # chosen by the launch (configs/accelerate/*.yaml), never by the run config
    acc = dist.make_accelerator(cfg.precision, layout.accum, backend)
    tracker = Tracker(cfg, start.out, acc.is_main_process, backend)  # W&B settings checked before loading
    m = build_model(cfg, task, acc, layout, backend)
    if acc.is_main_process:
        runfolder.claim(start, cfg)  # only now: the marker, the old run moved aside, config.yaml
    acc.wait_for_everyone()
    state, resumed = restore(acc, cfg, start, tracker)  # after compiling: the RNG states are the checkpoint's
    run = Run(
        cfg=cfg,
        task=task,
        out=start.out,
        acc=acc,
        layout=layout,
        tokenizer=m.tokenizer,
        inputs=m.inputs,
        model=m.model,
        optimizer=m.optimizer,
        scheduler=m.scheduler,
        sampler=m.data.sampler,
        train_loader=m.data.train_loader,
        eval_loaders=m.data.eval_loaders,
        test_loaders=m.data.test_loaders,
        total_steps=m.total,
        metrics=tracker,
        stop=StopFlag(),
        state=state,
        fast=m.fast,
        guard=Guard(acc, m.model, acc.mixed_precision, cfg.train.max_nonfinite_skips, m.newest, backend),
        bar=Progress(m.total, state.global_step, f"train {task.name}", acc.is_main_process),
        precision=acc.mixed_precision,  # what the run computes in: no, bf16 or fp16 (cfg.precision may say auto)
        backend=backend,
    )
    run.stop.install()
    write_run_info(run, m.data.train_rows, m.data.sampler.steps_per_epoch())
    run.state.wandb_run_id = tracker.start(
        state.wandb_run_id,
        state.global_step,
        acc.unwrap_model(m.model),
        acc.device,
        dist.device_name(acc),
        run.precision,
        layout.world,
        dist.any_rank,
        run_info=run.info,  # in memory: what W&B shows beside the config
    )
    if acc.is_main_process:
        log.info("\n".join(start_block(run, m.data, resumed)))
    return run


@dataclass
class Built:
    """The model side of a run, prepared for the backend: what :func:`setup` puts into the Run."""

    tokenizer: object
    inputs: batches.Inputs
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    data: Data
    total: int
    fast: FastPath
    newest: object  # () -> the newest complete checkpoint (for error messages)


def build_model(cfg: Config, task: Task, acc, layout: batches.Layout, backend: backends.Backend) -> Built:
    """Tokenizer, model, data, optimizer and schedule, prepared by the backend; the fast path compiled."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # same init on every rank
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, task, tokenizer)
    inputs = model_inputs(tokenizer, model)  # before prepare: the signature of the unwrapped model
    splits = load_splits(cfg, task, tokenizer, acc)
    # fast path or eager, and why (logged by attach): device, backend, and whether compiling pays off
    decision = decide_for_run(cfg, acc, layout, model, inputs, task.is_regression, len(splits.train))
    d = build_data(cfg, task, splits, inputs, layout, acc, decision.buckets)
    total = total_steps(cfg, d.sampler.steps_per_epoch())
    optimizer = build_optimizer(cfg, model, backend)
    if decision.fused_adamw:
        optimizer = use_fused_adamw(optimizer)
    scheduler = build_scheduler(cfg, optimizer, total)
    # The scheduler is not prepared: Accelerate would step it once per process per step.
    # backend.prepare = acc.prepare, with the backend's own settings (a DeepSpeed JSON) filled from the run config
    loaders = [*d.eval_loaders.values(), *d.test_loaders.values()]
    prepared = backend.prepare(acc, cfg, layout, model, optimizer, *loaders, precision=acc.mixed_precision)
    model, optimizer, rest = prepared[0], prepared[1], list(prepared[2:])
    d.eval_loaders = dict(zip(d.eval_loaders, rest[: len(d.eval_loaders)], strict=True))
    d.test_loaders = dict(zip(d.test_loaders, rest[len(d.eval_loaders) :], strict=True))
    acc.register_for_checkpointing(scheduler)
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
    )
    out = run_folder(cfg)
    return Built(
        tokenizer, inputs, model, optimizer, scheduler, d, total, fast, lambda: checkpoint.newest(out)
    )


def start_block(run: Run, d: Data, resumed: str) -> list[str]:
    """What a person needs to know before the first step, in one block (main process)."""
    cfg, lay = run.cfg, run.layout
    dev = ", ".join(f"{s.name} {d.rows[s.name]}" for s in run.eval_loaders)
    test = (
        ", ".join(f"{s.name} {d.rows[s.name]}" for s in run.test_loaders) or "none (eval.predict_test=false)"
    )
    source = cfg.data.glue_dir or f"Hub {cfg.data.hub_dataset}"
    capped = f", capped by train.max_steps={cfg.train.max_steps}" if cfg.train.max_steps else ""
    steps = f"{run.sampler.steps_per_epoch()} per epoch x {cfg.train.epochs} epochs{capped}"
    return [
        f"==== {run.task.name} · {cfg.model.name_or_path} · seed {cfg.seed} ====",
        f"  {'run folder':<12}{run.out.resolve()}",
        f"  {'data':<12}train {d.train_rows} rows; dev {dev}; test {test} ({source})",
        f"  {'batch':<12}{lay.describe()}",
        f"  {'steps':<12}{run.total_steps} optimizer steps ({steps})",
        f"  {'compute':<12}precision {run.precision}; {lay.world} x {dist.device_name(run.acc)}; "
        f"{run.backend.title(run.acc)}",
        f"  {'fast path':<12}{fast_line(run.fast.run_info())}",
        f"  {'start':<12}{resumed}",
    ]


def fast_line(info: dict) -> str:
    """The fast-path decision and, when it compiled, what compiling cost and what the cache held."""
    cache = info.get("compile_cache")
    if not cache:
        return info["fast_path"]
    seen = (
        f"{cache['hits']} hits, {cache['misses']} misses" if cache.get("hits") is not None else "no lookups"
    )
    state = "warm" if cache.get("warm_before") else "cold"
    return f"{info['fast_path']}; compiled in {info['compile_s']} s (cache {cache['dir']}: {state}, {seen})"


def restore(acc, cfg: Config, start: runfolder.Start, tracker: Tracker) -> tuple[TrainState, str]:
    """The training state to start from: the newest usable checkpoint (or the one asked for) restored into the
    prepared objects, or a fresh one; and where the run starts, in words."""
    want = cfg.checkpoint.resume
    path = None
    if want not in ("auto", "never") or start.action == "resume":
        path = checkpoint.choose(acc, want, start.out, to_dict(cfg))
    if path is None:
        tracker.rewind(0)
        return TrainState(), f"fresh ({start.reason})"
    state = TrainState(**checkpoint.load(acc, path)["train_state"])
    tracker.rewind(state.global_step)
    return state, (
        f"resumed from {path} at step {state.global_step} (epoch {state.epoch}, step {state.step_in_epoch} of it)"
    )


def update_run_info(run: Run, **values) -> None:
    """Add ``values`` to ``run_info.json`` (main process; the dict lives in memory, the file follows it)."""
    run.info.update(values)
    if run.acc.is_main_process:
        write_atomic(run.out / "run_info.json", json.dumps(run.info, indent=1))


def write_run_info(run: Run, n_train: int, steps_per_epoch: int) -> None:
    """Derived values of this start (world, batch layout, precision, versions, SLURM ids): ``run_info.json``."""
    import os

    import accelerate
    import transformers

    info = {
        "world_size": run.layout.world,
        "per_device_batch_size": run.layout.per_device,
        "grad_accum_steps": run.layout.accum,
        "effective_batch_size": run.layout.effective,
        "precision": run.precision,
        "device": dist.device_name(run.acc),
        "distributed_type": str(run.acc.distributed_type),
        "backend": run.backend.title(run.acc),
        run.backend.name: run.backend.describe(run.acc),  # its own settings (DeepSpeed: the filled JSON)
        "model_inputs": list(run.inputs.model_keys),
        "init_from": getattr(
            run.acc.unwrap_model(run.model), "init_source", None
        ),  # train/model/warm_start.py
        "train_rows": n_train,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": run.total_steps,
        **run.fast.run_info(),  # fast_path, compile_s, compile_cache (train/engine/fastpath.py)
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
        "slurm": {
            k: os.environ[k]
            for k in (
                "SLURM_JOB_ID",
                "SLURM_ARRAY_JOB_ID",
                "SLURM_ARRAY_TASK_ID",
                "SLURM_RESTART_COUNT",
                "SLURM_JOB_NODELIST",
            )
            if k in os.environ
        },
    }
    run.info = {}
    update_run_info(run, **info)


# ----------------------------------------------------------------------------------------------------------
# training


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


def train(run: Run) -> dict | None:
    """Train to the end (returns eval_results) or until a stop signal (returns None after checkpointing)."""
    with run.bar.redirect():
        return _train(run)


def _train(run: Run) -> dict | None:
    cfg, st = run.cfg, run.state
    for epoch in range(st.epoch, cfg.train.epochs):
        if st.global_step >= run.total_steps or st.early_stopped:
            break
        st.epoch = epoch
        train_one_epoch(run)
        if run.stop.agreed:
            preempt(run)
            return None
        if st.step_in_epoch == run.sampler.steps_per_epoch():
            st.epoch, st.step_in_epoch = epoch + 1, 0
            if cfg.eval.every_epoch and st.last_eval_step != st.global_step:
                evaluate_and_track(run)
    if st.last_eval_step != st.global_step:
        evaluate_and_track(run)
    return finish(run)


def train_one_epoch(run: Run) -> None:
    cfg, st, acc, lay = run.cfg, run.state, run.acc, run.layout
    run.model.train()
    run.sampler.set_epoch(st.epoch, st.step_in_epoch)
    world_scale = lay.world * lay.accum  # undoes the mean over ranks (DDP) and micro-steps (Accelerate)
    win = Window(acc.device)
    micro = 0
    for batch in run.train_loader:
        n_real = len(run.sampler.global_batch(st.step_in_epoch))
        mask = batch["attention_mask"]  # host-side counts, no device sync: real tokens of real samples
        tokens, padded = int((mask.sum(1) * (batch["weight"] > 0)).sum()), mask.numel()
        batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
        with acc.accumulate(run.model):
            losses = run.fast.train_losses(batch)  # forward + per-sample loss (one graph on the fast path)
            losses = run.guard.poison(losses, st.global_step + 1)  # NaN-injection test hook (no-op)
            weighted = (losses * batch["weight"]).sum()
            acc.backward(weighted * (world_scale / n_real))
            if acc.sync_gradients:
                # clip + global norm; under DeepSpeed the engine clipped inside its step and reports the norm
                norm = run.backend.grad_norm(acc, run.model, cfg.train.max_grad_norm)
                run.guard.after_backward(st.global_step + 1, norm, weighted.detach())  # device-side record
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=run.fast.set_to_none)
        win.add(weighted.detach(), tokens, int(batch["weight"].shape[0]), padded)
        micro += 1
        if micro % lay.accum:
            continue
        lr = run.optimizer.param_groups[0]["lr"]  # the LR this step used
        if acc.optimizer_step_was_skipped or run.guard.skipped_now:
            st.skipped_steps += 1
        else:
            run.scheduler.step()
        st.global_step += 1
        st.step_in_epoch += 1
        run.bar.update(st.global_step, st.epoch + st.step_in_epoch / run.sampler.steps_per_epoch())
        win.step(norm, n_real, lr)
        if st.global_step % cfg.train.log_every == 0 or st.global_step == run.total_steps:
            log_train(run, win)
            win = Window(acc.device)
        if cfg.eval.every_steps and st.global_step % cfg.eval.every_steps == 0:
            evaluate_and_track(run)  # before the checkpoint of the same step, so that it holds this eval
            run.model.train()
        if cfg.checkpoint.every_steps and st.global_step % cfg.checkpoint.every_steps == 0:
            save_checkpoint(run)
        run.stop.agreed = should_stop(run)  # voted every step, so all ranks stop after the same one
        if st.global_step >= run.total_steps or run.stop.agreed or st.early_stopped:
            break


class Window:
    """Train metrics summed on the device between two log lines (read once per log, not per step)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.norm = torch.zeros((), device=device)
        self.samples, self.steps, self.tokens, self.slots, self.lr = 0, 0, 0, 0, 0.0
        self.padded = 0  # token slots computed (real + pad)
        self.t0 = time.perf_counter()

    def add(self, weighted_loss: torch.Tensor, tokens: int, slots: int, padded: int = 0) -> None:
        self.loss += weighted_loss
        self.padded += padded
        self.tokens += tokens
        self.slots += slots

    def step(self, norm, n_real: int, lr: float) -> None:
        self.lr = lr
        if norm is not None:
            self.norm += torch.as_tensor(norm, device=self.norm.device, dtype=torch.float32)
        self.samples += n_real
        self.steps += 1


def log_train(run: Run, win: Window) -> None:
    acc = run.acc
    counts = torch.tensor([win.tokens, win.padded], dtype=torch.float64).to(win.loss.device)
    sums = acc.reduce(torch.cat([win.loss.double().view(1), counts]), reduction="sum")  # every rank's share
    loss_sum, tokens, padded = sums.tolist()  # the one device read of the window
    elapsed = time.perf_counter() - win.t0
    row = {
        "step": run.state.global_step,
        "epoch": run.state.epoch + run.state.step_in_epoch / run.sampler.steps_per_epoch(),
        "train/loss": float(loss_sum) / max(1, win.samples),
        "train/lr": win.lr,
        "train/grad_norm": float(win.norm) / max(1, win.steps),
        "perf/samples_per_s": win.samples / elapsed,
        **run.fast.metrics(),  # perf/compiled_graphs, perf/recompiles on the fast path
        "train/skipped_steps": run.state.skipped_steps,
    }
    row["train/epoch"] = row["epoch"]
    row.update(run.metrics.throughput(tokens, padded, elapsed))  # perf/tokens_per_s, padding, mfu, memory
    if not math.isfinite(row["train/loss"]):
        log.error("non-finite training loss at step %d", run.state.global_step)
    run.metrics.write(row)
    st = run.state
    st.train_seconds += elapsed
    st.samples += win.samples
    st.tokens += int(tokens)
    run.guard.check(f"at the log of step {row['step']}")
    run.bar.logged(row["train/loss"], row["train/lr"], row["perf/samples_per_s"])


def should_stop(run: Run) -> bool:
    """All ranks agree to stop at the same step if any of them got a signal.

    The vote runs on the CPU over gloo, so asking every step costs no host-device synchronisation.
    """
    stop = dist.any_rank(run.stop.raised)
    if stop and not run.stop.raised:
        run.stop.signum = -1  # a peer was signalled
    return stop


def save_checkpoint(run: Run) -> Path:
    run.guard.check(f"before the checkpoint of step {run.state.global_step}")  # never save a bad state
    state = {"train_state": asdict(run.state), "config": to_dict(run.cfg)}
    return checkpoint.save(run.acc, run.out, run.state.global_step, state, run.cfg.checkpoint.keep_last)


def preempt(run: Run) -> None:
    run.bar.close()
    save_checkpoint(run)
    if run.acc.is_main_process and run.stop.requeue:
        requeue_if_slurm()
    run.metrics.close(preempted=True)
    run.acc.wait_for_everyone()
    run.acc.end_training()


# ----------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(run: Run, loader) -> dict[str, np.ndarray]:
    """Predictions, labels, losses and row ids over a whole split, gathered from every rank exactly once."""
    run.model.eval()
    parts: dict[str, list] = {"pred": [], "label": [], "loss": [], "idx": [], "conf": []}
    for batch in loader:
        logits = run.fast.eval_logits(batch)
        labels = batch["labels"]
        losses = per_sample_loss(
            logits, labels.clamp(min=0) if not run.task.is_regression else labels, run.task.is_regression
        )
        pred = logits.float().squeeze(-1) if run.task.is_regression else logits.argmax(-1)
        conf = (
            pred if run.task.is_regression else logits.float().softmax(-1).amax(-1)
        )  # p(pred), for the W&B table
        got = run.acc.gather_for_metrics((pred, labels, losses, batch["idx"], conf))
        for key, value in zip(parts, got, strict=True):
            parts[key].append(value)  # kept on the device: one host read per split, not one per batch
    return {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}


def evaluate(run: Run) -> dict[str, dict[str, float]]:
    results = {}
    for split, loader in run.eval_loaders.items():
        p = predict(run, loader)
        run.metrics.eval_details(run.state.global_step, split, run.task, p)  # W&B confusion matrix
        results[split.name] = {
            **compute_metrics(run.task, p["pred"], p["label"]),
            "loss": float(p["loss"].mean()),
        }
    return results


def evaluate_and_track(run: Run) -> dict:
    st = run.state
    run.guard.check(f"before the evaluation at step {st.global_step}")
    results = evaluate(run)
    row = {"step": st.global_step, "epoch": st.epoch + st.step_in_epoch / run.sampler.steps_per_epoch()}
    st.last_eval = {"step": row["step"], "epoch": row["epoch"], "splits": results}
    for split in run.eval_loaders:
        row.update({f"eval/{k}{split.suffix}": v for k, v in results[split.name].items()})
    run.metrics.write(row)
    primary = next(iter(run.eval_loaders)).name
    score = results[primary]["score"]
    if run.acc.is_main_process:
        better = (
            " (best so far)"
            if score > st.best_score
            else f" (best: {st.best_score:.4f} at step {st.best['step']})"
        )
        splits = "; ".join(f"{name} {summary.metrics_text(m)}" for name, m in results.items())
        log.info("eval at step %d (epoch %.2f): %s%s", st.global_step, row["epoch"], splits, better)
    if score > st.best_score:
        st.best_score = score
        st.best = {"step": st.global_step, "epoch": row["epoch"], "splits": results}
        st.evals_without_improvement = 0
        run.metrics.best(row)  # best/<metric> in the W&B summary
        checkpoint.export_model(run.acc, run.model, run.tokenizer, run.out / "best")
        write_test_predictions(run)
    else:
        st.evals_without_improvement += 1
    check_early_stop(run, row["epoch"])
    run.model.train()
    return results


def check_early_stop(run: Run, epoch: float) -> None:
    """After an eval: stop once train.early_stopping_patience evals in a row did not beat the best one.

    Every rank sees the same gathered metrics, so every rank decides the same at the same step."""
    st, patience = run.state, run.cfg.train.early_stopping_patience
    if not patience or st.early_stopped or st.evals_without_improvement < patience:
        return
    st.early_stopped = {
        "at_step": st.global_step,
        "epoch": epoch,
        "patience": patience,
        "best_step": st.best.get("step"),
    }
    if run.acc.is_main_process:
        log.info(
            "early stopping at step %d: %d evaluations without improvement of the task score (best at step %s; "
            "best/ and its predictions are kept)",
            st.global_step,
            patience,
            st.best.get("step"),
        )


def write_test_predictions(run: Run) -> None:
    if not run.test_loaders:
        return
    folder = run.out / "predictions"
    for split, loader in run.test_loaders.items():
        p = predict(run, loader)
        if run.acc.is_main_process:
            folder.mkdir(exist_ok=True)
            submission.write_predictions(folder / split.submission, run.task, p["idx"], p["pred"])


# ----------------------------------------------------------------------------------------------------------
# the end


def finish(run: Run) -> dict:
    st = run.state
    run.bar.close()
    run.guard.check("at the end of training")
    checkpoint.export_model(run.acc, run.model, run.tokenizer, run.out / "final")
    results = {
        "task": run.task.name,
        "model": run.cfg.model.name_or_path,
        "seed": run.cfg.seed,
        "main_metric": run.task.main_metric,
        "final": st.last_eval,  # train() evaluated at the last step
        "best": st.best,
        "early_stopped": st.early_stopped,  # None: ran to train.epochs / train.max_steps
    }
    if run.acc.is_main_process:
        update_run_info(run, **end_info(run))  # train time, throughput, where W&B keeps the run
        write_atomic(run.out / "eval_results.json", json.dumps(results, indent=1))  # the "finished" marker
        write_model_cards(run.out)  # best/README.md, final/README.md (the Hub's model-card format)
        plot_run(run.out)  # curves.png (one log line instead when matplotlib is missing)
        log.info("\n".join(summary.lines(run.out)))
    speed = run.info.get("throughput") or {}
    timing = {"train_time_s": run.info.get("train_time_s"), **{f"perf/mean_{k}": v for k, v in speed.items()}}
    numbers = {**summary_numbers(results, run.task), **timing}
    numbers.update({f"early_stopped/{k}": v for k, v in (st.early_stopped or {}).items()})
    run.metrics.summary(numbers)  # the summary block's numbers in the W&B run summary
    run.metrics.wrong_predictions(run.task, run.cfg.data)  # W&B table of the best model's mistakes
    run.metrics.close()
    run.acc.wait_for_everyone()
    run.acc.end_training()
    return results


def end_info(run: Run) -> dict:
    """What run_info.json gains at the end: training time and mean throughput over the whole run (all starts)."""
    st = run.state
    seconds = max(st.train_seconds, 1e-9)
    perf = {"samples_per_s": st.samples / seconds, "tokens_per_s": st.tokens / seconds}
    mfu = run.metrics.speed.mfu(st.tokens, seconds)
    if mfu is not None:
        perf["mfu"] = mfu
    return {"train_time_s": round(st.train_seconds, 3), "throughput": perf, "wandb": run.metrics.info or None}
