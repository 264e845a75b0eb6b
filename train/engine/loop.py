"""The training loop: optimizer steps, their metric windows and the stop vote, to the end of training.

Evaluation and checkpoints come from the Run's components, which decide their own cadence; the run's outputs
from the hooks. run -> setup (train/engine/setup.py) -> train -> train_one_epoch -> finish. It never names a
backend: Accelerate and the launch config decide that, and the Run's backend is asked where they differ.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import signal
import time

import torch

from train.config import Config
from train.engine.hooks import Hooks
from train.engine.preempt import StopFlag, requeue_if_slurm
from train.engine.run import Run
from train.engine.run_info import end_info, update_run_info
from train.engine.setup import setup
from train.errors import StopRequested
from train.files import write_atomic

log = logging.getLogger(__name__)
NO_HOOKS = Hooks()

__all__ = ["Run", "run", "setup", "train", "train_one_epoch"]


def run(
    cfg: Config, argv: list[str] | None = None, hooks: Hooks | None = None, stop: StopFlag | None = None
) -> int:
    """The whole program after the config is loaded; returns the exit code (errors raise, see train/cli.py).

    ``hooks``: what writes the run's outputs (train/outputs/hooks.py, given by the CLI); none by default.
    ``stop``: the signal flag the CLI installed first thing; a stop agreed before the first step raises
    :class:`~train.errors.StopRequested` (nothing to save), one after it ends in a checkpoint."""
    hooks = hooks or NO_HOOKS
    started = setup(cfg, hooks, argv, stop)
    if started is None:
        return 0  # finished before: the hooks showed its summary
    results = train(started, hooks)
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


def train(run: Run, hooks: Hooks = NO_HOOKS) -> dict | None:
    """Train to the end (returns eval_results) or until a stop signal (returns None after checkpointing)."""
    with run.bar.redirect():
        return _train(run, hooks)


def _train(run: Run, hooks: Hooks) -> dict | None:
    cfg, st = run.cfg, run.state
    steps_per_epoch = run.built.data.sampler.steps_per_epoch()
    if st.eval_due:  # a stop abandoned this step's evaluation: made now, as the uninterrupted run made it
        evaluate(run, hooks)
    for epoch in range(st.epoch, cfg.train.epochs):
        if st.global_step >= run.built.total_steps or st.early_stopped or run.stop.agreed:
            break
        st.epoch = epoch
        train_one_epoch(run, hooks)
        if run.stop.agreed:
            break
        if st.step_in_epoch == steps_per_epoch:
            st.epoch, st.step_in_epoch = epoch + 1, 0
            if run.evaluator.should_eval(st.global_step, epoch_end=True):
                evaluate(run, hooks)
    if not run.stop.agreed and run.evaluator.should_eval(st.global_step, end=True):
        evaluate(run, hooks)
    if run.stop.agreed:
        preempt(run)
        return None
    return finish(run, hooks)


def train_one_epoch(run: Run, hooks: Hooks = NO_HOOKS) -> None:
    cfg, st, acc, lay, b = run.cfg, run.state, run.acc, run.layout, run.built
    sampler = b.data.sampler
    b.model.train()
    sampler.set_epoch(st.epoch, st.step_in_epoch)
    world_scale = lay.world * lay.accum  # undoes the mean over ranks (DDP) and micro-steps (Accelerate)
    win = Window(acc.device)
    micro = 0
    for batch in b.data.train_loader:
        n_real = len(sampler.global_batch(st.step_in_epoch))
        mask = batch["attention_mask"]  # host-side counts, no device sync: real tokens of real samples
        tokens, padded = int((mask.sum(1) * (batch["weight"] > 0)).sum()), mask.numel()
        batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
        with acc.accumulate(b.model):
            losses = b.fast.train_losses(batch)  # forward + per-sample loss (one graph on the fast path)
            losses = run.guard.poison(losses, st.global_step + 1)  # NaN-injection test hook (no-op)
            weighted = (losses * batch["weight"]).sum()
            acc.backward(weighted * (world_scale / n_real))
            if acc.sync_gradients:
                # clip + global norm; a backend whose engine clips inside its step reports that norm
                norm = run.backend.grad_norm(acc, b.model, cfg.train.max_grad_norm)
                run.guard.after_backward(st.global_step + 1, norm, weighted.detach())  # device-side record
            b.optimizer.step()
            b.optimizer.zero_grad(set_to_none=b.fast.set_to_none)
        win.add(weighted.detach(), tokens, int(batch["weight"].shape[0]), padded)
        micro += 1
        if micro % lay.accum:
            continue
        lr = b.optimizer.param_groups[0]["lr"]  # the LR this step used
        if acc.optimizer_step_was_skipped or run.guard.skipped_now:
            st.skipped_steps += 1
        else:
            b.scheduler.step()
        st.global_step += 1
        st.step_in_epoch += 1
        run.bar.update(st.global_step, run.epoch)
        win.step(norm, n_real, lr)
        if st.global_step % cfg.train.log_every == 0 or st.global_step == b.total_steps:
            log_train(run, win)
            win = Window(acc.device)
        if run.evaluator.should_eval(st.global_step):
            evaluate(run, hooks)  # before the checkpoint of the same step, so that it holds this eval
        if not run.stop.agreed:  # (a stop during the evaluation: preempt saves this step)
            run.checkpointer.maybe_save(st.global_step)
            run.stop.agreed = run.stop.vote()  # voted every step, so all ranks stop after the same one
        if st.global_step >= b.total_steps or run.stop.agreed or st.early_stopped:
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
    acc, st = run.acc, run.state
    counts = torch.tensor([win.tokens, win.padded], dtype=torch.float64).to(win.loss.device)
    sums = acc.reduce(torch.cat([win.loss.double().view(1), counts]), reduction="sum")  # every rank's share
    loss_sum, tokens, padded = sums.tolist()  # the one device read of the window
    elapsed = time.perf_counter() - win.t0
    row = {
        "step": st.global_step,
        "epoch": run.epoch,
        "train/loss": float(loss_sum) / max(1, win.samples),
        "train/lr": win.lr,
        "train/grad_norm": float(win.norm) / max(1, win.steps),
        "perf/samples_per_s": win.samples / elapsed,
        **run.built.fast.metrics(),  # perf/compiled_graphs, perf/recompiles on the fast path
        "train/skipped_steps": st.skipped_steps,
    }
    row["train/epoch"] = row["epoch"]
    row.update(run.tracker.throughput(tokens, padded, elapsed))  # perf/tokens_per_s, padding, mfu, memory
    if not math.isfinite(row["train/loss"]):
        log.error("non-finite training loss at step %d", st.global_step)
    run.tracker.write(row)
    st.train_seconds += elapsed
    st.samples += win.samples
    st.tokens += int(tokens)
    run.guard.check(f"at the log of step {row['step']}")
    run.bar.logged(row["train/loss"], row["train/lr"], row["perf/samples_per_s"])


def evaluate(run: Run, hooks: Hooks) -> None:
    """Collective. An evaluation and what follows from a new best: ``best/``, then the test predictions. A stop
    agreed during it abandons it (nothing recorded) and sets ``run.stop.agreed``: the caller checkpoints."""
    step = run.state.global_step
    try:
        evaluation = run.evaluator.evaluate(run.epoch)
    except StopRequested as stopped:
        run.stop.agreed = True
        run.built.model.train()
        if run.acc.is_main_process:
            log.warning(
                "stopped while %s at step %d: abandoned, redone after the resume", stopped.where, step
            )
        return
    hooks.on_eval(run, evaluation)
    if evaluation.improved:
        run.checkpointer.export(run.built.model, run.built.tokenizer, "best")
        hooks.on_best(run, evaluation, evaluation.tests)
    run.built.model.train()


def preempt(run: Run) -> None:
    run.bar.close()
    run.checkpointer.save()
    if run.acc.is_main_process and run.stop.requeue:
        requeue_if_slurm()
    run.tracker.close(preempted=True)
    run.acc.wait_for_everyone()
    run.acc.end_training()


def finish(run: Run, hooks: Hooks = NO_HOOKS) -> dict:
    """``final/``, ``eval_results.json`` (its presence marks the run finished), then the hooks' outputs."""
    run.bar.close()
    run.guard.check("at the end of training")
    run.checkpointer.export(run.built.model, run.built.tokenizer, "final")
    saved = run.state.to_dict()  # the records as the checkpoint writes them
    results = {
        "task": run.task.name,
        "model": run.cfg.model.name_or_path,
        "seed": run.cfg.seed,
        "main_metric": run.task.main_metric,
        "final": saved["last_eval"],  # train() evaluated at the last step
        "best": saved["best"],
        "early_stopped": saved["early_stopped"],  # None: ran to train.epochs / train.max_steps
    }
    if run.acc.is_main_process:
        update_run_info(run, **end_info(run))  # train time, throughput, where W&B keeps the run
        write_atomic(run.out / "eval_results.json", json.dumps(results, indent=1))
    hooks.on_finish(run, results)
    run.tracker.close()
    run.acc.wait_for_everyone()
    run.acc.end_training()
    return results
