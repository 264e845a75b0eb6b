"""Only its own files (train/folders/owned.py): report, card and sweep never overwrite a file they did not write,
or one of theirs the user edited since, and a command that fails leaves no partial outputs behind.

Real commands (``glue-train report/card/sweep`` through the CLI, a real run of the program for the model cards, a
real file size limit for a write that fails half-way); every file that was there before is compared byte for
byte afterwards.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMOKE, run_train
from test_report import write_run
from test_sweep import TINY_TASK

from train.cli import main
from train.folders import owned

USERS = {"results.csv": b"my,own\n1,2\n", "results.md": b"# my notes\n"}
REPORT_FILES = ("results.md", "results.csv", "results.png", "selection.json")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def listing(folder: Path) -> list[str]:
    """Everything in the folder, hidden files and empty folders included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def error_of(capsys, code: int = 2, *texts: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in texts:
        assert text in lines[0], f"{text!r} not in: {lines[0]}"
    return lines[0]


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for task in ("rte", "mrpc"):
        for seed in (1, 2, 3):
            write_run(root, task, seed)
    return root


# ----------------------------------------------------------------------------------------------------------
# report


def test_report_never_overwrites_the_users_files(sweep_dir, capsys):
    for name, data in USERS.items():
        (sweep_dir / name).write_bytes(data)
    before, names = snapshot(sweep_dir), listing(sweep_dir)
    assert main(["report", str(sweep_dir)]) == 2
    error_of(
        capsys,
        2,
        f"would overwrite files it does not own in {sweep_dir}",
        "results.csv (not written by glue-train",
        "results.md (not written by glue-train",
        "Nothing was written",
        "--out DIR",
    )
    assert snapshot(sweep_dir) == before and listing(sweep_dir) == names  # not even a record or a lock
    assert main(["report", str(sweep_dir), "--out", str(sweep_dir / "report")]) == 0  # elsewhere: fine
    assert snapshot(sweep_dir / "report").keys() >= set(REPORT_FILES)
    assert {n: (sweep_dir / n).read_bytes() for n in USERS} == USERS


def test_report_rewrites_its_own_files_but_never_an_edited_one(sweep_dir, capsys):
    assert main(["report", str(sweep_dir)]) == 0
    write_run(sweep_dir, "sst2", 1)  # a new finished run: the next report differs
    assert main(["report", str(sweep_dir)]) == 0  # its own, unedited files: replaced
    assert "| SST-2 | accuracy | 1 |" in (sweep_dir / "results.md").read_text()
    capsys.readouterr()
    md = sweep_dir / "results.md"
    md.write_text(md.read_text() + "\nmy comment on these numbers\n")
    before = snapshot(sweep_dir)
    assert main(["report", str(sweep_dir)]) == 2
    error_of(capsys, 2, "results.md (edited since glue-train report wrote it)")
    assert snapshot(sweep_dir) == before  # results.csv and the rest not rewritten either: all or nothing
    md.rename(sweep_dir / "my-results.md")  # moved out of the way: the report writes a fresh one
    assert main(["report", str(sweep_dir)]) == 0
    assert "my comment" in (sweep_dir / "my-results.md").read_text()
    assert "my comment" not in md.read_text()


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_report_that_fails_half_way_leaves_no_partial_outputs(sweep_dir):
    """A file size limit lets the small outputs through and stops results.png (~40 KB): nothing of the failed
    report is left, in a folder that held an earlier report (byte for byte as before) or in a new one (gone)."""
    assert main(["report", str(sweep_dir), "--no-submission"]) == 0
    write_run(sweep_dir, "sst2", 1)  # the failed report would have changed every file
    before, names = snapshot(sweep_dir), listing(sweep_dir)
    new = sweep_dir / "new" / "report"
    for args in ([], ["--out", str(new)]):
        proc = subprocess.run(
            [sys.executable, "-m", "train", "report", str(sweep_dir), "--no-submission", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=_file_size_limit(20_000),
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "could not write its files into" in proc.stderr and "nothing was written there" in proc.stderr
        assert snapshot(sweep_dir) == before and listing(sweep_dir) == names  # no temporary file, no lock


# ----------------------------------------------------------------------------------------------------------
# card


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "run"
    proc = run_train(
        ["--config", str(SMOKE), f"output_dir={out}", "train.max_steps=4", "eval.predict_test=false"]
    )
    assert proc.returncode == 0
    return out


def test_card_keeps_a_card_the_user_edited(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert main(["card", str(run)]) == 0  # its own cards, unedited: rewritten (the same bytes)
    readme = run / "best" / "README.md"
    readme.write_text(
        readme.read_text().replace("## Training procedure", "## My notes\n\n## Training procedure")
    )
    before = snapshot(run)
    capsys.readouterr()
    assert main(["card", str(run)]) == 2
    error_of(capsys, 2, "best/README.md (edited since glue-train card wrote it)", "README.edited.md")
    assert snapshot(run) == before  # final/README.md not rewritten either: both cards or neither
    (run / owned.RECORD).unlink()  # cards of unknown origin (e.g. written by hand)
    assert main(["card", str(run)]) == 2
    error_of(
        capsys, 2, "best/README.md (not written by glue-train", "final/README.md (not written by glue-train"
    )
    readme.rename(run / "best" / "README.edited.md")
    (run / "final" / "README.md").unlink()
    assert main(["card", str(run)]) == 0
    assert "My notes" in (run / "best" / "README.edited.md").read_text()
    assert "My notes" not in readme.read_text()


# ----------------------------------------------------------------------------------------------------------
# sweep


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "rte.yaml").write_text(TINY_TASK.format(task="rte"))
    return folder


@pytest.mark.parametrize(
    "name, mode",
    [
        ("sweep.json", []),  # e.g. a W&B sweep configuration of the user's
        ("logs/rte-s1.log", []),
        ("sweep_runs.txt", ["--slurm", "--dry-run"]),
    ],
)
def test_sweep_never_overwrites_the_users_files(tmp_path, config_dir, capsys, name, mode):
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_text("the user's own\n")
    before, names = snapshot(out), listing(out)
    args = ["sweep", "--tasks", "rte", "--seeds", "1", "--out", str(out), "--config-dir", str(config_dir)]
    assert main([*args, *mode]) == 2
    error_of(capsys, 2, f"{name} (not written by glue-train", "another --out")
    assert snapshot(out) == before and listing(out) == names


def test_a_slurm_sweep_without_sbatch_writes_nothing(tmp_path, config_dir, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch here
    out = tmp_path / "out"
    args = ["sweep", "--tasks", "rte", "--seeds", "1", "--out", str(out), "--config-dir", str(config_dir)]
    assert main([*args, "--slurm"]) == 2
    error_of(capsys, 2, "sbatch not found")
    assert not out.exists()
