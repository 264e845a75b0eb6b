"""The training loop: setup -> train -> train_one_epoch -> evaluate.

It never names DDP or DeepSpeed: Accelerate and the launch config decide that.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train import backend, checkpoint, data, dist
from train.config import Config, ConfigError, dump, run_folder, to_dict
from train.fastpath import FastPath, attach, decide, use_fused_adamw
from train.files import write_atomic
from train.metrics import compute_metrics
from train.model import load_model, load_tokenizer, model_inputs
from train.nonfinite import Guard
from train.preempt import StopFlag, requeue_if_slurm
from train.tasks import Split, Task, get_task
from train.tracking import Tracker

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
    wandb_run_id: str | None = None  # the W&B run a resume continues (train/tracking.py)
    skipped_steps: int = 0  # optimizer steps without an update (fp16 overflow, train.max_nonfinite_skips)
    evals_without_improvement: int = 0  # since the best eval (train.early_stopping_patience)
    early_stopped: dict | None = None  # {"at_step", "epoch", "patience", "best_step"} once patience ran out

    @property
    def last_eval_step(self) -> int:
        return self.last_eval.get("step", -1)


@dataclass
class Run:
    cfg: Config
    task: Task
    out: Path
    acc: object
    layout: data.Layout
    tokenizer: object
    inputs: data.Inputs  # the batch fields the model takes (train/model.py: model_inputs)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: data.PlanSampler
    train_loader: object
    eval_loaders: dict[Split, object]
    test_loaders: dict[Split, object]
    total_steps: int
    metrics: Tracker  # metrics.jsonl + W&B (train/tracking.py)
    stop: StopFlag
    state: TrainState = field(default_factory=TrainState)
    fast: FastPath | None = (
        None  # the step functions: compiled on the fast path, else eager (train/fastpath.py)
    )
    guard: Guard | None = None  # non-finite loss/grad policy (train/nonfinite.py)
    bar: object = None  # progress bar over optimizer steps, main process only
    stopping: bool = False  # every rank agreed to stop (a signal reached at least one of them)


# ----------------------------------------------------------------------------------------------------------
# setup


def output_dir(cfg: Config) -> Path:
    return run_folder(cfg)


def check_output_dir(cfg: Config, out: Path) -> None:
    """Refuse to mix two different runs in one folder (unless overwrite)."""
    old = out / "config.yaml"
    if not old.exists() or cfg.overwrite:
        return
    ignore = ("overwrite", "checkpoint", "tracking")
    import yaml

    try:
        loaded = yaml.safe_load(old.read_text())
    except yaml.YAMLError:
        loaded = None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{old} is empty or damaged, so it cannot be compared with this run's config. Restore or delete it "
            "(the checkpoints stay usable), or set overwrite=true"
        )
    before = {k: v for k, v in loaded.items() if k not in ignore}
    now = {k: v for k, v in to_dict(cfg).items() if k not in ignore}
    if before != now:
        diff = sorted(
            f"{s}.{k}" if isinstance(now.get(s), dict) else s
            for s in now
            for k in (now[s] if isinstance(now[s], dict) else [None])
            if (before.get(s, {}).get(k) if k else before.get(s)) != (now[s].get(k) if k else now[s])
        )
        raise ConfigError(
            f"output_dir {out} holds a run with a different config (differs in: {', '.join(diff)}). "
            "Use another output_dir, or set overwrite=true to train there anyway"
        )


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = backend.param_ndim(p)  # ZeRO-3 partitioned parameters are empty until gathered
            (no_decay if ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return backend.make_optimizer(cfg, groups)  # torch AdamW, or DeepSpeed's fused Adam if configured


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


def setup(cfg: Config) -> Run:
    task = get_task(cfg.data.task)
    layout = data.Layout.derive(
        cfg.train.effective_batch_size, cfg.train.per_device_batch_size, dist.launched_world_size()
    )
    acc = dist.make_accelerator(cfg.precision, layout.accum)
    cfg.precision = acc.mixed_precision if acc.mixed_precision != "no" else "no"
    fast = decide(cfg, acc.device, dist.uses_deepspeed(), layout.world)  # logged (with its reason) by attach
    out = output_dir(cfg)
    check_output_dir(cfg, out)
    acc.wait_for_everyone()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", dump(cfg))  # a kill -9 never leaves half a config

    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # same init on every rank
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, task, tokenizer)
    inputs = model_inputs(tokenizer, model)  # before prepare: the signature of the unwrapped model
    splits = {kind: task.split(kind) for kind in ("train", "dev", "test")}
    main_first = acc.main_process_first
    train_ds = data.tokenize_split(cfg.data, task, splits["train"][0], tokenizer, main_first)
    if cfg.data.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.data.max_train_samples, len(train_ds))))
    collate = data.make_collator(
        inputs, task.is_regression, cfg.data.pad_to_multiple_of, buckets=fast.buckets
    )
    pin = acc.device.type == "cuda"
    lengths = data.row_lengths(train_ds) if cfg.data.group_by_length else None
    sampler = data.PlanSampler(len(train_ds), layout, acc.process_index, cfg.seed, lengths)
    loader = data.train_loader(train_ds, sampler, collate, cfg.data.num_workers, pin)

    def eval_dl(split: Split, limit: int | None):
        ds = data.tokenize_split(cfg.data, task, split, tokenizer, main_first)
        if limit:
            ds = ds.select(range(min(limit, len(ds))))
        return data.eval_loader(ds, cfg.eval.batch_size, collate, cfg.data.num_workers, pin)

    evals = {s: eval_dl(s, cfg.data.max_eval_samples) for s in splits["dev"]}
    tests = {s: eval_dl(s, None) for s in splits["test"]} if cfg.eval.predict_test else {}

    steps_per_epoch = sampler.steps_per_epoch()
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    optimizer = build_optimizer(cfg, model)
    if fast.fused_adamw:
        optimizer = use_fused_adamw(optimizer)
    scheduler = build_scheduler(cfg, optimizer, total)
    # The scheduler is not prepared: Accelerate would step it once per process per step.
    # backend.prepare = acc.prepare, with the DeepSpeed config (if any) filled from the run config first
    prepared = backend.prepare(acc, cfg, layout, model, optimizer, *evals.values(), *tests.values())
    model, optimizer, rest = prepared[0], prepared[1], list(prepared[2:])
    evals = dict(zip(evals, rest[: len(evals)], strict=True))
    tests = dict(zip(tests, rest[len(evals) :], strict=True))
    acc.register_for_checkpointing(scheduler)

    run = Run(
        cfg,
        task,
        out,
        acc,
        layout,
        tokenizer,
        inputs,
        model,
        optimizer,
        scheduler,
        sampler,
        loader,
        evals,
        tests,
        total,
        Tracker(cfg, out, acc.is_main_process),
        StopFlag(),
    )
    run.stop.install()
    run.guard = Guard(
        acc, model, cfg.precision, cfg.train.max_nonfinite_skips, lambda: checkpoint.newest(out)
    )
    resume(run)
    run.fast = attach(run, fast, forward, per_sample_loss)  # compiles every bucket shape up front
    write_run_info(run, len(train_ds), steps_per_epoch)
    run.state.wandb_run_id = run.metrics.start(
        run.state.wandb_run_id,
        run.state.global_step,
        acc.unwrap_model(model),
        acc.device,
        dist.device_name(acc),
        cfg.precision,
        layout.world,
    )
    log.info(
        "%s; %d optimizer steps (%d per epoch); precision %s; device %s",
        layout.describe(),
        total,
        steps_per_epoch,
        cfg.precision,
        dist.device_name(acc),
    )
    return run


def resume(run: Run) -> None:
    path = checkpoint.find_resume(run.cfg.checkpoint.resume, run.out)
    if path is None:
        run.metrics.rewind(0)
        return
    run.state = TrainState(**checkpoint.load(run.acc, path)["train_state"])
    run.metrics.rewind(run.state.global_step)
    log.info(
        "resumed from %s at step %d (epoch %d, step %d of it)",
        path,
        run.state.global_step,
        run.state.epoch,
        run.state.step_in_epoch,
    )


def write_run_info(run: Run, n_train: int, steps_per_epoch: int) -> None:
    if not run.acc.is_main_process:
        return
    import os

    import accelerate
    import transformers

    info = {
        "world_size": run.layout.world,
        "per_device_batch_size": run.layout.per_device,
        "grad_accum_steps": run.layout.accum,
        "effective_batch_size": run.layout.effective,
        "precision": run.cfg.precision,
        "device": dist.device_name(run.acc),
        "distributed_type": str(run.acc.distributed_type),
        "deepspeed": backend.describe(run.acc),  # the filled DeepSpeed config (None without DeepSpeed)
        "init_from": getattr(run.acc.unwrap_model(run.model), "init_source", None),  # train/warm_start.py
        "train_rows": n_train,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": run.total_steps,
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
    write_atomic(run.out / "run_info.json", json.dumps(info, indent=1))


# ----------------------------------------------------------------------------------------------------------
# training


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    logits = logits.float()  # the loss in fp32 whatever the autocast dtype
    if regression:
        return (logits.squeeze(-1) - labels) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def forward(run: Run, batch: dict) -> torch.Tensor:
    """The model on exactly the fields its tokenizer and ``forward`` agree on (``run.inputs``)."""
    return run.model(**{k: batch[k] for k in run.inputs.model_keys}).logits


def train(run: Run) -> dict | None:
    """Train to the end (returns eval_results) or until a stop signal (returns None after checkpointing)."""
    cfg, st = run.cfg, run.state
    from tqdm.auto import tqdm

    run.bar = tqdm(
        total=run.total_steps,
        initial=st.global_step,
        desc=f"train {run.task.name}",
        unit="step",
        disable=not run.acc.is_main_process,
        mininterval=2.0,
        dynamic_ncols=True,
    )
    for epoch in range(st.epoch, cfg.train.epochs):
        if st.global_step >= run.total_steps or st.early_stopped:
            break
        st.epoch = epoch
        train_one_epoch(run)
        if run.stopping:
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
                norm = backend.grad_norm(acc, run.model, cfg.train.max_grad_norm)
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
        run.bar.update()
        win.step(norm, n_real, lr)
        if st.global_step % cfg.train.log_every == 0 or st.global_step == run.total_steps:
            log_train(run, win)
            win = Window(acc.device)
        if cfg.eval.every_steps and st.global_step % cfg.eval.every_steps == 0:
            evaluate_and_track(run)  # before the checkpoint of the same step, so that it holds this eval
            run.model.train()
        if cfg.checkpoint.every_steps and st.global_step % cfg.checkpoint.every_steps == 0:
            save_checkpoint(run)
        run.stopping = should_stop(run)  # voted every step, so all ranks stop after the same one
        if st.global_step >= run.total_steps or run.stopping or st.early_stopped:
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
    run.bar.set_postfix(loss=f"{row['train/loss']:.4f}", lr=f"{row['train/lr']:.3g}", refresh=False)
    run.guard.check(f"at the log of step {row['step']}")
    if acc.is_main_process:
        log.info(
            "step %d/%d loss %.4f lr %.3g", row["step"], run.total_steps, row["train/loss"], row["train/lr"]
        )


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
    if run.acc.is_main_process:
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
    parts: dict[str, list] = {"pred": [], "label": [], "loss": [], "idx": []}
    for batch in loader:
        logits = run.fast.eval_logits(batch)
        labels = batch["labels"]
        losses = per_sample_loss(
            logits, labels.clamp(min=0) if not run.task.is_regression else labels, run.task.is_regression
        )
        pred = logits.float().squeeze(-1) if run.task.is_regression else logits.argmax(-1)
        got = run.acc.gather_for_metrics((pred, labels, losses, batch["idx"]))
        for key, value in zip(parts, got, strict=True):
            parts[key].append(value)  # kept on the device: one host read per split, not one per batch
    return {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}


def evaluate(run: Run) -> dict[str, dict[str, float]]:
    results = {}
    for split, loader in run.eval_loaders.items():
        p = predict(run, loader)
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
        log.info("eval at step %d: %s", st.global_step, json.dumps(results))
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
            write_submission(folder / split.submission, run.task, p["idx"], p["pred"])


def write_submission(path: Path, task: Task, idx: np.ndarray, pred: np.ndarray) -> None:
    """``index\\tprediction`` rows in the GLUE server's label format."""
    order = np.argsort(idx, kind="stable")
    names = task.submission_labels or task.labels
    lines = ["index\tprediction"]
    for i in order:
        value = f"{min(5.0, max(0.0, float(pred[i]))):.3f}" if task.is_regression else names[int(pred[i])]
        lines.append(f"{int(idx[i])}\t{value}")
    write_atomic(path, "\n".join(lines) + "\n")


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
    if st.early_stopped:
        run.metrics.summary({f"early_stopped/{k}": v for k, v in st.early_stopped.items()})
    if run.acc.is_main_process:
        write_atomic(run.out / "eval_results.json", json.dumps(results, indent=1))  # the "finished" marker
    run.metrics.close()
    run.acc.wait_for_everyone()
    run.acc.end_training()
    return results
