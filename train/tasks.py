"""What each GLUE task is: its files, columns, labels, metrics and GLUE-server file names.

Label ids are those of the Hub dataset ``nyu-mll/glue`` so that both data sources agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Split:
    """One split of a task: where it lives on the Hub and in the official GLUE download."""

    name: str  # our name, also the Hub split name
    tsv: str  # path relative to data.glue_dir
    kind: str  # train | dev | test
    hub_config: str | None = None  # Hub config when it differs from the task's (AX)
    submission: str | None = None  # GLUE server file name for test splits
    suffix: str = ""  # metric-name suffix for extra dev splits (MNLI mismatched: "_mm")


@dataclass(frozen=True)
class Task:
    name: str
    dir: str  # folder in the GLUE download
    text_columns: tuple[str, ...]  # Hub column names, one or two
    tsv_columns: tuple[str, ...]  # TSV header names of the same texts
    tsv_label: str | None  # TSV header name of the label (None: headerless, see cola)
    labels: tuple[str, ...]  # label names by id; () = regression
    tsv_labels: tuple[str, ...] = ()  # how labels are written in the TSV, by id (default: the names)
    submission_labels: tuple[str, ...] = ()  # how the GLUE server wants predictions, by id
    metrics: tuple[str, ...] = ("accuracy",)
    splits: tuple[Split, ...] = field(default_factory=tuple)
    score_range: tuple[float, float] | None = None  # regression: the scores a row may carry (ends included)

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def main_metric(self) -> str:
        """The number that picks the best model: the task's GLUE score (mean of its metrics)."""
        return "score"

    def split(self, kind: str) -> list[Split]:
        return [s for s in self.splits if s.kind == kind]


def _std(dir: str, submission: str) -> tuple[Split, ...]:
    return (
        Split("train", f"{dir}/train.tsv", "train"),
        Split("validation", f"{dir}/dev.tsv", "dev"),
        Split("test", f"{dir}/test.tsv", "test", submission=submission),
    )


_NLI3 = ("entailment", "neutral", "contradiction")
_BIN = ("0", "1")

# One task per block reads better than one argument per line.
# fmt: off
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "cola", "CoLA", ("sentence",), ("sentence",), None,
            labels=("unacceptable", "acceptable"), tsv_labels=_BIN, submission_labels=_BIN,
            metrics=("matthews_corr",), splits=_std("CoLA", "CoLA.tsv"),
        ),
        Task(
            "sst2", "SST-2", ("sentence",), ("sentence",), "label",
            labels=("negative", "positive"), tsv_labels=_BIN, submission_labels=_BIN,
            splits=_std("SST-2", "SST-2.tsv"),
        ),
        Task(
            "mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
            labels=("not_equivalent", "equivalent"), tsv_labels=_BIN, submission_labels=_BIN,
            metrics=("f1", "accuracy"), splits=_std("MRPC", "MRPC.tsv"),
        ),
        Task(
            "stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score",
            labels=(), metrics=("pearson", "spearman"), splits=_std("STS-B", "STS-B.tsv"),
            score_range=(0.0, 5.0),  # similarity ratings from 0 (unrelated) to 5 (same meaning)
        ),
        Task(
            "qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
            labels=("not_duplicate", "duplicate"), tsv_labels=_BIN, submission_labels=_BIN,
            metrics=("f1", "accuracy"), splits=_std("QQP", "QQP.tsv"),
        ),
        Task(
            "mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
            labels=_NLI3,
            splits=(
                Split("train", "MNLI/train.tsv", "train"),
                Split("validation_matched", "MNLI/dev_matched.tsv", "dev"),
                Split("validation_mismatched", "MNLI/dev_mismatched.tsv", "dev", suffix="_mm"),
                Split("test_matched", "MNLI/test_matched.tsv", "test", submission="MNLI-m.tsv"),
                Split("test_mismatched", "MNLI/test_mismatched.tsv", "test", submission="MNLI-mm.tsv"),
                # The diagnostic set is scored with the MNLI model.
                Split("test_ax", "diagnostic/diagnostic.tsv", "test", hub_config="ax", submission="AX.tsv"),
            ),
        ),
        Task(
            "qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
            labels=("entailment", "not_entailment"), splits=_std("QNLI", "QNLI.tsv"),
        ),
        Task(
            "rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
            labels=("entailment", "not_entailment"), splits=_std("RTE", "RTE.tsv"),
        ),
        Task(
            # Hub ids: 0 = not_entailment, 1 = entailment, exactly as the TSV writes them.
            "wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
            labels=("not_entailment", "entailment"), tsv_labels=_BIN, submission_labels=_BIN,
            splits=_std("WNLI", "WNLI.tsv"),
        ),
    ]
}
# fmt: on


def get_task(name: str) -> Task:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GLUE task '{name}'; choose one of {', '.join(TASKS)}") from None
