"""The GLUE server submission: pick the best run per task, zip its test predictions, validate the files.

The server wants 11 files at the top level of one zip: ``CoLA.tsv`` ... ``WNLI.tsv``, ``MNLI-m.tsv``,
``MNLI-mm.tsv`` and ``AX.tsv`` (the diagnostic set, scored with the MNLI model). Each is ``index\\tprediction``
with one row per test example, in the label format of ``train.tasks`` (``submission_labels``, else the label
names; STS-B: a float in [0, 5]).

    glue-train submission validate runs/glue/submission.zip [--strict]
"""

from __future__ import annotations

import argparse
import math
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from train.errors import DataError, guarded
from train.tasks import TASKS, Task

HEADER = "index\tprediction"

# Rows of the official GLUE test sets (and of nyu-mll/glue's test splits).
TEST_ROWS: dict[str, int] = {
    "CoLA.tsv": 1063,
    "SST-2.tsv": 1821,
    "MRPC.tsv": 1725,
    "STS-B.tsv": 1379,
    "QQP.tsv": 390965,
    "MNLI-m.tsv": 9796,
    "MNLI-mm.tsv": 9847,
    "QNLI.tsv": 5463,
    "RTE.tsv": 3000,
    "WNLI.tsv": 146,
    "AX.tsv": 1104,
}
STSB_RANGE = (0.0, 5.0)


def write_predictions(path: Path, task: Task, idx, pred) -> None:
    """One GLUE server file: ``index\tprediction`` rows in index order, in the server's label format (STS-B: the
    score clamped to ``STSB_RANGE``). ``idx``/``pred``: numpy arrays of the test rows' indices and predictions."""
    import numpy as np

    from train.files import write_atomic

    low, high = STSB_RANGE
    names = task.submission_labels or task.labels
    lines = [HEADER]
    for i in np.argsort(idx, kind="stable"):
        value = f"{min(high, max(low, float(pred[i]))):.3f}" if task.is_regression else names[int(pred[i])]
        lines.append(f"{int(idx[i])}\t{value}")
    write_atomic(path, "\n".join(lines) + "\n")


def submission_tasks() -> dict[str, Task]:
    """GLUE server file name -> the task whose model writes it (from the task table)."""
    return {s.submission: t for t in TASKS.values() for s in t.splits if s.kind == "test" and s.submission}


def allowed_labels(task: Task) -> tuple[str, ...]:
    """Valid prediction strings; () for regression (a float in STSB_RANGE)."""
    return task.submission_labels or task.labels


@dataclass
class Validation:
    """Outcome of checking a set of submission files: problems per file and files that are absent."""

    problems: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not any(self.problems.values())

    def lines(self) -> list[str]:
        out = [f"missing: {name}" for name in self.missing]
        for name, probs in self.problems.items():
            out += [f"{name}: {p}" for p in probs]
        return out


def _check_label(value: str, task: Task) -> str | None:
    labels = allowed_labels(task)
    if labels:
        return None if value in labels else f"label {value!r} is not one of {list(labels)}"
    try:
        x = float(value)
    except ValueError:
        return f"prediction {value!r} is not a number"
    lo, hi = STSB_RANGE
    return None if math.isfinite(x) and lo <= x <= hi else f"prediction {value!r} is outside [{lo:g}, {hi:g}]"


def _check_row(line: str, task: Task) -> str | None:
    parts = line.split("\t")
    if len(parts) != 2:
        return f"expected 2 tab-separated fields, got {len(parts)}: {line!r}"
    if not parts[0].isdigit():
        return f"index {parts[0]!r} is not a non-negative integer"
    return _check_label(parts[1], task)


def validate_lines(name: str, lines: list[str], max_reported: int = 5) -> list[str]:
    """Problems with one submission file given its lines (no trailing newlines); [] = valid."""
    tasks = submission_tasks()
    if name not in tasks:
        return [f"not a GLUE submission file name (expected one of {', '.join(TEST_ROWS)})"]
    task = tasks[name]
    problems: list[str] = []
    if not lines or lines[0] != HEADER:
        problems.append(f"header must be {HEADER!r}, got {lines[0] if lines else ''!r}")
    rows = [ln for ln in lines[1:] if ln != ""]
    if len(rows) != TEST_ROWS[name]:
        problems.append(f"{len(rows)} rows, the test set has {TEST_ROWS[name]}")
    bad = [(i, msg) for i, ln in enumerate(rows, start=2) if (msg := _check_row(ln, task))]
    problems += [f"line {i}: {msg}" for i, msg in bad[:max_reported]]
    if len(bad) > max_reported:
        problems.append(f"... and {len(bad) - max_reported} more bad rows")
    indices = [ln.split("\t", 1)[0] for ln in rows]
    if len(set(indices)) != len(indices):
        problems.append(f"{len(indices) - len(set(indices))} duplicate indices")
    return problems


def validate_files(files: dict[str, str], expected: Iterable[str] = TEST_ROWS) -> Validation:
    """Check file name -> text; names in ``expected`` that are absent are listed as missing."""
    result = Validation()
    for name in expected:
        if name not in files:
            result.missing.append(name)
    for name, text in sorted(files.items()):
        result.checked.append(name)
        probs = validate_lines(name, text.split("\n"))
        if probs:
            result.problems[name] = probs
    return result


def validate_zip(path: str | Path) -> Validation:
    """Check a submission zip: all 11 files at the top level, each valid."""
    with zipfile.ZipFile(path) as zf:
        files = {Path(n).name: zf.read(n).decode("utf-8") for n in zf.namelist() if not n.endswith("/")}
        nested = [n for n in zf.namelist() if "/" in n.rstrip("/")]
    result = validate_files(files)
    for n in nested:
        result.problems.setdefault(Path(n).name, []).append(
            f"{n} is in a folder; the server wants top-level files"
        )
    return result


def validate_dir(path: str | Path) -> Validation:
    """Check a folder of prediction files (e.g. a run's ``predictions/``)."""
    return validate_files({p.name: p.read_text() for p in sorted(Path(path).glob("*.tsv"))})


def build_zip(sources: dict[str, Path], dest: str | Path) -> Validation:
    """Zip file name -> source path (top level, deflated) and validate the result; written even if invalid."""
    import io

    from train.files import write_atomic

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # a few MB at most (QQP's 391k rows): built in memory, written in one atomic step
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(sources):
            zf.write(sources[name], arcname=name)
    write_atomic(dest, buf.getvalue())
    return validate_zip(dest)


def collect_predictions(run_dirs: dict[str, Path]) -> dict[str, Path]:
    """Task name -> run folder (the chosen run per task) into submission file name -> predictions file."""
    wanted = submission_tasks()
    sources: dict[str, Path] = {}
    for name, task in wanted.items():
        run = run_dirs.get(task.name)
        if run is not None and (run / "predictions" / name).is_file():
            sources[name] = run / "predictions" / name
    return sources


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="glue-train submission", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    val = sub.add_parser("validate", help="check a submission zip or a folder of GLUE prediction files")
    val.add_argument("path", help="submission.zip or a folder of *.tsv files")
    val.add_argument(
        "--strict", action="store_true", help="exit 1 when a file is missing, not only when one is bad"
    )
    args = parser.parse_args(argv)
    path = Path(args.path)
    if not path.exists():
        raise DataError(f"{path} does not exist: give a submission zip or a folder of GLUE prediction files")
    result = validate_dir(path) if path.is_dir() else validate_zip(path)
    for line in result.lines():
        print(line)
    bad = any(result.problems.values()) or (args.strict and result.missing)
    print(
        f"{len(result.checked)} files checked; " + ("INVALID" if bad else "ok" if result.ok else "incomplete")
    )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """``glue-train submission``; errors through the CLI's one boundary."""
    return guarded(lambda: _main(argv))
