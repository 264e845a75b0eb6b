"""1x16, 1x4 with accumulation 4, 2x8, 2x2 with accumulation 4: the same training, numerically.

fp32, dropout 0, >= 8 optimizer steps including a short last batch (150 rows = 9 x 16 + 6), so the exact
mean over the effective batch and the once-per-step LR schedule are both exercised.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SMOKE, load_weights, run_train

from train.tracking.tracker import read_metrics

COMMON = [
    "model.dropout=0",
    "precision=no",
    "data.max_train_samples=150",
    "train.epochs=1",
    "train.log_every=1",
    "eval.predict_test=false",
    "train.lr=2e-5",
    "train.warmup_ratio=0.2",
]
LAYOUTS = {"1x16": (1, None), "1x4acc4": (1, 4), "2x8": (2, None), "2x2acc4": (2, 2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, (nproc, per_device) in LAYOUTS.items():
        d = tmp_path_factory.mktemp(name)
        extra = [f"train.per_device_batch_size={per_device}"] if per_device else []
        run_train(["--config", str(SMOKE), f"output_dir={d}", *COMMON, *extra], nproc=nproc)
        out[name] = d
    return out


def _train_rows(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def test_layouts_derive_accumulation(runs):
    import json

    info = {name: json.loads((d / "run_info.json").read_text()) for name, d in runs.items()}
    assert [(i["world_size"], i["per_device_batch_size"], i["grad_accum_steps"]) for i in info.values()] == [
        (1, 16, 1),
        (1, 4, 4),
        (2, 8, 1),
        (2, 2, 4),
    ]


def test_same_weights_losses_and_lr(runs):
    ref_w = load_weights(runs["1x16"])
    ref_rows = _train_rows(runs["1x16"])
    assert len(ref_rows) == 10  # ceil(150 / 16) optimizer steps, the last one short
    for name, d in runs.items():
        rows = _train_rows(d)
        assert [r["step"] for r in rows] == list(range(1, 11)), name
        assert [r["train/lr"] for r in rows] == [r["train/lr"] for r in ref_rows], name
        for a, b in zip(rows, ref_rows, strict=True):
            assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5), (name, a["step"])
        w = load_weights(d)
        for key, ref in ref_w.items():
            torch.testing.assert_close(
                w[key], ref, rtol=1e-5, atol=1e-7, msg=lambda m, k=key, n=name: f"{n} {k}: {m}"
            )
        assert rel_diff(flat(w), flat(ref_w)) <= 1e-5, name


def flat(weights: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for v in weights.values()])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_training_moved_the_weights(runs, tmp_path):
    """Guards the comparison above against comparing untrained copies."""
    from transformers import AutoModelForSequenceClassification

    from train.data.glue import resolve_model

    init = AutoModelForSequenceClassification.from_pretrained(
        resolve_model("builtin:tiny-bert"), num_labels=2
    )
    trained = load_weights(runs["1x16"])
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert rel_diff(trained[key], init.state_dict()[key]) > 5e-4
