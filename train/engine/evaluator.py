"""Evaluation: when to evaluate, the dev splits' metrics, the best evaluation so far, and early stopping.

``should_eval(step)`` decides by ``eval.every_steps``, ``eval.every_epoch`` and the last step; early stopping
by ``train.early_stopping_patience``. Every rank evaluates the same gathered predictions, so every rank
decides the same at the same step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from train.config import Config
from train.data.metrics import compute_metrics, metrics_text
from train.engine.build import Built, per_sample_loss
from train.engine.state import EarlyStop, EvalRecord, TrainState
from train.tasks import Split, Task

if TYPE_CHECKING:
    from accelerate import Accelerator

    from train.engine.nonfinite import Guard
    from train.tracking.tracker import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: its record, its ``metrics.jsonl`` row, each dev split's gathered predictions (host arrays
    ``pred``, ``label``, ``loss``, ``idx``, ``conf``), and whether it is the best so far."""

    record: EvalRecord
    row: dict[str, Any]
    predictions: dict[Split, dict[str, np.ndarray]]
    improved: bool


class Evaluator:
    def __init__(
        self,
        cfg: Config,
        task: Task,
        acc: Accelerator,
        built: Built,
        state: TrainState,
        tracker: Tracker,
        guard: Guard,
    ):
        self.cfg, self.task, self.acc, self.built = cfg, task, acc, built
        self.state, self.tracker, self.guard = state, tracker, guard

    def should_eval(self, step: int, *, epoch_end: bool = False, end: bool = False) -> bool:
        """Whether to evaluate after optimizer step ``step``: every ``eval.every_steps`` steps, at the end of an
        epoch (``eval.every_epoch``) and at the ``end`` of training; never twice at one step."""
        if self.state.last_eval_step == step:
            return False
        if end:
            return True
        if epoch_end:
            return self.cfg.eval.every_epoch
        every = self.cfg.eval.every_steps
        return bool(every) and step % every == 0

    @torch.no_grad()
    def predict(self, loader) -> dict[str, np.ndarray]:
        """Collective. Predictions, labels, losses and row ids over a whole split, gathered from every rank once."""
        regression = self.task.is_regression
        self.built.model.eval()
        parts: dict[str, list] = {"pred": [], "label": [], "loss": [], "idx": [], "conf": []}
        for batch in loader:
            logits = self.built.fast.eval_logits(batch)
            labels = batch["labels"]
            losses = per_sample_loss(logits, labels.clamp(min=0) if not regression else labels, regression)
            pred = logits.float().squeeze(-1) if regression else logits.argmax(-1)
            conf = pred if regression else logits.float().softmax(-1).amax(-1)  # p(pred), for the W&B table
            got = self.acc.gather_for_metrics((pred, labels, losses, batch["idx"], conf))
            for key, value in zip(parts, got, strict=True):
                parts[key].append(value)  # kept on the device: one host read per split, not one per batch
        return {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}

    def predict_tests(self) -> dict[Split, dict[str, np.ndarray]]:
        """Collective. The current model's predictions of every test split ({} with eval.predict_test=false)."""
        return {split: self.predict(loader) for split, loader in self.built.data.test_loaders.items()}

    def evaluate(self, epoch: float) -> Evaluation:
        """Collective. Evaluate every dev split at the current step: the row in ``metrics.jsonl``, one log line,
        the best evaluation and the early-stopping count updated (the model is left in eval mode)."""
        st = self.state
        self.guard.check(f"before the evaluation at step {st.global_step}")
        predictions = {split: self.predict(loader) for split, loader in self.built.data.eval_loaders.items()}
        results = {
            split.name: {**compute_metrics(self.task, p["pred"], p["label"]), "loss": float(p["loss"].mean())}
            for split, p in predictions.items()
        }
        record = EvalRecord(st.global_step, epoch, results)
        row: dict[str, Any] = {"step": record.step, "epoch": epoch}
        for split in predictions:
            row.update({f"eval/{k}{split.suffix}": v for k, v in results[split.name].items()})
        st.last_eval = record
        self.tracker.write(row)
        score = results[next(iter(predictions)).name]["score"]  # the first dev split's picks the best model
        if self.acc.is_main_process:
            best_step = st.best.step if st.best else None
            better = (
                " (best so far)"
                if score > st.best_score
                else f" (best: {st.best_score:.4f} at step {best_step})"
            )
            splits = "; ".join(f"{name} {metrics_text(m)}" for name, m in results.items())
            log.info("eval at step %d (epoch %.2f): %s%s", st.global_step, epoch, splits, better)
        improved = score > st.best_score
        if improved:
            st.best_score, st.best, st.evals_without_improvement = score, record, 0
        else:
            st.evals_without_improvement += 1
        self._check_early_stop(epoch)
        return Evaluation(record, row, predictions, improved)

    def _check_early_stop(self, epoch: float) -> None:
        """Stop once train.early_stopping_patience evals in a row did not beat the best one."""
        st, patience = self.state, self.cfg.train.early_stopping_patience
        if not patience or st.early_stopped or st.evals_without_improvement < patience:
            return
        best_step = st.best.step if st.best else None
        st.early_stopped = EarlyStop(st.global_step, epoch, patience, best_step)
        if self.acc.is_main_process:
            log.info(
                "early stopping at step %d: %d evaluations without improvement of the task score (best at step "
                "%s; best/ and its predictions are kept)",
                st.global_step,
                patience,
                best_step,
            )
