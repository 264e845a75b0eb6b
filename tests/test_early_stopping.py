"""train.early_stopping_patience: the run stops at the right evaluation, keeps its best model, survives a resume.

Real runs of the tiny BERT on a small STS-B-format set (sentence pairs of the bundled RTE sample, scored by their
relative length): its dev Pearson/Spearman move at every step, up and down, so "no improvement for N evaluations"
is a real event. The expected stop is computed from the same run without early stopping, so the test holds for
whatever numbers this machine's torch produces.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import SMOKE, load_weights, run_train
from test_wandb import read_wandb_file, wandb_env, wandb_files

from train.config import load_config
from train.data.glue import BUILTIN_DATA
from train.errors import ConfigError
from train.tracking.tracker import read_metrics

PATIENCE = 3
HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stsb-glue")
    (root / "STS-B").mkdir()
    sample = Path(BUILTIN_DATA["builtin:glue-sample"]) / "RTE"
    for split in ("train", "dev"):
        with open(sample / f"{split}.tsv", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
        lines = [HEADER]
        for i, r in enumerate(rows):
            a, b = r["sentence1"], r["sentence2"]
            score = 5.0 * min(len(a), len(b)) / max(len(a), len(b))
            lines.append(f"{i}\tmain\tx\t2012\t{i:04d}\tnone\tnone\t{a}\t{b}\t{score:.3f}\n")
        (root / "STS-B" / f"{split}.tsv").write_text("".join(lines))
    return root


def args(glue_dir: Path, out: Path, *extra: str) -> list[str]:
    """128 rows = 8 steps per epoch, 2 epochs, an eval after every step; constant LR."""
    return [
        "--config",
        str(SMOKE),
        "data.task=stsb",
        f"data.glue_dir={glue_dir}",
        "train.epochs=2",
        "train.lr=1e-2",
        "train.lr_scheduler=constant",
        "seed=1",
        "model.dropout=0",  # nothing random in a step: a resumed run is the same run bit for bit
        "eval.every_steps=1",
        "eval.predict_test=false",
        "train.log_every=4",
        f"output_dir={out}",
        *extra,
    ]


def eval_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "eval/score" in r]


def expected_stop(scores: list[float], patience: int) -> tuple[int, int] | None:
    """(index of the eval that stops the run, index of the best eval), or None if it never stops."""
    best, since = 0, 0
    for i, score in enumerate(scores):
        if i and score > scores[best]:
            best, since = i, 0
        elif i:
            since += 1
        if since >= patience:
            return i, best
    return None


@pytest.fixture(scope="module")
def full_run(glue_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    run_train(args(glue_dir, out))
    return out


@pytest.fixture(scope="module")
def stopped_run(glue_dir, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("stopped")
    out = tmp / "out"
    extra = [
        f"train.early_stopping_patience={PATIENCE}",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=100",
    ]
    wandb = ["tracking.wandb.project=glue-test", "tracking.wandb.mode=offline"]
    proc = run_train(args(glue_dir, out, *extra, *wandb), env=wandb_env(tmp))
    return {"out": out, "tmp": tmp, "extra": extra, "log": proc.stderr + proc.stdout}


def test_stops_at_the_right_evaluation_and_keeps_the_best_model(full_run: Path, stopped_run: dict):
    full = eval_rows(full_run)
    assert [r["step"] for r in full] == list(range(1, 17))
    assert json.loads((full_run / "eval_results.json").read_text())["early_stopped"] is None  # off by default
    found = expected_stop([r["eval/score"] for r in full], PATIENCE)
    assert found is not None and found[0] < len(full) - 1, "this trajectory never stops early: nothing tested"
    stop, best = full[found[0]]["step"], full[found[1]]["step"]
    out = stopped_run["out"]
    rows = eval_rows(out)
    assert rows == full[: found[0] + 1]  # the same run up to the stop, then nothing
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == stop
    res = json.loads((out / "eval_results.json").read_text())
    assert res["early_stopped"] == {
        "at_step": stop,
        "epoch": rows[-1]["epoch"],
        "patience": PATIENCE,
        "best_step": best,
    }
    assert res["final"]["step"] == stop and res["best"]["step"] == best
    assert res["best"]["splits"]["validation"]["score"] == full[found[1]]["eval/score"]
    assert f"early stopping at step {stop}: {PATIENCE} evaluations without improvement" in stopped_run["log"]
    # best/ holds the weights of the best step (its checkpoint), not those of the stop (final/)
    best_w, at_best = load_weights(out, "best"), load_weights(out / "checkpoints" / f"step-{best:08d}", ".")
    assert all((best_w[k] == at_best[k]).all() for k in best_w), "best/ is not the model of the best eval"
    final_w = load_weights(out, "final")
    assert any(not (best_w[k] == final_w[k]).all() for k in best_w)
    (wb,) = [read_wandb_file(p) for p in wandb_files(stopped_run["tmp"])]
    assert wb.summary["early_stopped/at_step"] == stop and wb.summary["early_stopped/best_step"] == best
    assert wb.summary["early_stopped/patience"] == PATIENCE


def test_patience_counter_survives_a_resume(glue_dir: Path, stopped_run: dict, tmp_path: Path):
    """Resume from the checkpoint one step before the stop (PATIENCE - 1 evals without improvement counted):
    the run must stop at the very next eval, as the uninterrupted one did (a reset counter would go on)."""
    done = json.loads((stopped_run["out"] / "eval_results.json").read_text())
    stop = done["early_stopped"]["at_step"]
    out = tmp_path / "out"
    shutil.copytree(stopped_run["out"], out, ignore=shutil.ignore_patterns("wandb*"))
    for path in [out / "eval_results.json", out / "final"] + [
        p for p in (out / "checkpoints").glob("step-*") if int(p.name.split("-")[1]) >= stop
    ]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    saved = (out / "config.yaml").read_text()  # the copy is the same run in another folder
    (out / "config.yaml").write_text(saved.replace(str(stopped_run["out"]), str(out)))
    proc = run_train(args(glue_dir, out, *stopped_run["extra"]))
    assert f"resumed from {out / 'checkpoints' / f'step-{stop - 1:08d}'}" in proc.stderr + proc.stdout
    again = json.loads((out / "eval_results.json").read_text())
    assert again["early_stopped"] == done["early_stopped"] and again["best"] == done["best"]
    assert eval_rows(out) == eval_rows(stopped_run["out"])


def test_patience_must_be_positive():
    with pytest.raises(ConfigError, match="train.early_stopping_patience must be at least 1"):
        load_config(SMOKE, ["train.early_stopping_patience=0"])
