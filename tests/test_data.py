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
