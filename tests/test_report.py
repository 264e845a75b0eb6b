"""Report, reference numbers and submission validator on synthetic run folders with known numbers."""

from __future__ import annotations

import csv
import json
import statistics
import zipfile
from pathlib import Path

import pytest
import yaml

from train.folders import runs
from train.outputs import submission
from train.sweeps import report
from train.sweeps.reference import BERT_BASE_DEV

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Per task: split -> metric -> value per seed (seeds 1, 2, 3), as fractions like the training program writes them.
KNOWN = {
    "cola": {"validation": {"matthews_corr": [0.50, 0.60, 0.55]}},
    "sst2": {"validation": {"accuracy": [0.90, 0.92, 0.94]}},
    "mrpc": {"validation": {"f1": [0.88, 0.90, 0.86], "accuracy": [0.82, 0.84, 0.80]}},
    "stsb": {"validation": {"pearson": [0.88, 0.89, 0.90], "spearman": [0.87, 0.88, 0.89]}},
    "qqp": {"validation": {"f1": [0.87, 0.87, 0.87], "accuracy": [0.91, 0.91, 0.91]}},
    "mnli": {
        "validation_matched": {"accuracy": [0.84, 0.83, 0.85]},
        "validation_mismatched": {"accuracy": [0.85, 0.84, 0.86]},
    },
    "qnli": {"validation": {"accuracy": [0.90, 0.91, 0.92]}},
    "rte": {"validation": {"accuracy": [0.60, 0.70, 0.80]}},
    "wnli": {"validation": {"accuracy": [0.56, 0.56, 0.56]}},
}
# Expected entry scores in percent: mean, sample std (ddof=1), median.
EXPECTED = {
    "CoLA": (55.0, 5.0, 55.0),
    "SST-2": (92.0, 2.0, 92.0),
    "MRPC": (85.0, 2.0, 85.0),
    "STS-B": (88.5, 1.0, 88.5),
    "QQP": (89.0, 0.0, 89.0),
    "MNLI-m": (84.0, 1.0, 84.0),
    "MNLI-mm": (85.0, 1.0, 85.0),
    "QNLI": (91.0, 1.0, 91.0),
    "RTE": (70.0, 10.0, 70.0),
    "WNLI": (56.0, 0.0, 56.0),
}
GLUE_NO_WNLI = (55 + 92 + 85 + 88.5 + 89 + 84 + 85 + 91 + 70) / 9
GLUE_WITH_WNLI = (55 + 92 + 85 + 88.5 + 89 + 84 + 85 + 91 + 70 + 56) / 10
FINAL_DROP = 0.10  # the "final" evaluation of every run is this much below its "best" one


def _splits(task: str, seed_index: int, drop: float = 0.0) -> dict:
    out = {}
    for split, metrics in KNOWN[task].items():
        values = {m: v[seed_index] - drop for m, v in metrics.items()}
        out[split] = {**values, "score": sum(values.values()) / len(values), "loss": 0.5}
    return out


def write_run(root: Path, task: str, seed: int, model: str = "bert-base-uncased", tag: str = "") -> Path:
    folder = root / (f"{task}-s{seed}" + (f"-{tag}" if tag else ""))
    folder.mkdir(parents=True)
    i = seed - 1
    results = {
        "task": task,
        "model": model,
        "seed": seed,
        "main_metric": "score",
        "final": {"step": 100, "epoch": 3.0, "splits": _splits(task, i, FINAL_DROP)},
        "best": {"step": 60, "epoch": 2.0, "splits": _splits(task, i)},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "data": {"task": task}}))
    (folder / "eval_results.json").write_text(json.dumps(results))
    return folder


def write_predictions(folder: Path, name: str, rows: int | None = None, label: str | None = None) -> Path:
    task = submission.submission_tasks()[name]
    labels = submission.allowed_labels(task) or ("2.500",)
    n = submission.TEST_ROWS[name] if rows is None else rows
    lines = ["index\tprediction"] + [f"{i}\t{label or labels[i % len(labels)]}" for i in range(n)]
    path = folder / "predictions" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for task in KNOWN:
        for seed in (1, 2, 3):
            write_run(root, task, seed)
    return root


def _entry(group: report.GroupSummary, label: str) -> report.EntrySummary:
    return next(e for e in group.entries if e.entry.label == label)


# ----------------------------------------------------------------------------------------------------------
# statistics and the GLUE score


def test_glue_entries_follow_the_official_table():
    labels = [e.label for e in report.glue_entries()]
    assert labels == ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "WNLI"]
    assert [e.label for e in report.glue_entries(include_wnli=False)] == labels[:-1]
    mrpc = next(e for e in report.glue_entries() if e.label == "MRPC")
    assert set(mrpc.metrics) == {"f1", "accuracy"}


def test_exact_means_stds_medians_and_glue_score(sweep_dir: Path):
    records = report.scan(sweep_dir)
    assert len(records) == 27 and all(r.status == "finished" for r in records)
    (group,) = report.summarize(records, "best", include_wnli=True)
    for label, (mean, std, median) in EXPECTED.items():
        st = _entry(group, label).stats["score"]
        assert st.n == 3
        assert st.mean == pytest.approx(mean, abs=1e-9), label
        assert st.std == pytest.approx(std, abs=1e-9), label  # ddof=1: RTE 60/70/80 -> 10, not 8.16
        assert st.median == pytest.approx(median, abs=1e-9), label
    assert _entry(group, "MRPC").stats["f1"].mean == pytest.approx(88.0)
    assert _entry(group, "MRPC").stats["accuracy"].mean == pytest.approx(82.0)
    assert _entry(group, "STS-B").stats["spearman"].mean == pytest.approx(88.0)
    assert group.glue == pytest.approx(GLUE_WITH_WNLI, abs=1e-9)
    (no_wnli,) = report.summarize(records, "best", include_wnli=False)
    assert no_wnli.glue == pytest.approx(GLUE_NO_WNLI, abs=1e-9)
    assert [e.entry.label for e in no_wnli.entries][-1] == "RTE"


def test_final_checkpoint_is_selectable(sweep_dir: Path):
    (group,) = report.summarize(report.scan(sweep_dir), "final")
    assert _entry(group, "RTE").stats["score"].mean == pytest.approx(60.0, abs=1e-9)
    assert group.glue == pytest.approx(GLUE_WITH_WNLI - 100 * FINAL_DROP, abs=1e-9)


def test_single_seed_has_no_std_and_missing_task_blocks_the_glue_score(tmp_path: Path):
    write_run(tmp_path, "rte", 1)
    (group,) = report.summarize(report.scan(tmp_path))
    st = _entry(group, "RTE").stats["score"]
    assert st.n == 1 and st.mean == pytest.approx(60.0) and st.std != st.std  # NaN
    assert group.glue is None and "CoLA" in group.missing and "RTE" not in group.missing
    assert group.partial_average == pytest.approx(60.0)


def test_reference_numbers_and_reference_glue():
    assert BERT_BASE_DEV["MRPC"] == {"f1": 88.85, "accuracy": 84.07}
    entries = report.glue_entries(include_wnli=False)
    expected = (
        56.53
        + 92.32
        + (88.85 + 84.07) / 2
        + (88.64 + 88.48) / 2
        + (90.71 + 87.49) / 2
        + 83.91
        + 84.10
        + 90.66
        + 65.70
    ) / 9
    assert report.reference_glue(entries) == pytest.approx(expected)
    assert "huggingface/transformers" in report.reference.REFERENCE_URL


def test_groups_by_model_and_override_tag(tmp_path: Path):
    write_run(tmp_path, "rte", 1, tag="lr3e-5")
    write_run(tmp_path, "rte", 2, tag="lr3e-5")
    write_run(tmp_path, "rte", 3)
    write_run(tmp_path / "other", "rte", 1, model="roberta-base")
    groups = {g.group: g for g in report.summarize(report.scan(tmp_path))}
    assert set(groups) == {"bert-base-uncased", "bert-base-uncased · lr3e-5", "roberta-base"}
    assert _entry(groups["bert-base-uncased · lr3e-5"], "RTE").stats["score"].values == pytest.approx(
        [60, 70]
    )


# ----------------------------------------------------------------------------------------------------------
# files written by the report


def test_report_files_png_csv_md(sweep_dir: Path):
    rep = report.build_report(sweep_dir, with_submission=False)
    png = rep.outputs["png"].read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    from PIL import Image

    with Image.open(rep.outputs["png"]) as im:
        im.verify()
    with Image.open(rep.outputs["png"]) as im:
        assert im.size[0] > 400 and im.size[1] > 200
    rows = list(csv.DictReader(rep.outputs["csv"].open()))
    rte = next(r for r in rows if r["entry"] == "RTE" and r["metric"] == "score")
    assert (rte["n"], float(rte["mean"]), float(rte["std"]), float(rte["reference"])) == (
        "3",
        70.0,
        10.0,
        65.7,
    )
    glue = next(r for r in rows if r["entry"] == "GLUE")
    assert float(glue["mean"]) == pytest.approx(GLUE_WITH_WNLI, abs=1e-4)
    md = rep.outputs["md"].read_text()
    assert "| RTE | accuracy | 3 | 70.00 ± 10.00 | 70.00 |" in md
    assert f"**GLUE score (10 task entries, with WNLI): {GLUE_WITH_WNLI:.2f}**" in md
    assert "ddof=1" in md and "All runs found have finished." in md


def test_missing_unfinished_and_failed_runs_are_listed(sweep_dir: Path):
    (sweep_dir / "rte-s4").mkdir()
    (sweep_dir / "rte-s4" / "config.yaml").write_text(yaml.safe_dump({"seed": 4, "data": {"task": "rte"}}))
    (sweep_dir / "rte-s5").mkdir()
    (sweep_dir / "rte-s5" / "config.yaml").write_text(yaml.safe_dump({"seed": 5, "data": {"task": "rte"}}))
    manifest = {
        "runs": [
            {"name": n, "task": t, "seed": s, "tag": "", "folder": n}
            for n, t, s in [("rte-s4", "rte", 4), ("rte-s5", "rte", 5), ("cola-s9", "cola", 9)]
        ]
    }
    (sweep_dir / runs.MANIFEST).write_text(json.dumps(manifest))
    (sweep_dir / runs.STATUS).write_text(json.dumps({"rte-s5": {"rc": 1, "log": "logs/rte-s5.log"}}))
    records = {r.name: r for r in report.scan(sweep_dir)}
    assert records["rte-s4"].status == "unfinished"
    assert records["rte-s5"].status == "failed" and "logs/rte-s5.log" in records["rte-s5"].note
    assert records["cola-s9"].status == "not started"
    md = report.build_report(sweep_dir, with_submission=False).outputs["md"].read_text()
    section = md.split("## Runs not finished")[1]
    assert "`rte-s4` (rte, seed 4): **unfinished**" in section
    assert "`rte-s5` (rte, seed 5): **failed**" in section
    assert "`cola-s9` (cola, seed 9): **not started**" in section
    (group,) = report.summarize(list(records.values()))
    assert _entry(group, "RTE").stats["score"].n == 3  # unfinished runs are listed, not counted
    assert report.main([str(sweep_dir), "--strict", "--no-submission"]) == 1


def test_cli_writes_all_outputs(sweep_dir: Path, tmp_path: Path, capsys):
    assert report.main([str(sweep_dir), "--no-wnli", "--out", str(tmp_path / "out")]) == 0
    for name in ("results.md", "results.csv", "results.png", "submission.zip"):
        assert (tmp_path / "out" / name).is_file(), name
    assert "9 task entries, without WNLI" in capsys.readouterr().out
    assert report.main([str(tmp_path / "nope")]) == 2


# ----------------------------------------------------------------------------------------------------------
# submission: best seed per task, zip, validator


def test_submission_zip_from_best_seed_per_task(sweep_dir: Path):
    for task in KNOWN:
        for seed in (1, 2, 3):
            folder = sweep_dir / f"{task}-s{seed}"
            for name, t in submission.submission_tasks().items():
                if t.name == task:
                    # only the best seed's files are valid, so a wrong choice fails validation
                    best_seed = max(
                        (1, 2, 3),
                        key=lambda s, t=task: _splits(t, s - 1)[report.primary_split(report.TASKS[t])][
                            "score"
                        ],
                    )
                    write_predictions(folder, name, rows=None if seed == best_seed else 3)
    rep = report.build_report(sweep_dir)
    chosen = report.best_runs(rep.records)
    assert chosen["rte"].seed == 3 and chosen["cola"].seed == 2 and chosen["mnli"].seed == 3
    assert rep.validation is not None and rep.validation.ok, rep.validation.lines()
    with zipfile.ZipFile(rep.outputs["zip"]) as zf:
        assert sorted(zf.namelist()) == sorted(submission.TEST_ROWS)
    assert "Validation (header, row counts of the official test sets, label strings): **ok**" in (
        rep.outputs["md"].read_text()
    )


def test_submission_missing_tasks_still_writes_zip(sweep_dir: Path):
    write_predictions(sweep_dir / "rte-s3", "RTE.tsv")
    rep = report.build_report(sweep_dir)
    with zipfile.ZipFile(rep.outputs["zip"]) as zf:
        assert zf.namelist() == ["RTE.tsv"]
    assert rep.validation is not None and not rep.validation.ok
    assert "CoLA.tsv" in rep.validation.missing and "RTE.tsv" not in rep.validation.missing
    assert not any(rep.validation.problems.values())
    assert "- missing: AX.tsv" in rep.outputs["md"].read_text()
    assert submission.main(["validate", str(rep.outputs["zip"])]) == 0
    assert submission.main(["validate", str(rep.outputs["zip"]), "--strict"]) == 1


@pytest.mark.parametrize(
    ("name", "label", "expected"),
    [
        ("RTE.tsv", "entailed", "label 'entailed' is not one of ['entailment', 'not_entailment']"),
        ("QNLI.tsv", "neutral", "label 'neutral' is not one of"),
        ("MNLI-m.tsv", "1", "label '1' is not one of ['entailment', 'neutral', 'contradiction']"),
        ("AX.tsv", "not_entailment", "is not one of"),
        ("SST-2.tsv", "positive", "label 'positive' is not one of ['0', '1']"),
        ("WNLI.tsv", "2", "label '2' is not one of ['0', '1']"),
        ("STS-B.tsv", "5.5", "outside [0, 5]"),
        ("STS-B.tsv", "high", "not a number"),
    ],
)
def test_validator_catches_bad_labels(tmp_path: Path, name: str, label: str, expected: str):
    path = write_predictions(tmp_path, name)
    lines = path.read_text().split("\n")
    lines[7] = lines[7].split("\t")[0] + "\t" + label
    problems = submission.validate_lines(name, lines)
    assert any(expected in p for p in problems), problems
    assert any(p.startswith("line 8:") for p in problems)


def test_validator_catches_wrong_row_count_header_and_duplicates(tmp_path: Path):
    short = write_predictions(tmp_path, "RTE.tsv", rows=2999)
    assert submission.validate_lines("RTE.tsv", short.read_text().split("\n")) == [
        "2999 rows, the test set has 3000"
    ]
    lines = write_predictions(tmp_path, "CoLA.tsv").read_text().split("\n")
    assert submission.validate_lines("CoLA.tsv", lines) == []
    bad_header = ["id\tlabel"] + lines[1:]
    assert any("header must be" in p for p in submission.validate_lines("CoLA.tsv", bad_header))
    dup = lines[:2] + [lines[1]] + lines[3:]
    assert "1 duplicate indices" in submission.validate_lines("CoLA.tsv", dup)
    assert submission.validate_lines("Foo.tsv", lines)[0].startswith("not a GLUE submission file name")


def test_validator_on_zip_and_folder(tmp_path: Path):
    preds = tmp_path / "run"
    for name in submission.TEST_ROWS:
        write_predictions(preds, name, rows=10 if name == "QQP.tsv" else None)
    check = submission.validate_dir(preds / "predictions")
    assert check.missing == [] and list(check.problems) == ["QQP.tsv"]
    assert check.problems["QQP.tsv"] == ["10 rows, the test set has 390965"]
    assert submission.main(["validate", str(preds / "predictions")]) == 1
    write_predictions(preds, "QQP.tsv")
    sources = {p.name: p for p in (preds / "predictions").glob("*.tsv")}
    assert submission.build_zip(sources, tmp_path / "s.zip").ok
    assert submission.main(["validate", str(tmp_path / "s.zip"), "--strict"]) == 0


# ----------------------------------------------------------------------------------------------------------
# search: the override set with the best median over seeds

# task -> override set (train.lr) -> dev score per seed 1, 2, 3
GRID = {
    # B has the best median; C holds the best single run (0.90), which a best-run pick would take
    "rte": {"1e-5": [0.60, 0.70, 0.80], "2e-5": [0.50, 0.72, 0.73], "3e-5": [0.90, 0.40, 0.41]},
    # equal medians and means: the smaller std wins (A)
    "mrpc": {"1e-5": [0.80, 0.80, 0.80], "2e-5": [0.70, 0.80, 0.90]},
    # equal medians: the higher mean wins (C), whatever the std
    "sst2": {"1e-5": [0.80, 0.80, 0.80], "3e-5": [0.79, 0.80, 0.84]},
}
SELECTED = {"rte": ("2e-5", 3), "mrpc": ("1e-5", 1), "sst2": ("3e-5", 3)}  # (lr, best seed)


def write_scored(root: Path, task: str, seed: int, score: float, lr: str) -> Path:
    """A finished run whose every dev metric (and so its score) is ``score``; config.yaml holds train.lr."""
    folder = root / f"{task}-s{seed}-lr{lr}"
    folder.mkdir(parents=True)
    splits = {
        s.name: {**{m: score for m in report.TASKS[task].metrics}, "score": score, "loss": 0.5}
        for s in report.TASKS[task].split("dev")
    }
    results = {
        "task": task,
        "model": "bert-base-uncased",
        "seed": seed,
        "main_metric": "score",
        "final": {"step": 10, "epoch": 1.0, "splits": splits},
        "best": {"step": 10, "epoch": 1.0, "splits": splits},
    }
    cfg = {"seed": seed, "data": {"task": task}, "train": {"lr": float(lr), "epochs": 3}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "eval_results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def grid_dir(tmp_path: Path) -> Path:
    root = tmp_path / "search"
    runs = []
    for task, sets in GRID.items():
        for lr, scores in sets.items():
            for seed, score in enumerate(scores, start=1):
                folder = write_scored(root, task, seed, score, lr)
                runs.append(
                    {"name": folder.name, "task": task, "seed": seed, "tag": f"lr{lr}", "folder": folder.name,
                     "set": [f"train.lr={lr}"]}
                )  # fmt: skip
                name = next(n for n, t in submission.submission_tasks().items() if t.name == task)
                picked = (lr, seed) == SELECTED[task]
                # only the selected set's best seed has valid files, so a wrong choice fails validation
                write_predictions(folder, name, rows=None if picked else 5)
    (root / "sweep.json").write_text(json.dumps({"runs": runs}))
    return root


def test_selection_by_median_with_tie_rules(grid_dir: Path):
    rep = report.build_report(grid_dir)
    picked = json.loads((grid_dir / "selection.json").read_text())
    assert picked == rep.selection
    for task, (lr, best_seed) in SELECTED.items():
        sel = picked[task]
        assert sel["tag"] == f"lr{lr}" and sel["overrides"] == {"train.lr": float(lr)}, (task, sel)
        assert isinstance(sel["overrides"]["train.lr"], float)  # typed as in the config, not "2e-5"
        scores = GRID[task][lr]
        assert sel["median"] == pytest.approx(sorted(scores)[1])
        assert sel["mean"] == pytest.approx(sum(scores) / 3)
        assert sel["std"] == pytest.approx(statistics.stdev(scores))
        assert sel["seeds"] == [1, 2, 3] and sel["n"] == 3
        assert sel["runs"] == [f"{task}-s{s}-lr{lr}" for s in (1, 2, 3)]
        assert (sel["best_seed"], sel["best_run"]) == (best_seed, f"{task}-s{best_seed}-lr{lr}")
    assert picked["rte"]["median"] == pytest.approx(0.72) and picked["mrpc"]["std"] == pytest.approx(0.0)


def test_submission_uses_the_selected_sets_best_seed(grid_dir: Path):
    rep = report.build_report(grid_dir)
    with zipfile.ZipFile(rep.outputs["zip"]) as zf:
        assert sorted(zf.namelist()) == ["MRPC.tsv", "RTE.tsv", "SST-2.tsv"]
        assert zf.read("RTE.tsv") == (grid_dir / "rte-s3-lr2e-5" / "predictions" / "RTE.tsv").read_bytes()
    assert not any(rep.validation.problems.values()), rep.validation.lines()  # no 5-row file got in
    assert report.best_runs(rep.records)["rte"].name == "rte-s1-lr3e-5"  # the best single run is elsewhere
    md = rep.outputs["md"].read_text()
    assert "`rte-s3-lr2e-5` (set `bert-base-uncased · lr2e-5`, seed 3, dev score 73.00)" in md
    assert "predictions of the **selected override set**" in md


def test_results_md_lists_the_whole_grid_and_the_selected_glue(grid_dir: Path):
    md = report.build_report(grid_dir, with_submission=False).outputs["md"].read_text()
    search = md.split("## Search: override sets per task")[1].split("## Selected override sets")[0]
    rows = [ln for ln in search.splitlines() if ln.startswith("| RTE |")]
    assert len(rows) == 3  # every set of the grid, best median first
    assert rows[0].startswith(
        "| RTE | bert-base-uncased · lr2e-5 | `train.lr=2e-05` | 3 | 72.00 | 65.00 ± 13.00 |"
    )
    assert rows[0].endswith("**selected** |") and not rows[1].endswith("**selected** |")
    assert "| RTE | bert-base-uncased · lr3e-5 | `train.lr=3e-05` | 3 | 41.00 | 57.00 ± 28.58 |" in search
    assert "median" in search and "selection.json" in search
    selected = md.split("## Selected override sets")[1].split("## Runs not finished")[0]
    assert "| RTE | accuracy | 3 | 65.00 ± 13.00 | 72.00 |" in selected
    # 3 of 10 entries: no GLUE score, and the average is over the selected sets' means (65, 80, 81)
    assert "not available" in selected and "Average over the 3 entries present: 75.33" in selected
    assert "the GLUE score below is the one of the search" in selected


def test_set_keys_without_a_sweep_manifest(grid_dir: Path):
    (grid_dir / runs.MANIFEST).unlink()  # folders not made by train.sweeps.sweep: the differing config keys
    picked = report.build_report(grid_dir, with_submission=False).selection
    assert picked["rte"]["overrides"] == {"train.lr": 2e-5} and picked["rte"]["tag"] == "lr2e-5"


def test_one_set_per_task_selects_it(sweep_dir: Path):
    rep = report.build_report(sweep_dir, with_submission=False)
    assert rep.selection["rte"]["tag"] == "" and rep.selection["rte"]["overrides"] == {}
    assert rep.selection["rte"]["median"] == pytest.approx(0.70)
    md = rep.outputs["md"].read_text()
    assert "One override set per task: nothing to choose between." in md
    assert "## Selected override sets" not in md
