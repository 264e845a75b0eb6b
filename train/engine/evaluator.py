"""Evaluation: when to evaluate, the dev splits' metrics, the best evaluation so far, and early stopping.

``should_eval(step)`` decides by ``eval.every_steps``, ``eval.every_epoch`` and the last step; early stopping
by ``train.early_stopping_patience``. Every rank evaluates the same gathered predictions, so every rank
decides the same at the same step. A stop signal is voted on every :data:`VOTE_EVERY` batches: an evaluation
(with the test predictions of a new best) is recorded whole or not at all, and one a stop abandoned is redone
first after the resume, from the same random state (so the resumed run equals the uninterrupted one).
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
from train.engine.preempt import StopFlag
from train.engine.state import EarlyStop, EvalRecord, TrainState
from train.errors import StopRequested
from train.tasks import Split, Task

if TYPE_CHECKING:
    from accelerate import Accelerator

    from train.engine.nonfinite import Guard
    from train.tracking.tracker import Tracker

log = logging.getLogger(__name__)
# Batches between two stop votes (a CPU all-reduce of one int): on a CPU an eval batch of a base-sized model takes
# ~1-3 s, so a stop is honoured within ~10 s; on a GPU the vote costs well under 1 % of 4 batches.
VOTE_EVERY = 4


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: its record, its ``metrics.jsonl`` row, each dev split's gathered predictions (host arrays
    ``pred``, ``label``, ``loss``, ``idx``, ``conf``), and whether it is the best so far."""

    record: EvalRecord
    row: dict[str, Any]
    predictions: dict[Split, dict[str, np.ndarray]]
    improved: bool
    tests: dict[Split, dict[str, np.ndarray]]  # a new best's test predictions ({}: not a best, or none asked)


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
        stop: StopFlag | None = None,
    ):
        self.cfg, self.task, self.acc, self.built = cfg, task, acc, built
        self.state, self.tracker, self.guard = state, tracker, guard
        self.stop = stop or StopFlag()

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
    def predict(self, loader, doing: str = "evaluating") -> dict[str, np.ndarray]:
        """Collective. Predictions, labels, losses and row ids over a whole split, gathered from every rank once.
        Every rank sees as many batches (Accelerate evens them out), so the stop votes line up."""
        regression = self.task.is_regression
        self.built.model.eval()
        parts: dict[str, list] = {"pred": [], "label": [], "loss": [], "idx": [], "conf": []}
        for i, batch in enumerate(loader):
            if i % VOTE_EVERY == VOTE_EVERY - 1:
                self.stop.check(doing)
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
        loaders = self.built.data.test_loaders.items()
        return {split: self.predict(loader, "predicting the test splits") for split, loader in loaders}

    def evaluate(self, epoch: float) -> Evaluation:
        """Collective. Evaluate every dev split at the current step (and predict the test splits if it is a new
        best): the row in ``metrics.jsonl``, one log line, the best evaluation and the early-stopping count updated
        (the model is left in eval mode). A stop agreed meanwhile raises :class:`StopRequested` with nothing
        recorded, the random state as before, and ``eval_due`` set for the checkpoint."""
        st = self.state
        self.guard.check(f"before the evaluation at step {st.global_step}")
        rng = _random_state()
        try:
            predictions = {
                split: self.predict(loader) for split, loader in self.built.data.eval_loaders.items()
            }
            results = {
                split.name: {
                    **compute_metrics(self.task, p["pred"], p["label"]),
                    "loss": float(p["loss"].mean()),
                }
                for split, p in predictions.items()
            }
            score = results[next(iter(predictions)).name][
                "score"
            ]  # the first dev split's picks the best model
            tests = self.predict_tests() if score > st.best_score else {}
        except StopRequested:
            _set_random_state(rng)  # the checkpoint holds the state the redone evaluation starts from
            st.eval_due = True
            raise
        st.eval_due = False
        record = EvalRecord(st.global_step, epoch, results)
        row: dict[str, Any] = {"step": record.step, "epoch": epoch}
        for split in predictions:
            row.update({f"eval/{k}{split.suffix}": v for k, v in results[split.name].items()})
        st.last_eval = record
        self.tracker.write(row)
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
        return Evaluation(record, row, predictions, improved, tests)

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


def _random_state() -> dict[str, Any]:
    """Every generator a run draws from (an evaluation draws a DataLoader seed or two)."""
    import random

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_random_state(state: dict[str, Any]) -> None:
    import random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
