"""Each GLUE metric against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from train.data.metrics import compute_metrics
from train.tasks import TASKS


def test_accuracy():
    m = compute_metrics(TASKS["rte"], np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    assert m == {"accuracy": 0.75, "score": 0.75}


def test_f1_and_accuracy_mrpc():
    # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3, F1 2/3; accuracy 3/5 (one tn)
    pred, gold = np.array([1, 1, 1, 0, 0]), np.array([1, 1, 0, 1, 0])
    m = compute_metrics(TASKS["mrpc"], pred, gold)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(3 / 5)
    assert m["score"] == pytest.approx((2 / 3 + 3 / 5) / 2)


def test_matthews_cola():
    # tp=2, tn=1, fp=1, fn=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    pred, gold = np.array([1, 1, 1, 0, 0]), np.array([1, 1, 0, 1, 0])
    m = compute_metrics(TASKS["cola"], pred, gold)
    assert m["matthews_corr"] == pytest.approx(1 / 6) and m["score"] == pytest.approx(1 / 6)


def test_pearson_spearman_stsb():
    pred, gold = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])
    # pearson: means 2.5; cov = (2.25 - 0.25 + -0.25... ) computed explicitly below
    dx, dy = pred - 2.5, gold - 2.5
    pearson = (dx * dy).sum() / math.sqrt((dx**2).sum() * (dy**2).sum())
    # spearman on ranks 1,2,3,4 vs 1,3,2,4: 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*2/60 = 0.8
    m = compute_metrics(TASKS["stsb"], pred, gold)
    assert m["pearson"] == pytest.approx(pearson) and pearson == pytest.approx(0.8)
    assert m["spearman"] == pytest.approx(0.8)
    assert m["score"] == pytest.approx(0.8)


def test_constant_regression_prediction_scores_zero_not_nan():
    m = compute_metrics(TASKS["stsb"], np.full(4, 2.0), np.array([1.0, 3.0, 2.0, 4.0]))
    assert m["pearson"] == 0.0 and m["spearman"] == 0.0


def test_mnli_three_classes():
    m = compute_metrics(TASKS["mnli"], np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]))
    assert m["accuracy"] == 0.75


def test_every_task_metric_has_one_home():
    """A task can name only metrics train/data/metrics.py defines (and the card, report and summary name them from
    there); the summary orders the task's metrics first."""
    from train.data.metrics import METRICS, PRIMARY_ORDER

    used = {m for task in TASKS.values() for m in task.metrics}
    assert used <= set(METRICS), used - set(METRICS)
    assert used == set(METRICS)  # no metric defined that no task uses
    assert PRIMARY_ORDER[: len(METRICS)] == tuple(METRICS)
    assert all(m.hub_id and m.title and m.short for m in METRICS.values())
