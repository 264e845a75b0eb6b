"""The embedded default end to end, and exact distributed evaluation."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import SMOKE, run_train
from test_outputs import assert_card_and_curves_match

from train.config import load_config
from train.tracking.tracker import read_metrics

SAMPLE_TEST_ROWS = {"sst2": 40, "rte": 24, "mrpc": 24}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = run_train(["--config", str(SMOKE), f"output_dir={out}"])
    return out, proc


def test_smoke_writes_every_output(smoke_run):
    out, proc = smoke_run
    for name in (
        "config.yaml",
        "run_info.json",
        "metrics.jsonl",
        "eval_results.json",
        "predictions/SST-2.tsv",
        "best/model.safetensors",
        "best/tokenizer.json",
        "final/model.safetensors",
        "final/config.json",
    ):
        assert (out / name).is_file(), name
    cfg = load_config(out / "config.yaml")  # the saved config is a valid config: the one asked for
    assert cfg.data.task == "sst2" and cfg.precision == "auto"
    assert json.loads((out / "run_info.json").read_text())["precision"] == "no"  # what auto meant here
    log = proc.stderr + proc.stdout
    assert "effective batch 16 = 16 per device x 1 accumulation x 1 processes" in log


NOISE = ("LOAD REPORT", "Setting accelerator to CPU", "Writing model shards", "Loading weights", "\r")


def test_the_log_says_where_and_what(smoke_run):
    """Output to a file (as under SLURM): the run folder, plain progress lines, the summary; no third-party noise."""
    out, proc = smoke_run
    log = proc.stderr
    assert not [n for n in NOISE if n in log], [n for n in NOISE if n in log]
    assert f"run folder  {out.resolve()}" in log and "start       fresh" in log
    assert "step 4/64 · epoch 0.12 · loss " in log and " samples/s · ETA " in log
    best = json.loads((out / "eval_results.json").read_text())["best"]["splits"]["validation"]["accuracy"]
    tail = log[log.index("==== run finished") :]
    assert f"best dev    accuracy {best:.4f}" in tail and f"folder      {out.resolve()}" in tail
    assert "predictions SST-2.tsv" in tail and "curves.png" in tail


def test_smoke_metrics_and_results(smoke_run):
    out, _ = smoke_run
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train_rows] == list(range(4, 65, 4))  # log_every 4, 2 epochs x 32 steps
    for r in train_rows:
        assert {"epoch", "train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s"} <= r.keys()
        assert 0 < r["train/loss"] < 5 and r["perf/samples_per_s"] > 0
    assert [r["step"] for r in eval_rows] == [32, 64]
    res = json.loads((out / "eval_results.json").read_text())
    assert res["final"]["step"] == 64 and set(res["final"]["splits"]) == {"validation"}
    assert res["final"]["splits"]["validation"]["accuracy"] == eval_rows[-1]["eval/accuracy"]
    assert res["best"]["splits"]["validation"]["score"] == max(r["eval/score"] for r in eval_rows)


def test_exported_model_loads_and_reproduces_dev_metrics(smoke_run):
    """final/ is a plain HF folder: from_pretrained + the dev set gives the logged metrics."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from train.data.glue import BUILTIN_DATA, read_tsv
    from train.data.metrics import compute_metrics
    from train.tasks import TASKS

    out, _ = smoke_run
    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    task = TASKS["sst2"]
    split = task.split("dev")[0]
    dev = read_tsv(__import__("pathlib").Path(BUILTIN_DATA["builtin:glue-sample"]) / split.tsv, task, split)
    with torch.no_grad():
        enc = tok(dev["sentence"], truncation=True, max_length=128, padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).numpy()
    got = compute_metrics(task, pred, np.array(dev["label"]))
    res = json.loads((out / "eval_results.json").read_text())
    assert got["accuracy"] == res["final"]["splits"]["validation"]["accuracy"]
    assert model.config.id2label == {0: "negative", 1: "positive"}


def check_submission(path, n_rows: int, allowed: set[str]) -> list[str]:
    lines = path.read_text().splitlines()
    assert lines[0] == "index\tprediction"
    body = [ln.split("\t") for ln in lines[1:]]
    assert len(body) == n_rows
    assert [int(i) for i, _ in body] == list(range(n_rows))
    assert {p for _, p in body} <= allowed
    return [p for _, p in body]


def test_smoke_submission_file(smoke_run):
    out, _ = smoke_run
    check_submission(out / "predictions" / "SST-2.tsv", SAMPLE_TEST_ROWS["sst2"], {"0", "1"})


@pytest.mark.parametrize(
    ("task", "fname", "labels"),
    [
        ("rte", "RTE.tsv", {"entailment", "not_entailment"}),
        ("mrpc", "MRPC.tsv", {"0", "1"}),
    ],
)
def test_pair_tasks_on_the_sample(task, fname, labels, tmp_path):
    run_train(["--config", str(SMOKE), f"output_dir={tmp_path}", f"data.task={task}", "train.epochs=1"])
    check_submission(tmp_path / "predictions" / fname, SAMPLE_TEST_ROWS[task], labels)
    res = json.loads((tmp_path / "eval_results.json").read_text())
    assert res["task"] == task and 0 <= res["final"]["splits"]["validation"]["accuracy"] <= 1
    if task == "mrpc":
        assert "f1" in res["final"]["splits"]["validation"]


def test_two_process_eval_is_exact(tmp_path):
    """91 dev rows and 40 test rows are not multiples of 2 x 16: padding duplicates must not count."""
    common = [
        "--config",
        str(SMOKE),
        "model.dropout=0",
        "train.max_steps=3",
        "data.max_eval_samples=91",
        "eval.every_epoch=false",
    ]
    run_train([*common, f"output_dir={tmp_path / 'one'}"])
    two_proc = run_train([*common, f"output_dir={tmp_path / 'two'}"], nproc=2)
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())["final"]["splits"]["validation"]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())["final"]["splits"]["validation"]
    assert one["accuracy"] == two["accuracy"]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert (tmp_path / "one/predictions/SST-2.tsv").read_text() == (
        tmp_path / "two/predictions/SST-2.tsv"
    ).read_text()
    info = json.loads((tmp_path / "two" / "run_info.json").read_text())
    assert info["world_size"] == 2
    log = two_proc.stdout + two_proc.stderr  # two processes: each message once, from rank 0
    for line in (
        "run folder  ",
        "==== run finished",
        "model inputs: ",
        "newly initialised: ",
        "eval at step 3",
    ):
        assert log.count(line) == 1, (line, log[-3000:])
    assert "[rank1]" not in log and not [n for n in NOISE if n in log]
    assert yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["data"]["max_eval_samples"] == 91


FIXTURES = SMOKE.parents[1] / "tests" / "fixtures"


@pytest.mark.parametrize(
    ("task", "files", "metrics"),
    [
        ("mnli", {"MNLI-m.tsv": 12, "MNLI-mm.tsv": 11, "AX.tsv": 15}, {"accuracy"}),
        ("stsb", {"STS-B.tsv": 1}, {"pearson", "spearman"}),
        ("cola", {"CoLA.tsv": 2}, {"matthews_corr"}),
        ("qqp", {"QQP.tsv": 6}, {"f1", "accuracy"}),
    ],
)
def test_every_task_shape_end_to_end(task, files, metrics, tmp_path):
    """Official layouts of the tasks whose real files are not bundled: metrics, splits, submission files."""
    run_train(
        [
            "--config",
            str(SMOKE),
            f"output_dir={tmp_path}",
            f"data.task={task}",
            f"data.glue_dir={FIXTURES}",
            "train.epochs=1",
        ]
    )
    res = json.loads((tmp_path / "eval_results.json").read_text())
    splits = res["final"]["splits"]
    if task == "mnli":
        assert set(splits) == {"validation_matched", "validation_mismatched"}
        eval_row = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/accuracy" in r][-1]
        assert eval_row["eval/accuracy_mm"] == splits["validation_mismatched"]["accuracy"]
    for split in splits.values():
        assert metrics | {"score", "loss"} == set(split)
    labels = {"mnli": {"entailment", "neutral", "contradiction"}, "cola": {"0", "1"}, "qqp": {"0", "1"}}
    for name, rows in files.items():
        preds = (
            check_submission(tmp_path / "predictions" / name, rows, labels.get(task) or None)
            if task != "stsb"
            else (tmp_path / "predictions" / name).read_text().splitlines()[1:]
        )
        if task == "stsb":
            assert all(0.0 <= float(p.split("\t")[1]) <= 5.0 for p in preds)
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == sorted(files)
    assert_card_and_curves_match(tmp_path)  # model cards and curves.png of every task shape
