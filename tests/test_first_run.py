"""The README's first command, as a new user runs it: a copy of the tree, a fresh virtual environment, the command
exactly as written. It must fine-tune a real model (all-MiniLM-L6-v2 on the bundled SST-2 subset) to at least
0.82 dev accuracy and leave what a person looks at: the summary at the end of the log, curves.png, the model
card with the result, and GLUE test predictions for every test row.

The times (install, run) are printed for the record, never asserted (they depend on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

FIRST_RUN = "runs/first-run"
# what the user's shell would not have: this test session's interpreter, caches and thread caps
NOT_A_NEW_USER = ("VIRTUAL_ENV", "PYTHONPATH", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def first_command() -> str:
    lines = [
        ln.strip()
        for ln in (REPO / "README.md").read_text().splitlines()
        if ln.startswith("    python3 -m venv")
    ]
    return lines[0]


def copy_of_the_tree(dest: Path) -> Path:
    """The files a fresh clone has (tracked, plus new ones not ignored), nothing built or run here."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest


def test_readme_first_command_fine_tunes_a_real_model(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the tree is copied as a clone would have it)")
    clone = copy_of_the_tree(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if k not in NOT_A_NEW_USER}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:  # python3 is the user's, not this session's virtual environment's
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(venv))
    env["GLUE_TRAIN_CACHE"] = str(tmp_path / "cache")  # keep the runner's home clean; changes nothing else
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", first_command()], cwd=clone, env=env, capture_output=True, text=True, timeout=1400
    )
    wall = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "Traceback" not in log

    run = clone / FIRST_RUN
    res = json.loads((run / "eval_results.json").read_text())
    acc = res["best"]["splits"]["validation"]["accuracy"]
    train_s = float(re.search(r"speed\s+train ([\d.]+) s", log).group(1))
    print(f"\nfirst run: dev accuracy {acc:.4f}; training {train_s:.0f} s; install + run {wall:.0f} s")
    assert acc >= 0.82, f"dev accuracy {acc} < 0.82"
    assert res["best"]["step"] == 150  # 2,400 rows / 16, one epoch

    # what a person sees: the summary closes the log, the curves, the card with the result, the predictions
    tail = [ln for ln in log.strip().splitlines()[-12:]]
    assert any("run finished: sst2 · all-MiniLM-L6-v2" in ln for ln in tail), "\n".join(tail)
    assert any(ln.strip().startswith("best dev") and f"{acc:.4f}" in ln for ln in tail), "\n".join(tail)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (run / "best" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert f"- Accuracy: {acc:.4f}" in card
    preds = (run / "predictions" / "SST-2.tsv").read_text().splitlines()
    assert preds[0] == "index\tprediction" and len(preds) == 1 + 1821
    assert {ln.split("\t")[1] for ln in preds[1:]} == {"0", "1"}
