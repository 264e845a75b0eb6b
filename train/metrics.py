"""GLUE metrics exactly as the benchmark defines them (scikit-learn / scipy, nothing fetched at run time)."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from train.tasks import Task


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of ``task`` plus ``score``, the task's GLUE number (mean of its metrics).

    ``predictions`` are class ids for classification tasks and raw scores for STS-B.
    """
    out: dict[str, float] = {}
    for name in task.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions))  # positive class = 1, as GLUE scores it
        elif name == "matthews_corr":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            out[name] = _finite(pearsonr(predictions, labels)[0])
        elif name == "spearman":
            out[name] = _finite(spearmanr(predictions, labels)[0])
        else:
            raise ValueError(f"unknown metric {name}")
    out["score"] = float(np.mean([out[m] for m in task.metrics]))
    return out


def _finite(x: float) -> float:
    # A constant prediction has no correlation; scipy says NaN, GLUE would score it 0.
    return 0.0 if not np.isfinite(x) else float(x)
