"""GLUE metrics exactly as the benchmark defines them (scikit-learn / scipy, nothing fetched at run time).

:data:`METRICS` is the one home of a metric: how it is computed and how the model card, the report and the summary
name it. To add one: an entry here and its name in a task's ``metrics`` (``train/tasks.py``). Light at import (the
summary and report read the names): scikit-learn and scipy are imported when a metric is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from train.tasks import Task


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, pred))


def _f1(pred: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, pred))  # positive class = 1, as GLUE scores it


def _matthews(pred: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, pred))


def _pearson(pred: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return _finite(pearsonr(pred, labels)[0]) if len(labels) >= 2 else 0.0  # scipy refuses one value


def _spearman(pred: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return _finite(spearmanr(pred, labels)[0]) if len(labels) >= 2 else 0.0


@dataclass(frozen=True)
class Metric:
    compute: Callable[[np.ndarray, np.ndarray], float]  # (predictions, labels) -> value
    hub_id: str  # the model card's model-index metric type (the Hub's metric id)
    title: str  # the model card's display name
    short: str  # the report's column name
    spread: bool = False  # a correlation: no value on fewer than two rows or on labels that are all the same


METRICS: dict[str, Metric] = {
    "accuracy": Metric(_accuracy, "accuracy", "Accuracy", "accuracy"),
    "f1": Metric(_f1, "f1", "F1", "F1"),
    "matthews_corr": Metric(_matthews, "matthews_correlation", "Matthews Correlation", "Matthews corr"),
    "pearson": Metric(_pearson, "pearsonr", "Pearson", "Pearson", spread=True),
    "spearman": Metric(_spearman, "spearmanr", "Spearman", "Spearman", spread=True),
}


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of ``task`` plus ``score``, the task's GLUE number (mean of its metrics).

    ``predictions`` are class ids for classification tasks and raw scores for STS-B.
    """
    out = {name: METRICS[name].compute(predictions, labels) for name in task.metrics}
    out["score"] = float(np.mean([out[m] for m in task.metrics]))
    return out


def unscorable(task: Task, labels: Sequence[float]) -> str | None:
    """Why the task's metrics have no value on a dev split with these labels (one clause), or None: checked where
    the dev set is read, so a dev set that cannot score the run is refused before training, not after it."""
    spread = [m for m in task.metrics if METRICS[m].spread]
    if not spread:
        return None
    if len(labels) < 2:
        return f"it has {len(labels)} row, and {spread[0]} needs at least two"
    if len(set(labels)) < 2:
        return f"every one of its {len(labels)} rows has the score {labels[0]!r}, and {spread[0]} needs two different scores"
    return None


PRIMARY_ORDER = (*METRICS, "score", "loss")


def metrics_text(split: dict) -> str:
    """``accuracy 0.8123 · score 0.8123 · loss 0.4410``: a split's metrics, the task's numbers first."""
    keys = [k for k in PRIMARY_ORDER if k in split] + sorted(k for k in split if k not in PRIMARY_ORDER)
    return " · ".join(f"{k} {split[k]:.4f}" for k in keys if isinstance(split[k], (int, float)))


def _finite(x: float) -> float:
    # A constant prediction has no correlation; scipy says NaN, GLUE would score it 0.
    return 0.0 if not np.isfinite(x) else float(x)
