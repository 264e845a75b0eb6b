"""GLUE rows: read a split from a local TSV folder (the official layout) or the Hub, and the embedded assets.

Both sources yield the same columns: ``idx``, the task's text columns (Hub names) and ``label`` (Hub ids;
-1 for unlabelled test rows; a float for STS-B).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from train.config import DataConfig
from train.errors import DataError
from train.tasks import Split, Task

log = logging.getLogger(__name__)
ASSETS = Path(__file__).parents[1] / "assets"
BUILTIN = {"builtin:glue-sample": ASSETS / "glue_sample", "builtin:tiny-bert": ASSETS / "tiny-bert"}


def offline_advice() -> str:
    """What to do when the Hub cannot be reached (shared by the model and the data errors)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    return (
        (
            "HF_HUB_OFFLINE=1 is set, so the Hub is not contacted and only the local HF cache is used. "
            if offline
            else "The Hub could not be reached and there is no copy in the local HF cache. "
        )
        + "Without network, give local copies: model.name_or_path=/path/to/model (a folder with config.json, "
        "the weights and the tokenizer; builtin:tiny-bert is bundled) and data.glue_dir=/path/to/glue (the "
        "official GLUE download; builtin:glue-sample is bundled); or fill the caches on a machine with "
        "network (`glue-train prepare` with the same config) and run with HF_HUB_OFFLINE=1 "
        "HF_DATASETS_OFFLINE=1"
    )


def resolve_builtin(path: str) -> str:
    """``builtin:<name>`` names a bundled asset; anything else is returned unchanged."""
    if path.startswith("builtin:"):
        if path not in BUILTIN:
            raise DataError(f"unknown bundled asset '{path}'; choose one of {', '.join(BUILTIN)}")
        return str(BUILTIN[path])
    return path


# ----------------------------------------------------------------------------------------------------------
# reading


def read_tsv(path: Path, task: Task, split: Split) -> dict[str, list]:
    """Read one official GLUE TSV file.

    Quoting is off on purpose: GLUE text contains unbalanced quotes, and csv's default quoting silently
    merges rows. Every row must have as many fields as the header.
    """
    if not path.is_file():
        raise DataError(
            f"missing GLUE file {path} (task {task.name}, split {split.name}). Put the official GLUE download "
            "under data.glue_dir, or unset data.glue_dir to use the Hub dataset"
            + ("; or set eval.predict_test=false to skip test predictions" if split.kind == "test" else "")
        )
    rows = list(csv.reader(_read_text(path).splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    headerless = task.tsv_label is None and split.kind != "test"  # CoLA train/dev
    if headerless:
        header, body, first_line = ["source", "label", "original_label", "sentence"], rows, 1
    else:
        header, body, first_line = rows[0], rows[1:], 2
    columns = [*task.tsv_columns, *([] if split.kind == "test" else [task.tsv_label or "label"])]
    id_column = "id" if split.kind == "test" and "id" in header else "index"  # QQP's test file says "id"
    if split.kind == "test":
        columns.append(id_column)
    for name in columns:
        if name not in header:
            raise DataError(f"{path}:1: expected a column '{name}' in the header, found {header}")
    pos = {name: header.index(name) for name in header}
    seen: dict[int, int] = {}  # test index -> line
    out: dict[str, list] = {"idx": [], **{c: [] for c in task.text_columns}, "label": []}
    for n, row in enumerate(body):
        line = first_line + n
        if not row:
            continue  # trailing blank line
        if len(row) != len(header):
            raise DataError(
                f"{path}:{line}: row has {len(row)} tab-separated fields, the header has {len(header)}; "
                "fix or remove the row (GLUE files are read with quoting off)"
            )
        out["idx"].append(
            _index(row[pos[id_column]], path, line, seen) if split.kind == "test" else len(out["idx"])
        )
        for hub_col, tsv_col in zip(task.text_columns, task.tsv_columns, strict=True):
            out[hub_col].append(row[pos[tsv_col]])
        out["label"].append(-1 if split.kind == "test" else _label(row[pos[columns[-1]]], task, path, line))
    return out


def _read_text(path: Path) -> str:
    """The file's text (utf-8-sig: MRPC starts with a BOM); bytes that are not UTF-8 are an error naming the line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); the official GLUE files are UTF-8, "
            "re-download the file or convert it (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _index(raw: str, path: Path, line: int, seen: dict[int, int]) -> int:
    """A test row's ``index``: an integer the server can match, once per file."""
    try:
        value = int(raw)
    except ValueError:
        raise DataError(
            f"{path}:{line}: test index '{raw}' is not an integer; fix or remove the row"
        ) from None
    if value in seen:
        raise DataError(
            f"{path}:{line}: test index {value} appears twice (first at line {seen[value]}); the GLUE server "
            "matches predictions by index, so each must be unique"
        )
    seen[value] = line
    return value


def _label(raw: str, task: Task, path: Path, line: int) -> int | float:
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{path}:{line}: score '{raw}' is not a number") from None
    names = task.tsv_labels or task.labels
    if raw not in names:
        raise DataError(f"{path}:{line}: label '{raw}' is not one of {list(names)} for task {task.name}")
    return names.index(raw)


def read_hub(task: Task, split: Split, dataset: str = "nyu-mll/glue") -> dict[str, list]:
    """The same columns from the Hub dataset ``nyu-mll/glue`` (or a local copy of its repository)."""
    import datasets

    config = split.hub_config or task.name
    hub_split = "test" if split.hub_config else split.name
    try:
        ds = datasets.load_dataset(dataset, config, split=hub_split)
    except Exception as e:  # network, auth, offline mode: all end here
        raise DataError(
            f"data.glue_dir is unset, so GLUE is read from the Hub dataset {dataset}, but {config} split "
            f"{hub_split} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}). "
            + offline_advice()
        ) from None
    return {c: list(ds[c]) for c in ("idx", *task.text_columns, "label")}


def read_split(cfg: DataConfig, task: Task, split: Split) -> dict[str, list]:
    if cfg.glue_dir is None:
        return read_hub(task, split, cfg.hub_dataset)
    return read_tsv(Path(resolve_builtin(cfg.glue_dir)) / split.tsv, task, split)
