"""The training state a checkpoint carries: counters, the best and latest evaluations, early stopping.

Saved in ``trainer_state.json`` under ``train_state`` as plain JSON. The records are typed here but written in the
same shape as ever (an evaluation not yet made is ``{}``, early stopping not triggered is ``null``), so checkpoints
written before the records existed resume unchanged and new ones read the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation: the optimizer step and (fractional) epoch it ran at, and each dev split's metrics."""

    step: int
    epoch: float
    splits: dict[str, dict[str, float]]

    @classmethod
    def read(cls, saved: dict | None) -> EvalRecord | None:
        return cls(**saved) if saved else None


@dataclass(frozen=True)
class EarlyStop:
    """Why and where ``train.early_stopping_patience`` ended the run."""

    at_step: int
    epoch: float
    patience: int
    best_step: int | None

    @classmethod
    def read(cls, saved: dict | None) -> EarlyStop | None:
        return cls(**saved) if saved else None


def _plain(record: EvalRecord | EarlyStop | None, empty: Any) -> Any:
    return asdict(record) if record is not None else empty


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler/RNG that a resumed run needs."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps of ``epoch`` already done
    best_score: float = -math.inf
    best: EvalRecord | None = None  # the best evaluation so far
    last_eval: EvalRecord | None = None  # the latest evaluation
    wandb_run_id: str | None = None  # the W&B run a resume continues (train/tracking/tracker.py)
    skipped_steps: int = 0  # optimizer steps without an update (fp16 overflow, train.max_nonfinite_skips)
    train_seconds: float = 0.0  # wall time of the training steps, summed over starts (no eval, no start-up)
    samples: int = 0  # real samples trained on, summed over starts
    tokens: int = 0  # real (non-pad) tokens of them
    evals_without_improvement: int = 0  # since the best eval (train.early_stopping_patience)
    early_stopped: EarlyStop | None = None  # once patience ran out
    eval_due: bool = False  # a stop abandoned the evaluation of global_step: the resumed run makes it first

    @property
    def last_eval_step(self) -> int:
        return self.last_eval.step if self.last_eval else -1

    def to_dict(self) -> dict[str, Any]:
        """The JSON a checkpoint saves (the records as plain dicts, ``{}`` for an evaluation not made)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["best"], out["last_eval"] = _plain(self.best, {}), _plain(self.last_eval, {})
        out["early_stopped"] = _plain(self.early_stopped, None)
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        """The inverse of :meth:`to_dict`; keys a checkpoint does not hold keep their defaults."""
        values = dict(saved)
        for key in ("best", "last_eval"):
            values[key] = EvalRecord.read(values.get(key))
        values["early_stopped"] = EarlyStop.read(values.get("early_stopped"))
        return cls(**values)
