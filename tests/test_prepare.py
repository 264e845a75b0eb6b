"""`glue-train prepare`: fills the caches so that an offline run (HF_HUB_OFFLINE=1) never re-tokenizes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, SMOKE, run_train


@pytest.mark.slow
def test_prepare_then_offline_run_hits_every_cache(tmp_path):
    cache = tmp_path / "tokcache"
    env = {"GLUE_TRAIN_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "train", "prepare", "--config", str(SMOKE)],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    prepared = [ln for ln in proc.stdout.splitlines() if ln.startswith("prepared sst2/")]
    assert {ln.split(":")[0] for ln in prepared} == {
        "prepared sst2/train",
        "prepared sst2/validation",
        "prepared sst2/test",
    }, proc.stdout
    cached = sorted(p.name for p in cache.rglob("*") if (p / "dataset_info.json").exists())
    assert len(cached) == 3, cached

    run = run_train(["--config", str(SMOKE), f"output_dir={tmp_path}/run", "train.max_steps=2"], env=env)
    log = run.stdout + run.stderr
    assert log.count("tokenized cache hit") == 3, log[-4000:]
    assert "tokenized sst2/" not in log, "the run tokenized again"


def test_prepare_reports_bad_config(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train", "prepare", "--config", str(SMOKE), "data.task=nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
