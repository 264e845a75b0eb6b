"""GLUE readers on the real files, the official layouts, and Hub-vs-TSV agreement."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, need_shared_glue

from train.config import DataConfig
from train.data.batches import Layout, PlanSampler, epoch_order
from train.data.glue import read_hub, read_tsv
from train.tasks import TASKS

FIXTURES = REPO / "tests" / "fixtures"

# (task, split) -> (rows, label counts by Hub id) for the real files in ../shared/glue (see its SOURCES.md)
REAL = {
    ("sst2", "train"): (67349, {0: 29780, 1: 37569}),
    ("sst2", "validation"): (872, {0: 428, 1: 444}),
    ("sst2", "test"): (1821, {-1: 1821}),
    ("mrpc", "train"): (3668, {0: 1194, 1: 2474}),
    ("mrpc", "validation"): (408, {0: 129, 1: 279}),
    ("mrpc", "test"): (1725, {-1: 1725}),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "validation"): (277, {0: 146, 1: 131}),
    ("rte", "test"): (3000, {-1: 3000}),
    ("wnli", "train"): (635, {0: 323, 1: 312}),
    ("wnli", "validation"): (71, {0: 40, 1: 31}),
    ("wnli", "test"): (146, {-1: 146}),
    ("qnli", "validation"): (5463, {0: 2702, 1: 2761}),
    ("qnli", "test"): (5463, {-1: 5463}),
    ("mnli", "test_ax"): (1104, {-1: 1104}),
}


def split_of(task: str, name: str):
    return next(s for s in TASKS[task].splits if s.name == name)


@pytest.mark.parametrize(("task", "split"), list(REAL), ids=lambda x: str(x))
def test_real_files_row_counts_and_labels(task, split):
    glue = need_shared_glue()
    s = split_of(task, split)
    data = read_tsv(glue / s.tsv, TASKS[task], s)
    rows, labels = REAL[(task, split)]
    assert len(data["idx"]) == rows
    assert dict(zip(*np.unique(data["label"], return_counts=True), strict=True)) == labels
    for col in TASKS[task].text_columns:
        assert len(data[col]) == rows and all(isinstance(t, str) and t for t in data[col])


def test_quotes_do_not_merge_rows():
    """Default csv quoting would swallow rows after an unbalanced quote; we read with quoting off."""
    glue = need_shared_glue()
    s = split_of("qnli", "validation")
    with open(glue / s.tsv, encoding="utf-8") as fh:
        quoted = list(csv.reader(fh, delimiter="\t"))
    ours = read_tsv(glue / s.tsv, TASKS["qnli"], s)
    assert len(quoted) - 1 == 5267  # the trap is real in this file: 196 rows swallowed
    assert len(ours["idx"]) == 5463
    assert ours["sentence"][694].startswith('" Luis Walter Alvarez')


def test_mrpc_bom_and_test_index():
    glue = need_shared_glue()
    assert (glue / "MRPC/train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    data = read_tsv(glue / "MRPC/test.tsv", TASKS["mrpc"], split_of("mrpc", "test"))
    assert data["idx"][:3] == [0, 1, 2] and data["label"][0] == -1
    assert data["sentence1"][0].startswith("PCCW 's chief operating officer")


def test_cola_headerless_layout():
    task = TASKS["cola"]
    train = read_tsv(FIXTURES / "CoLA/train.tsv", task, split_of("cola", "train"))
    assert train["label"] == [1, 1, 0, 0, 1]
    assert train["sentence"][3] == 'The more we study verbs, the crazier they get quoted "as if.'
    dev = read_tsv(FIXTURES / "CoLA/dev.tsv", task, split_of("cola", "validation"))
    assert dev["idx"] == [0, 1, 2] and dev["sentence"][2] == 'He said "hi.'
    test = read_tsv(FIXTURES / "CoLA/test.tsv", task, split_of("cola", "test"))
    assert test["idx"] == [0, 1] and test["label"] == [-1, -1]


def test_stsb_float_scores_and_ten_columns():
    task = TASKS["stsb"]
    train = read_tsv(FIXTURES / "STS-B/train.tsv", task, split_of("stsb", "train"))
    assert train["label"] == [5.0, 3.8, 0.25]
    assert (
        train["sentence1"][2] == 'He said "the deal is off.' and train["sentence2"][2] == 'The deal is "off.'
    )
    test = read_tsv(FIXTURES / "STS-B/test.tsv", task, split_of("stsb", "test"))
    assert test["idx"] == [0] and test["label"] == [-1]


# ---- the Hub source, from a local copy in the Hub repository's layout ----------------------------------

HUB_NAMES = {
    "rte": ["entailment", "not_entailment"],
    "mrpc": ["not_equivalent", "equivalent"],
    "sst2": ["negative", "positive"],
}  # ClassLabel names of nyu-mll/glue


def make_hub_copy(root: Path, glue: Path, tasks=("rte", "mrpc", "sst2"), rows: int = 25) -> Path:
    """Write parquet files + README configs like the nyu-mll/glue repository, from raw TSV lines.

    Built independently of train.data: the label strings are mapped through the Hub's ClassLabel names.
    """
    import datasets

    readme = ["---", "configs:"]
    tsv_label_names = {"rte": None, "mrpc": ["0", "1"], "sst2": ["0", "1"]}
    for task in tasks:
        t = TASKS[task]
        readme += [f"- config_name: {task}", "  data_files:"]
        for split, fname in (("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv")):
            lines = (glue / t.dir / fname).read_text(encoding="utf-8-sig").split("\n")
            header, body = lines[0].split("\t"), [ln.split("\t") for ln in lines[1 : rows + 1]]
            cols = {
                hub: [r[header.index(tsv)] for r in body]
                for hub, tsv in zip(t.text_columns, t.tsv_columns, strict=True)
            }
            if split == "test":
                labels = [-1] * len(body)
                idx = [int(r[header.index("index")]) for r in body]
            else:
                raw = [r[header.index(t.tsv_label)] for r in body]
                names = tsv_label_names[task] or HUB_NAMES[task]
                labels = [names.index(x) for x in raw]
                idx = list(range(len(body)))
            feats = datasets.Features(
                {
                    **{c: datasets.Value("string") for c in t.text_columns},
                    "label": datasets.ClassLabel(names=HUB_NAMES[task]),
                    "idx": datasets.Value("int32"),
                }
            )
            ds = datasets.Dataset.from_dict({**cols, "label": labels, "idx": idx}, features=feats)
            (root / task).mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(root / task / f"{split}-00000-of-00001.parquet"))
            readme += [f"  - split: {split}", f"    path: {task}/{split}-*"]
    (root / "README.md").write_text("\n".join([*readme, "---", ""]))
    return root


@pytest.mark.parametrize("task", ["rte", "mrpc", "sst2"])
def test_hub_and_tsv_sources_agree(task, tmp_path):
    glue = need_shared_glue()
    hub = make_hub_copy(tmp_path / "glue-hub", glue, tasks=(task,))
    for s in TASKS[task].splits:
        from_hub = read_hub(TASKS[task], s, str(hub))
        from_tsv = read_tsv(glue / s.tsv, TASKS[task], s)
        n = len(from_hub["idx"])
        assert n == 25
        assert {k: v[:n] for k, v in from_tsv.items()} == from_hub, (task, s.name)


def test_hub_source_is_what_training_reads(tmp_path):
    """data.glue_dir unset + data.hub_dataset: the loop reads through read_hub."""
    from train.data.glue import read_split

    glue = need_shared_glue()
    hub = make_hub_copy(tmp_path / "glue-hub-small", glue, tasks=("rte",), rows=10)
    cfg = DataConfig(task="rte", hub_dataset=str(hub))
    got = read_split(cfg, TASKS["rte"], split_of("rte", "validation"))
    assert (
        got["label"]
        == read_tsv(glue / "RTE/dev.tsv", TASKS["rte"], split_of("rte", "validation"))["label"][:10]
    )


# ---- batching ------------------------------------------------------------------------------------------


def test_plan_covers_each_row_once_and_order_ignores_world_size():
    n = 150
    for world, per_device in ((1, 16), (1, 4), (2, 8), (2, 2), (4, 1)):
        lay = Layout.derive(16, per_device, world)
        seen = []
        for rank in range(world):
            sampler = PlanSampler(n, lay, rank, seed=3)
            sampler.set_epoch(2)
            micro = list(sampler)
            assert len(micro) == 10 * lay.accum and all(len(m) == per_device for m in micro)
            seen += [i for m in micro for i, w in m if w > 0]
        assert sorted(seen) == list(range(n))
    order = epoch_order(n, 3, 2)
    lay = Layout.derive(16, 2, 2)
    s0, s1 = PlanSampler(n, lay, 0, 3), PlanSampler(n, lay, 1, 3)
    s0.set_epoch(2), s1.set_epoch(2)
    a, b = list(s0), list(s1)
    first_step = [i for m in (a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3]) for i, _ in m]
    assert first_step == list(order[:16])
    assert not np.array_equal(epoch_order(n, 3, 2), epoch_order(n, 3, 3))


def test_resume_mid_epoch_skips_consumed_batches():
    lay = Layout.derive(16, 8, 1)
    full = PlanSampler(150, lay, 0, seed=1)
    full.set_epoch(1)
    rest = PlanSampler(150, lay, 0, seed=1)
    rest.set_epoch(1, start_step=4)
    assert list(rest) == list(full)[4 * lay.accum :]


@pytest.mark.parametrize(
    ("effective", "per_device", "world", "message"),
    [
        (16, None, 3, "not divisible by the world size 3"),
        (16, 3, 1, "not divisible by train.per_device_batch_size=3"),
        (16, 32, 1, "larger than train.effective_batch_size=16"),
        (16, 4, 8, "4 x world size 8 = 32"),
    ],
)
def test_impossible_batch_split_is_a_clear_error(effective, per_device, world, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Layout.derive(effective, per_device, world)


def test_mnli_layout_three_dev_and_test_files():
    task = TASKS["mnli"]
    n = {s.name: len(read_tsv(FIXTURES / s.tsv, task, s)["idx"]) for s in task.splits}
    assert n == {
        "train": 96,
        "validation_matched": 20,
        "validation_mismatched": 18,
        "test_matched": 12,
        "test_mismatched": 11,
        "test_ax": 15,
    }
    dev = read_tsv(FIXTURES / "MNLI/dev_matched.tsv", task, split_of("mnli", "validation_matched"))
    assert dev["label"][:3] == [
        0,
        1,
        2,
    ]  # gold_label, not label1..5; Hub ids entailment/neutral/contradiction
    ax = read_tsv(FIXTURES / "diagnostic/diagnostic.tsv", task, split_of("mnli", "test_ax"))
    assert ax["premise"][0] == "The cat sat on the mat." and ax["idx"][-1] == 14


def test_qqp_layout_test_file_has_id_column():
    task = TASKS["qqp"]
    test = read_tsv(FIXTURES / "QQP/test.tsv", task, split_of("qqp", "test"))
    assert test["idx"] == list(range(6)) and test["label"] == [-1] * 6
    train = read_tsv(FIXTURES / "QQP/train.tsv", task, split_of("qqp", "train"))
    assert train["idx"] == list(range(40)) and set(train["label"]) == {0, 1}


# ---- every row against its task (train/data/glue.py: RowCheck), whatever the source --------------------


def write_split(folder: Path, task, split, rows: list[tuple[list[str], str]]) -> Path:
    """``split``'s file in the official layout, built from the task table: each row is (texts, label as written).

    Test files get an ``index`` column (the label is ignored); CoLA's train/dev files have no header."""
    path = folder / split.tsv
    path.parent.mkdir(parents=True, exist_ok=True)
    if split.kind == "test":
        lines = ["\t".join(["index", *task.tsv_columns])]
        lines += ["\t".join([str(i), *texts]) for i, (texts, _) in enumerate(rows)]
    elif task.tsv_label is None:  # CoLA: source, label, original label, sentence
        lines = ["\t".join(["src", label, "", *texts]) for texts, label in rows]
    else:
        lines = ["\t".join([*task.tsv_columns, task.tsv_label])]
        lines += ["\t".join([*texts, label]) for texts, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _texts(task, word: str = "fine") -> list[str]:
    return [f"a {word} sentence"] * len(task.text_columns)


def _read(path: Path, task, split):
    from train.errors import DataError

    try:
        return read_tsv(path, task, split)
    except DataError as e:
        return e


CLASSIFICATION = [name for name, t in TASKS.items() if not t.is_regression]
WRONG_LABELS = [
    "2",
    "-1",
    "",
    " 1",
    "1 ",
    "0.0",
    "1\x0b",  # not a line end (a "\r" before "\n" is one: the CRLF line end)
    "neutral",
    "entailment",
    "Entailment",
    "positive",
    "None",
]


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_every_label_is_checked_against_the_tasks_label_set(name, tmp_path):
    """Each spelling of the task's labels reads as its Hub id; anything else is an error naming file:line."""
    task = TASKS[name]
    split = task.split("train")[0]
    names = task.tsv_labels or task.labels
    good = write_split(tmp_path / "good", task, split, [(_texts(task), label) for label in names])
    assert read_tsv(good, task, split)["label"] == list(range(len(names)))
    for n, wrong in enumerate(label for label in WRONG_LABELS if label not in names):
        rows = [(_texts(task), names[0]), (_texts(task), wrong), (_texts(task), names[-1])]
        path = write_split(tmp_path / f"bad{n}", task, split, rows)
        err = _read(path, task, split)
        line = 2 if task.tsv_label is None else 3
        assert isinstance(err, ValueError), (name, wrong, err)
        assert f"{path}:{line}: label {wrong!r} is not one of {list(names)}" in str(err), str(err)


STSB = TASKS["stsb"]
BAD_SCORES = [
    "7.5",
    "-3",
    "5.0001",
    "-0.1",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e9",
    "1_0",
    "\u0663",
    " 3",
    "3 ",
    "",
]


@pytest.mark.parametrize("raw", BAD_SCORES)
def test_stsb_scores_must_be_finite_and_within_0_to_5(raw, tmp_path):
    split = STSB.split("dev")[0]
    path = write_split(tmp_path, STSB, split, [(_texts(STSB), "2.5"), (_texts(STSB), raw)])
    err = _read(path, STSB, split)
    assert isinstance(err, ValueError), err
    assert f"{path}:3: score " in str(err) and "from 0 to 5" in str(err), str(err)
    assert "train.lr" not in str(err)


def test_stsb_scores_as_written_in_range():
    split = STSB.split("dev")[0]
    good = ["0", "5", "5.000", "2.5", "1e0", ".5", "+3", "0.0"]
    from tempfile import TemporaryDirectory

    with TemporaryDirectory() as tmp:
        path = write_split(Path(tmp), STSB, split, [(_texts(STSB), s) for s in good])
        assert read_tsv(path, STSB, split)["label"] == [float(s) for s in good]


# Python's str.splitlines breaks lines at all of these; a GLUE row ends only at "\n" (or "\r\n").
LINE_BREAKS = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", LINE_BREAKS, ids=ascii)
@pytest.mark.parametrize("name", ["sst2", "rte", "cola"])
def test_rows_split_only_at_line_ends(name, char, tmp_path):
    task = TASKS[name]
    split = task.split("train")[0]
    names = task.tsv_labels or task.labels
    odd = [f"before{char}after"] * len(task.text_columns)
    rows = [(_texts(task), names[0]), (odd, names[1]), (_texts(task, "last"), names[0])]
    path = write_split(tmp_path, task, split, rows)
    got = read_tsv(path, task, split)
    assert got["label"] == [0, 1, 0] and got[task.text_columns[0]][1] == f"before{char}after"
    line = 2 if task.tsv_label is None else 3
    assert got.notes == [
        f"{path}: 1 row has a control or line-break character inside a field (e.g. \\r, \\x0b, \\x1c, \\u2028; "
        f"read as part of the text: rows end only at \\n) (first at line {line}). These rows are used as they are"
    ]
    crlf = tmp_path / "crlf.tsv"  # Windows line ends read the same as Unix ones
    crlf.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert dict(read_tsv(crlf, task, split)) == dict(got)


def test_odd_but_valid_rows_are_counted_in_one_note(tmp_path):
    task = TASKS["rte"]
    split = task.split("train")[0]
    rows = [
        (["", "a hypothesis"], "entailment"),
        (["a premise", "a hypothesis"], "entailment"),
        (["a premise", "   "], "not_entailment"),
        (["", ""], "entailment"),
    ]
    path = write_split(tmp_path, task, split, rows)
    path.write_text(path.read_text().replace("\na premise\ta hypothesis", "\n\na premise\ta hypothesis"))
    got = read_tsv(path, task, split)
    assert len(got["idx"]) == 4 and got["sentence1"][3] == ""
    assert got.notes == [
        f"{path}: 3 rows have an empty sentence (first at line 2); 1 blank line was skipped (first at line 3). "
        "These rows are used as they are"
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"sentence\tlabel\n", "no rows (task sst2, split train)"),
        (b"sentence\tlabel\rgood\t1\rbad\t0\r", "carriage return ('\\r') alone"),
        (b"sentence\tlabel\n\n\n", "no rows"),
    ],
)
def test_files_without_rows_name_the_file(content, message, tmp_path):
    task = TASKS["sst2"]
    path = tmp_path / "train.tsv"
    path.write_bytes(content)
    err = _read(path, task, task.split("train")[0])
    assert isinstance(err, ValueError) and str(err).startswith(str(path)) and message in str(err), err


@pytest.mark.parametrize("raw", [" 7", "7 ", "1_0", "\u0663", "-1", "7.0", "", "0x1"])
def test_test_index_is_plain_digits(raw, tmp_path):
    task = TASKS["sst2"]
    path = tmp_path / "test.tsv"
    path.write_text(f"index\tsentence\n0\tfine\n{raw}\tfine\n")
    err = _read(path, task, task.split("test")[0])
    assert isinstance(err, ValueError) and f"{path}:3: test index {raw!r} is not an integer" in str(err), err


def _hub_copy(root: Path, task, split_name: str, columns: dict, label_type) -> Path:
    """A local copy of nyu-mll/glue with one parquet split of ``task`` (the layout ``read_hub`` loads)."""
    import datasets

    feats = datasets.Features(
        {
            **{c: datasets.Value("string") for c in task.text_columns},
            "label": label_type,
            "idx": datasets.Value("int32"),
        }
    )
    (root / task.name).mkdir(parents=True)
    datasets.Dataset.from_dict(columns, features=feats).to_parquet(
        str(root / task.name / f"{split_name}-00000-of-00001.parquet")
    )
    readme = f"---\nconfigs:\n- config_name: {task.name}\n  data_files:\n  - split: {split_name}\n"
    (root / "README.md").write_text(readme + f"    path: {task.name}/{split_name}-*\n---\n")
    return root


@pytest.mark.parametrize(
    ("name", "labels", "message"),
    [
        ("rte", [0, 2], "row 1: label 2 is not a label id of task rte (0 (entailment), 1 (not_entailment))"),
        ("rte", [0, -1], "row 1: label -1 is not a label id of task rte"),
        ("stsb", [1.0, float("nan")], "row 1: score nan is not a number from 0 to 5"),
        ("stsb", [7.5, 1.0], "row 0: score 7.5 is not a number from 0 to 5"),
        ("stsb", [1.0, -3.0], "row 1: score -3.0 is not a number from 0 to 5"),
    ],
)
def test_hub_rows_are_checked_like_tsv_rows(name, labels, message, tmp_path):
    import datasets

    from train.errors import DataError

    task = TASKS[name]
    label_type = datasets.Value("float32") if task.is_regression else datasets.Value("int64")
    columns = {
        **{c: ["a sentence", "another one"] for c in task.text_columns},
        "label": labels,
        "idx": [0, 1],
    }
    hub = _hub_copy(tmp_path / "hub", task, "validation", columns, label_type)
    with pytest.raises(DataError, match="^" + str(hub).replace(".", r"\.")) as err:
        read_hub(task, split_of(name, "validation"), str(hub))
    assert message in str(err.value), str(err.value)


def test_hub_odd_rows_are_counted(tmp_path):
    import datasets

    task = TASKS["rte"]
    columns = {
        "sentence1": ["", "ok", "a\u2028b"],
        "sentence2": ["x", "y", "z"],
        "label": [0, 1, 0],
        "idx": [0, 1, 2],
    }
    hub = _hub_copy(tmp_path / "hub", task, "validation", columns, datasets.Value("int64"))
    got = read_hub(task, split_of("rte", "validation"), str(hub))
    assert got["label"] == [0, 1, 0]
    assert len(got.notes) == 1 and "1 row has an empty sentence (first at row 0)" in got.notes[0]
    assert (
        "1 row has a control or line-break character" in got.notes[0] and "(first at row 2)" in got.notes[0]
    )


def test_local_hub_copies_are_read_afresh(tmp_path):
    """datasets' own cache would serve the rows of another copy of the same name, or of this one before an edit."""
    import datasets

    task = TASKS["rte"]
    split = split_of("rte", "validation")
    got = []
    for where, labels in (("a", [0, 1]), ("b", [1, 1]), ("b", [0, 0])):
        folder = tmp_path / where / "glue"
        if folder.exists():  # the same folder edited in place
            import shutil

            shutil.rmtree(folder)
        columns = {"sentence1": ["x", "y"], "sentence2": ["z", "w"], "label": labels, "idx": [0, 1]}
        _hub_copy(folder, task, "validation", columns, datasets.Value("int64"))
        got.append(read_hub(task, split, str(folder))["label"])
    assert got == [[0, 1], [1, 1], [0, 0]]


def test_batch_split_hints_name_only_values_that_work():
    """Every impossible (effective, per-device, world) split: each value the error suggests works, and the
    per-device values it lists are all that work."""
    import re

    from train.errors import ConfigError

    checked = 0
    for effective in range(1, 33):
        for world in range(1, 10):
            for per_device in (None, *range(1, 40)):
                try:
                    Layout.derive(effective, per_device, world)
                    continue
                except ConfigError as e:
                    msg = str(e)
                checked += 1
                listed = re.search(r"per_device_batch_size to one of ([0-9, ]+)", msg)
                worlds = re.search(r"processes that divides \d+ \(([0-9, .]+)\)", msg)
                assert listed or worlds, msg
                if listed:
                    shown = [int(v) for v in listed.group(1).split(", ")]
                    works = [p for p in range(1, effective + 1) if effective % (p * world) == 0]
                    assert shown == works, msg  # all of them, and nothing else
                    unset = re.search(r"leave it unset for (\d+)", msg)
                    assert Layout.derive(effective, None, world).per_device == int(unset.group(1))
                if worlds:
                    for w in worlds.group(1).replace(", ...", "").split(", "):
                        Layout.derive(effective, None, int(w))  # raises if the hint was wrong
                    assert f"a multiple of {world}" in msg
                    Layout.derive(effective * world, None, world)
    assert checked > 1000


def test_a_header_naming_a_column_twice_or_a_folder_for_a_file(tmp_path):
    task = TASKS["sst2"]
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tsentence\tlabel\na\tb\t1\n")
    err = _read(path, task, task.split("train")[0])
    assert isinstance(err, ValueError) and f"{path}:1: the header names the column 'sentence' twice" in str(
        err
    )
    folder = tmp_path / "dev.tsv"
    folder.mkdir()
    err = _read(folder, task, task.split("dev")[0])
    assert isinstance(err, ValueError) and f"{folder} is not a file" in str(err), err
