"""``glue-train report DIR``: the GLUE table over seeds, a plot, and the GLUE server zip.

Reads every ``eval_results.json`` under DIR (any depth) and writes into DIR (or ``--out``):
``results.md`` (tables, the search over override sets, missing runs, submission check), ``results.csv`` (one row
per task entry and metric), ``results.png`` (per-entry bars with seed spread and reference marks),
``selection.json`` (per task the override set with the best median dev score, train/folders/selection.py) and
``submission.zip`` (the selected set's best seed per task). It writes only files it owns: the ones it wrote before
(recorded with their hashes in ``.glue-train-files.json``) and unedited since; any other file of those names stops
it before it writes anything (train/folders/owned.py). A report that fails leaves the folder as it was.

Numbers are percent. Per task entry and metric: mean ± sample std (ddof=1) over seeds, median, min, max, n.
The GLUE score is the official macro average over task entries: CoLA (Matthews), SST-2, MRPC (mean of F1 and
accuracy), STS-B (mean of Pearson and Spearman), QQP (mean of F1 and accuracy), MNLI-m, MNLI-mm (each an entry),
QNLI, RTE and WNLI (``--no-wnli`` leaves it out). An entry's score is the mean of its metrics, per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from train.data.metrics import METRICS
from train.errors import NothingToReport, ReportError, guarded
from train.files import write_atomic
from train.folders import owned, selection
from train.folders.runs import RunRecord, scan
from train.outputs import submission
from train.sweeps import reference
from train.tasks import TASKS, Task

_SPLIT_SUFFIX = {"validation_matched": "-m", "validation_mismatched": "-mm"}


# ----------------------------------------------------------------------------------------------------------
# what a GLUE table is made of


@dataclass(frozen=True)
class Entry:
    """One column of the GLUE table: a task's dev split and its metrics."""

    label: str  # "MNLI-m"
    task: str  # "mnli"
    split: str  # "validation_matched"
    metrics: tuple[str, ...]


def glue_entries(include_wnli: bool = True) -> list[Entry]:
    """The GLUE task entries in table order (MNLI matched and mismatched are two entries)."""
    entries = []
    for task in TASKS.values():
        if task.name == "wnli" and not include_wnli:
            continue
        for split in task.split("dev"):
            entries.append(
                Entry(task.dir + _SPLIT_SUFFIX.get(split.name, ""), task.name, split.name, task.metrics)
            )
    return entries


def primary_split(task: Task) -> str:
    """The dev split whose score picks the best model (the first one, as in the training loop)."""
    return task.split("dev")[0].name


# ----------------------------------------------------------------------------------------------------------
# statistics


@dataclass
class Stat:
    """Spread of one number over seeds (percent)."""

    values: list[float]
    seeds: list[int | None] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); NaN for fewer than two seeds."""
        return statistics.stdev(self.values) if self.n >= 2 else math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan


def entry_metrics(results: dict, entry: Entry, which: str) -> dict[str, float] | None:
    """Percent values of the entry's metrics plus ``score`` (their mean) for one run; None if absent."""
    split = (results.get(which) or {}).get("splits", {}).get(entry.split)
    if not split or any(m not in split for m in entry.metrics):
        return None
    values = {m: 100.0 * float(split[m]) for m in entry.metrics}
    values["score"] = statistics.fmean(values.values())
    return values


@dataclass
class EntrySummary:
    entry: Entry
    stats: dict[str, Stat]  # metric (and "score") -> spread over seeds
    reference: dict[str, float]

    @property
    def n(self) -> int:
        return self.stats["score"].n if "score" in self.stats else 0


@dataclass
class GroupSummary:
    group: str
    entries: list[EntrySummary]

    @property
    def missing(self) -> list[str]:
        return [e.entry.label for e in self.entries if e.n == 0]

    @property
    def glue(self) -> float | None:
        """GLUE score: mean over entries of the seed-mean entry score; None while an entry has no run."""
        if self.missing or not self.entries:
            return None
        return statistics.fmean(e.stats["score"].mean for e in self.entries)

    @property
    def glue_of_medians(self) -> float | None:
        if self.missing or not self.entries:
            return None
        return statistics.fmean(e.stats["score"].median for e in self.entries)

    @property
    def partial_average(self) -> float | None:
        present = [e.stats["score"].mean for e in self.entries if e.n]
        return statistics.fmean(present) if present else None


def reference_glue(entries: list[Entry]) -> float | None:
    scores = [reference.reference_score(e.label) for e in entries]
    return None if any(s is None for s in scores) else statistics.fmean(scores)


def summarize_entry(entry: Entry, runs: list[RunRecord], which: str) -> EntrySummary:
    stats: dict[str, Stat] = {m: Stat([]) for m in (*entry.metrics, "score")}
    for run in runs:
        if run.results is None or run.task != entry.task:
            continue
        values = entry_metrics(run.results, entry, which)
        if values is None:
            continue
        for metric, value in values.items():
            stats[metric].values.append(value)
            stats[metric].seeds.append(run.seed)
    return EntrySummary(entry, stats, reference.BERT_BASE_DEV.get(entry.label, {}))


def summarize(records: list[RunRecord], which: str = "best", include_wnli: bool = True) -> list[GroupSummary]:
    """One summary per group (model · override tag) of finished runs."""
    entries = glue_entries(include_wnli)
    groups = sorted({r.group for r in records if r.results is not None})
    out = []
    for group in groups:
        runs = [r for r in records if r.group == group]
        out.append(GroupSummary(group, [summarize_entry(e, runs, which) for e in entries]))
    return out


# ----------------------------------------------------------------------------------------------------------
# submission


def best_runs(records: list[RunRecord]) -> dict[str, RunRecord]:
    """Per task, the finished run with the highest dev score of its best model (its predictions are that model's)."""
    best: dict[str, tuple[float, RunRecord]] = {}
    for run in records:
        if run.results is None or run.task not in TASKS:
            continue
        split = (run.results.get("best") or {}).get("splits", {}).get(primary_split(TASKS[run.task]), {})
        score = split.get("score")
        if score is not None and (run.task not in best or score > best[run.task][0]):
            best[run.task] = (float(score), run)
    return {task: run for task, (_, run) in best.items()}


def chosen_runs(selected: dict[str, selection.Candidate]) -> dict[str, RunRecord]:
    """Per task, the seed of the selected override set whose best model has the highest dev score."""
    return {task: cand.best_run() for task, cand in selected.items()}


def write_submission(
    records: list[RunRecord], dest: Path, selected: dict[str, selection.Candidate] | None = None
) -> tuple[dict[str, RunRecord], submission.Validation]:
    """The zip of the selected override set's best seed per task (``selected``: default the median rule)."""
    chosen = chosen_runs(selection.select(records) if selected is None else selected)
    sources = submission.collect_predictions({t: r.folder for t, r in chosen.items()})
    return chosen, submission.build_zip(sources, dest)


# ----------------------------------------------------------------------------------------------------------
# outputs


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mean_std(stat: Stat) -> str:
    if not stat.n:
        return "–"
    return fmt(stat.mean) if stat.n < 2 else f"{fmt(stat.mean)} ± {fmt(stat.std)}"


def _per_seed(stat: Stat) -> str:
    return ", ".join(
        f"s{s}: {v:.2f}" if s is not None else f"{v:.2f}"
        for s, v in zip(stat.seeds, stat.values, strict=True)
    )


def _metric_rows(es: EntrySummary) -> list[tuple[str, Stat, float | None]]:
    """(metric, stats, reference) rows of one entry: each metric, then the score when there are several."""
    rows = [(m, es.stats[m], es.reference.get(m)) for m in es.entry.metrics]
    if len(es.entry.metrics) > 1:
        rows.append(("score", es.stats["score"], reference.reference_score(es.entry.label)))
    return rows


def group_table(gs: GroupSummary) -> list[str]:
    lines = [
        "| Task | Metric | n | mean ± std | median | min | max | BERT-base ref. | per seed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for es in gs.entries:
        if not es.n:
            continue  # listed under the table as missing
        for metric, st, ref in _metric_rows(es):
            name = METRICS[metric].short if metric != "score" else f"score (mean of {len(es.entry.metrics)})"
            lo, hi = (min(st.values), max(st.values)) if st.n else (None, None)
            lines.append(
                f"| {es.entry.label} | {name} | {st.n} | {_mean_std(st)} | {fmt(st.median)} | {fmt(lo)} "
                f"| {fmt(hi)} | {fmt(ref)} | {_per_seed(st)} |"
            )
    return lines


def glue_lines(gs: GroupSummary, include_wnli: bool) -> list[str]:
    n = len(gs.entries)
    what = f"{n} task entries, {'with' if include_wnli else 'without'} WNLI"
    ref = fmt(reference_glue([e.entry for e in gs.entries]))
    if gs.glue is None:
        return [
            f"**GLUE score ({what}): not available**: no finished run for {', '.join(gs.missing)}. "
            f"Average over the {n - len(gs.missing)} entries present: {fmt(gs.partial_average)} "
            f"(not a GLUE score). Reference: {ref}."
        ]
    return [
        f"**GLUE score ({what}): {fmt(gs.glue)}** (mean over entries of the seed means; "
        f"of the seed medians: {fmt(gs.glue_of_medians)}). Reference: {ref}."
    ]


def not_finished_lines(records: list[RunRecord]) -> list[str]:
    bad = [r for r in records if r.status != "finished"]
    if not bad:
        return ["All runs found have finished."]
    return [
        f"- `{r.name}` ({r.task or '?'}, seed {r.seed if r.seed is not None else '?'}): **{r.status}**: {r.note}"
        for r in bad
    ]


def submission_lines(chosen: dict[str, RunRecord], check: submission.Validation, zip_name: str) -> list[str]:
    lines = [
        f"`{zip_name}`: per task the predictions of the **selected override set** (best median dev score, see "
        "Search), from its seed whose best model has the highest dev score:",
        "",
    ]
    for task, run in chosen.items():
        score = run.results["best"]["splits"][primary_split(TASKS[task])]["score"]
        lines.append(
            f"- {TASKS[task].dir}: `{run.name}` (set `{run.group}`, seed {run.seed}, dev score {100 * score:.2f})"
        )
    lines += [
        "",
        "Validation (header, row counts of the official test sets, label strings): "
        + ("**ok**" if check.ok else "**problems**:"),
    ]
    lines += [f"- {p}" for p in check.lines()]
    return lines


def _overrides_text(overrides: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "–"


def search_lines(cands: dict[str, list[selection.Candidate]], which: str) -> list[str]:
    """The full grid: every override set of every task with its median ± std over seeds; the selected marked."""
    if not cands:
        return ["No finished runs."]
    lines = [
        "Per task the override set with the best **median** dev score over its seeds is selected (ties: the "
        "higher mean, then the smaller std); the dev score of a run is its task score on the primary dev split "
        f"(MNLI: matched) at its {which} evaluation. The selection is written to `selection.json`; the GLUE "
        "score of the selected sets and the submission use it. Median, not mean: one lucky or diverged seed "
        "moves the mean of a small task by points, the median of 3-5 seeds is robust to it.",
        "",
        "| Task | set | overrides | n | median | mean ± std | per seed | |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for task, sets in cands.items():
        for i, cand in enumerate(sets):
            st = Stat([100 * x for x in cand.scores], cand.seeds)
            mark = "**selected**" if i == 0 else ""
            lines.append(
                f"| {TASKS[task].dir} | {cand.group} | {_overrides_text(selection.set_overrides(cand, sets))} "
                f"| {st.n} | {fmt(st.median)} | {_mean_std(st)} | {_per_seed(st)} | {mark} |"
            )
    if all(len(sets) == 1 for sets in cands.values()):
        lines += ["", "One override set per task: nothing to choose between."]
    return lines


def selected_summary(
    selected: dict[str, selection.Candidate], which: str, include_wnli: bool
) -> GroupSummary:
    """The GLUE table of the selected override set of every task."""
    runs = [r for cand in selected.values() for r in cand.runs]
    return GroupSummary(
        "selected sets", [summarize_entry(e, runs, which) for e in glue_entries(include_wnli)]
    )


def selected_lines(gs: GroupSummary, include_wnli: bool) -> list[str]:
    return [
        "Each task's selected override set (see Search); the GLUE score below is the one of the search.",
        "",
        *group_table(gs),
        "",
        *glue_lines(gs, include_wnli),
    ]


def write_markdown(
    path: Path,
    root: Path,
    groups: list[GroupSummary],
    records: list[RunRecord],
    which: str,
    include_wnli: bool,
    sub: list[str],
    search: list[str] | None = None,
    selected: list[str] | None = None,
) -> None:
    lines = [
        f"# GLUE dev results: `{root}`",
        "",
        f"Checkpoint: **{which}** ({'the best dev evaluation of each run' if which == 'best' else 'end of training'}"
        "). Values are percent; mean ± std over seeds uses the sample standard deviation (ddof=1); n = finished "
        "runs. An entry's score is the mean of its metrics (MRPC, QQP: F1 and accuracy; STS-B: Pearson and "
        "Spearman); the GLUE score is the mean of the entries' scores, MNLI-m and MNLI-mm counting separately.",
        f"Reference: {reference.REFERENCE_NAME}, {reference.REFERENCE_URL}.",
    ]
    for gs in groups:
        lines += ["", f"## {gs.group}", "", *group_table(gs), "", *glue_lines(gs, include_wnli)]
    if not groups:
        lines += ["", "**No finished runs.**"]
    if search:
        lines += ["", "## Search: override sets per task", "", *search]
    if selected:
        lines += ["", "## Selected override sets", "", *selected]
    lines += ["", "## Runs not finished", "", *not_finished_lines(records), "", "## Submission", "", *sub, ""]
    write_atomic(path, "\n".join(lines))


CSV_FIELDS = [
    "group",
    "entry",
    "task",
    "metric",
    "n",
    "mean",
    "std",
    "median",
    "min",
    "max",
    "reference",
    "values",
]


def _csv_number(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.4f}"


def write_csv(path: Path, groups: list[GroupSummary]) -> None:
    import io

    fh = io.StringIO(newline="")  # the whole table, then one atomic write
    w = csv.writer(fh)
    w.writerow(CSV_FIELDS)
    for gs in groups:
        for es in gs.entries:
            rows = [(m, es.stats[m], es.reference.get(m)) for m in es.entry.metrics]
            rows.append(("score", es.stats["score"], reference.reference_score(es.entry.label)))
            for metric, st, ref in rows:
                lo, hi = (min(st.values), max(st.values)) if st.n else (None, None)
                vals = ";".join(f"s{s}={v:.4f}" for s, v in zip(st.seeds, st.values, strict=True))
                w.writerow(
                    [
                        gs.group,
                        es.entry.label,
                        es.entry.task,
                        metric,
                        st.n,
                        _csv_number(st.mean),
                        _csv_number(st.std),
                        _csv_number(st.median),
                        _csv_number(lo),
                        _csv_number(hi),
                        _csv_number(ref),
                        vals,
                    ]
                )
        w.writerow(
            [
                gs.group,
                "GLUE",
                "",
                "score",
                len(gs.entries) - len(gs.missing),
                _csv_number(gs.glue),
                "",
                _csv_number(gs.glue_of_medians),
                "",
                "",
                _csv_number(reference_glue([e.entry for e in gs.entries])),
                "",
            ]
        )
    write_atomic(path, fh.getvalue())


def write_plot(path: Path, groups: list[GroupSummary], which: str, include_wnli: bool = True) -> None:
    """Per-entry bars (seed mean of the entry score), ±std error bars, seed dots and reference marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [e.label for e in glue_entries(include_wnli)]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 * len(labels)), 4.5))
    width = 0.8 / max(1, len(groups))
    for gi, gs in enumerate(groups):
        _plot_group(ax, gs, gi, width, len(groups))
    refs = [reference.reference_score(lbl) for lbl in labels]
    xs = [i for i, r in enumerate(refs) if r is not None]
    ax.scatter(
        xs,
        [refs[i] for i in xs],
        marker="_",
        s=900,
        color="black",
        linewidths=2,
        zorder=4,
        label="BERT-base ref. (HF, 1 seed)",
    )
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_ylabel("dev score (%)")
    ax.set_title(f"GLUE dev, {which} checkpoint: mean ± sample std over seeds, dots = seeds")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _plot_group(ax, gs: GroupSummary, gi: int, width: float, ngroups: int) -> None:
    offset = (gi - (ngroups - 1) / 2) * width
    glue = f"GLUE {fmt(gs.glue)}" if gs.glue is not None else "GLUE n/a"
    for i, es in enumerate(gs.entries):
        st = es.stats["score"]
        if not st.n:
            continue
        x = i + offset
        err = [[0.0], [0.0]] if st.n < 2 else [[st.std], [st.std]]
        ax.bar(
            x,
            st.mean,
            width * 0.9,
            yerr=err,
            capsize=3,
            color=f"C{gi}",
            alpha=0.7,
            label=f"{gs.group} ({glue})" if i == _first_present(gs) else None,
        )
        ax.scatter([x] * st.n, st.values, s=10, color="black", alpha=0.6, zorder=3)


def _first_present(gs: GroupSummary) -> int:
    return next((i for i, e in enumerate(gs.entries) if e.n), -1)


# ----------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class Report:
    records: list[RunRecord]
    groups: list[GroupSummary]
    validation: submission.Validation | None
    outputs: dict[str, Path]
    selection: dict[str, dict] = field(default_factory=dict)  # what selection.json holds


REPORT_FILES = {
    "md": "results.md",
    "csv": "results.csv",
    "png": "results.png",
    "selection": selection.SELECTION_FILE,
    "zip": "submission.zip",
}
NOT_OURS_HINT = (
    "Move those files out of the way (or delete them if they are old outputs you no longer need), or write the "
    "report into another folder with --out DIR"
)


def build_report(
    root: str | Path,
    out: str | Path | None = None,
    which: str = "best",
    include_wnli: bool = True,
    with_submission: bool = True,
) -> Report:
    """Scan ``root`` and write results.md/.csv/.png (and submission.zip) into ``out`` (default: ``root``).

    Only files the report owns are written (train/folders/owned.py: a file of the user's there, or one of ours
    edited since, stops the report before it writes anything), all at the end: a report that fails half-way
    leaves the folder as it was."""
    root = Path(root)
    out = Path(out) if out else root
    names = {k: v for k, v in REPORT_FILES.items() if with_submission or k != "zip"}
    with owned.writing(
        out, "report", names.values(), hint=NOT_OURS_HINT, what=f"{out} (where the report is written)"
    ) as files:
        rep = _compose(root, which, include_wnli, with_submission, files, names)
    rep.outputs = {k: out / v for k, v in names.items()}
    return rep


def _compose(
    root: Path, which: str, include_wnli: bool, with_submission: bool, files: owned.Outputs, names: dict
) -> Report:
    """The report's files, written to ``files``' temporary names (committed by the caller)."""
    records = scan(root)
    groups = summarize(records, which, include_wnli)
    cands = selection.candidates(records, which)
    selected = {task: sets[0] for task, sets in cands.items()}
    chosen_sets = None
    if any(len(sets) > 1 for sets in cands.values()):  # a search: the selected sets make the GLUE score
        best = selected_summary(selected, which, include_wnli)
        chosen_sets = selected_lines(best, include_wnli)
        groups_out = [*groups, best]
    else:
        groups_out = groups
    picked = {t: selection.selection_record(c, cands[t], root) for t, c in selected.items()}
    files.write(names["selection"], json.dumps(picked, indent=1) + "\n")
    check, sub = None, ["Not built (--no-submission)."]
    if with_submission:
        chosen, check = write_submission(records, files.path(names["zip"]), selected)
        sub = submission_lines(chosen, check, names["zip"])
    write_csv(files.path(names["csv"]), groups_out)
    write_plot(files.path(names["png"]), groups_out, which, include_wnli)
    write_markdown(
        files.path(names["md"]),
        root,
        groups,
        records,
        which,
        include_wnli,
        sub,
        search_lines(cands, which),
        chosen_sets,
    )
    return Report(records, groups, check, {}, picked)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="glue-train report",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "dir",
        help="sweep folder (every eval_results.json below it is read), or one run folder: its curves.png",
    )
    p.add_argument(
        "--which",
        choices=["best", "final"],
        default="best",
        help="which evaluation of each run: the best dev one (default) or the end of training",
    )
    p.add_argument("--no-wnli", action="store_true", help="leave WNLI out of the table and the GLUE score")
    p.add_argument("--out", help="where to write the outputs (default: DIR)")
    p.add_argument("--no-submission", action="store_true", help="do not build submission.zip")
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 unless the submission has all 11 valid files and every run finished",
    )
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from train.outputs import curves  # a single run folder -> its curves.png

    if curves.is_run_folder(args.dir):
        return curves.report_single(args.dir, args.out)
    if not Path(args.dir).is_dir():
        raise ReportError(f"{args.dir} is not a folder: give a sweep folder or a run folder")
    rep = build_report(args.dir, args.out, args.which, not args.no_wnli, not args.no_submission)
    print(rep.outputs["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in rep.outputs.values()))
    if not rep.groups:
        raise NothingToReport("no finished runs (no eval_results.json) under " + args.dir)
    unfinished = [r for r in rep.records if r.status != "finished"]
    sub_bad = rep.validation is not None and not rep.validation.ok
    return 1 if args.strict and (unfinished or sub_bad) else 0


def main(argv: list[str] | None = None) -> int:
    """``glue-train report``; errors through the CLI's one boundary."""
    return guarded(lambda: _main(argv))
