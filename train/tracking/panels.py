"""What the W&B panels beyond the scalars are made of (``Tracker`` logs them; nothing here imports wandb).

- per evaluation of a classification task and dev split: a confusion matrix (``wandb.plot.confusion_matrix``,
  key ``eval/confusion_matrix`` and, for MNLI mismatched, ``eval/confusion_matrix_mm``);
- at the end: ``best/wrong_predictions``, a ``wandb.Table`` of up to ``WRONG_LIMIT`` rows of the first dev split
  that the best model (the one in ``best/``) gets wrong, the most confident mistakes first;
- at the end, in the run summary: ``summary_numbers`` of ``eval_results.json`` (``final/*`` beside ``best/*``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from train.config import DataConfig
    from train.tasks import Split, Task

log = logging.getLogger(__name__)

WRONG_LIMIT = 500
WRONG_COLUMNS = ["idx", "text", "gold", "prediction", "confidence"]
PAIR_SEPARATOR = " || "  # between the two sentences of a pair task in the table's text column


def dev_texts(data_cfg: DataConfig, task: Task, split: Split) -> dict[int, str]:
    """Row id -> text of a dev split (pairs joined with ``PAIR_SEPARATOR``); {} when the split cannot be read."""
    from train.data.glue import read_split
    from train.errors import DataError

    try:
        rows = read_split(data_cfg, task, split)
    except DataError as e:
        log.warning("the wrong-predictions table has no texts: %s", e)
        return {}
    columns = [rows[c] for c in task.text_columns]
    return {int(i): PAIR_SEPARATOR.join(str(c[n]) for c in columns) for n, i in enumerate(rows["idx"])}


def wrong_rows(
    task: Task, texts: dict[int, str], p: dict[str, np.ndarray], limit: int = WRONG_LIMIT
) -> list[list]:
    """``WRONG_COLUMNS`` rows of the predictions ``p`` (``pred``, ``label``, ``idx``, optional ``conf``: the
    probability of the predicted class) where the prediction is not the gold label, most confident first."""
    pred, label, idx = (np.asarray(p[k]) for k in ("pred", "label", "idx"))
    conf = np.asarray(p["conf"], dtype=float) if "conf" in p else np.full(len(pred), np.nan)
    wrong = np.flatnonzero(pred != label)
    order = wrong[np.argsort(-np.nan_to_num(conf[wrong], nan=0.0), kind="stable")][:limit]
    names = task.labels
    return [
        [
            int(idx[i]),
            texts.get(int(idx[i]), ""),
            names[int(label[i])],
            names[int(pred[i])],
            None if np.isnan(conf[i]) else float(conf[i]),
        ]
        for i in order
    ]


def summary_numbers(results: dict, task: Task) -> dict[str, Any]:
    """Run-summary numbers from ``eval_results.json``: ``final/step``, ``final/epoch``, ``final/<metric><suffix>``
    and the same under ``best/`` (the names of ``metrics.jsonl``'s eval keys, MNLI mismatched with ``_mm``)."""
    out: dict[str, Any] = {}
    for which in ("final", "best"):
        result = results.get(which) or {}
        if not result:
            continue
        out[f"{which}/step"], out[f"{which}/epoch"] = result.get("step"), result.get("epoch")
        for split in task.split("dev"):
            for metric, value in (result.get("splits", {}).get(split.name) or {}).items():
                out[f"{which}/{metric}{split.suffix}"] = value
    return out
