"""Crash safety of checkpoints: partial saves are reported and ignored, pruning never touches best/, a full
disk fails the save with a clear error and leaves the previous checkpoint intact, and (slow) a real run
killed with SIGKILL at 20 random moments, restarted each time, ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMOKE, load_weights, run_train

from train.engine import checkpoint
from train.tracking.tracker import read_metrics

# ----------------------------------------------------------------------------------------------------------
# the checkpoint module with a real Accelerator (in this process, a small model)


@pytest.fixture(scope="module")
def acc_model():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return acc, model


def _state(step: int) -> dict:
    return {"train_state": {"global_step": step}, "config": {}}


def test_partial_checkpoints_are_reported_and_ignored(acc_model, tmp_path, caplog) -> None:
    acc, _ = acc_model
    checkpoint.save(acc, tmp_path, 1, _state(1), keep_last=5)
    ckpts = checkpoint.root(tmp_path)
    (ckpts / ".tmp-step-00000002").mkdir()  # a save killed half-way
    (ckpts / ".tmp-step-00000002" / "model.safetensors").write_bytes(b"\0" * 10)
    (ckpts / "step-00000003").mkdir()  # a folder without the marker (copied by hand, half-synced, ...)
    with caplog.at_level(logging.WARNING, logger="train.engine.checkpoint"):
        assert checkpoint.find_resume("auto", tmp_path) == ckpts / "step-00000001"
    text = caplog.text
    assert ".tmp-step-00000002" in text and "partial" in text
    assert "step-00000003" in text and "incomplete" in text
    # the next save clears the interrupted one; the resumable one is untouched
    checkpoint.save(acc, tmp_path, 4, _state(4), keep_last=5)
    assert not (ckpts / ".tmp-step-00000002").exists()
    assert checkpoint.find_resume("auto", tmp_path) == ckpts / "step-00000004"
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.find_resume(str(ckpts / "step-00000003"), tmp_path)


def test_keep_last_prunes_checkpoints_never_best(acc_model, tmp_path) -> None:
    acc, model = acc_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REPO / "train" / "assets" / "tiny-bert"))

    class Exportable(torch.nn.Module):  # save_pretrained-like, for export_model
        def save_pretrained(self, path, state_dict, safe_serialization):  # noqa: ARG002
            from safetensors.torch import save_file

            Path(path).mkdir(parents=True)
            save_file(
                {k: v.contiguous() for k, v in state_dict.items()}, str(Path(path) / "model.safetensors")
            )

    exp = Exportable()
    exp.lin = acc.unwrap_model(model)
    checkpoint.export_model(acc, exp, tok, tmp_path / "best")
    for step in range(1, 6):
        checkpoint.save(acc, tmp_path, step, _state(step), keep_last=2)
    names = sorted(p.name for p in checkpoint.root(tmp_path).iterdir())
    assert names == ["step-00000004", "step-00000005"]
    assert (tmp_path / "best" / "model.safetensors").is_file() and (
        tmp_path / "best" / "tokenizer.json"
    ).is_file()


def test_same_step_saved_twice_and_everything_fsynced(acc_model, tmp_path, monkeypatch) -> None:
    acc, _ = acc_model
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    checkpoint.save(acc, tmp_path, 7, _state(7), keep_last=1)
    path = checkpoint.save(acc, tmp_path, 7, {"train_state": {"global_step": 7, "again": True}}, keep_last=1)
    assert '"again": true' in (path / checkpoint.STATE).read_text()
    assert sorted(p.name for p in checkpoint.root(tmp_path).iterdir()) == ["step-00000007"]
    tmp = str(checkpoint.root(tmp_path) / ".tmp-step-00000007")
    for name in ("model.safetensors", "optimizer.bin", checkpoint.STATE, checkpoint.MARKER):
        assert f"{tmp}/{name}" in synced, name
    assert tmp in synced and str(checkpoint.root(tmp_path)) in synced  # folder entries too (after rename)
    # the marker is flushed only after every other file
    files = [s for s in synced if s.startswith(tmp + "/")]
    assert files.index(f"{tmp}/{checkpoint.MARKER}") > files.index(f"{tmp}/{checkpoint.STATE}")


# ----------------------------------------------------------------------------------------------------------
# disk full, for real: a 3 MiB tmpfs (2 checkpoints of tiny-bert fit, a third does not)

DISK_ARGS = [
    "precision=no",
    "model.dropout=0",
    "eval.predict_test=false",
    "train.max_steps=4",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=2",
    "train.log_every=1",
]


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (test_file_size_limit_during_save covers the rest)")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_save(small_disk: Path) -> None:
    out = small_disk / "run"
    args = ["--config", str(SMOKE), f"output_dir={out}", *DISK_ARGS]
    proc = run_train(args, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, proc.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert f"could not write checkpoint {ckpts / 'step-00000003'}: the disk is full" in err[0]
    assert f"the previous checkpoint {ckpts / 'step-00000002'} is intact" in err[0]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001", "step-00000002"]  # no partial left
    assert not (out / "eval_results.json").exists()
    # more room: the same command resumes from the intact checkpoint and finishes
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = run_train(args)
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in proc.stderr
    assert (out / "eval_results.json").is_file()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3, 4]


def test_file_size_limit_during_save(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (works without root): the 800 KB optimizer file of the first checkpoint cannot be written."""
    out = tmp_path / "run"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))

    cmd = [sys.executable, "-m", "train", "--config", str(SMOKE), f"output_dir={out}", *DISK_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"could not write checkpoint {out / 'checkpoints' / 'step-00000001'}" in err[0]
    assert "file size limit" in err[0] or "disk is full" in err[0], err[0]
    assert "there is no earlier checkpoint" in err[0]
    assert list((out / "checkpoints").iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# kill -9 fuzz

FUZZ_ARGS = [
    "precision=no",
    "model.dropout=0",
    # 192 optimizer steps: long enough that KILLS kills land before the end even on an idle machine
    # (a kill consumes at most a few steps; with 40 steps an unloaded run finished after 15 kills).
    "train.epochs=6",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=2",
    "eval.predict_test=false",
    "train.log_every=1",
]
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
# Each kill costs a fresh interpreter start (~10 s on 2 cores). The seeded draw of the first 12 kill points is 6
# inside a save, 4 after a new checkpoint and 2 during start-up (deterministic: the same seed every run).
KILLS = 12


def _complete_steps(out: Path) -> list[Path]:
    return checkpoint.complete_checkpoints(out, report=False)


def _ctime(path: Path) -> int:
    try:
        return path.stat().st_ctime_ns
    except FileNotFoundError:
        return 0


def _wait(cond, proc: subprocess.Popen, limit: float = 180.0) -> bool:
    """Poll ``cond`` every 2 ms; False if the process ended first."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("the run made no progress for 180 s")


@pytest.mark.slow
def test_kill9_fuzz_resumes_to_identical_weights(tmp_path: Path) -> None:
    t0 = time.monotonic()
    ref = tmp_path / "ref"
    run_train(["--config", str(SMOKE), f"output_dir={ref}", *FUZZ_ARGS])
    out = tmp_path / "fuzz"
    cmd = [sys.executable, "-m", "train", "--config", str(SMOKE), f"output_dir={out}", *FUZZ_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(20261127)
    kills, in_save, resumes, partial_reported = 0, 0, 0, 0
    logs: list[str] = []
    while kills < KILLS:
        expected = (_complete_steps(out) or [None])[-1]  # what this start must resume from
        log_path = tmp_path / f"log-{kills:02d}.txt"
        with open(log_path, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
            last = checkpoint._step(expected) if expected else 0
            mode = rng.choice(["save", "save", "step", "step", "start"])
            if mode == "save":  # inside a save: the .tmp folder of a newer step exists
                started = time.time_ns()

                def saving(last=last, started=started) -> bool:  # made by this process, not a stale one
                    return any(
                        checkpoint._step(p) > last and _ctime(p) > started
                        for p in checkpoint.root(out).glob(".tmp-step-*")
                    )

                alive = _wait(saving, proc)
                time.sleep(rng.uniform(0.0, 0.005))  # a save takes tens of ms: this lands inside it
            elif mode == "step":  # anywhere after at least one new checkpoint
                alive = _wait(
                    lambda last=last: any(checkpoint._step(p) > last for p in _complete_steps(out)), proc
                )
                time.sleep(rng.uniform(0.0, 0.5))
            else:  # during start-up, resume or the first steps
                deadline = time.monotonic() + rng.uniform(1.0, 6.0)
                while time.monotonic() < deadline and proc.poll() is None:
                    time.sleep(0.01)
                alive = proc.poll() is None
            if not alive or proc.poll() is not None:
                proc.wait()
                break  # finished before the kill landed
            in_save += any(checkpoint.root(out).glob(".tmp-step-*"))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        kills += 1
        text = log_path.read_text()
        logs.append(text)
        assert "Traceback" not in text, text[-3000:]
        got = RESUMED.search(text)
        if got:  # it got as far as resuming: from the newest complete checkpoint, at its step
            resumes += 1
            assert expected is not None and Path(got.group(1)) == expected, (got.group(0), expected)
            assert int(got.group(2)) == checkpoint._step(expected)
        elif expected is not None:
            assert "resumed from" not in text
        partial_reported += "ignoring partial checkpoint" in text
    # the last start runs to the end
    proc = run_train(["--config", str(SMOKE), f"output_dir={out}", *FUZZ_ARGS])
    elapsed = time.monotonic() - t0
    assert kills == KILLS, f"the run finished after only {kills} kills"
    ref_w, got_w = load_weights(ref), load_weights(out)
    assert ref_w.keys() == got_w.keys()
    for key in ref_w:
        assert torch.equal(ref_w[key], got_w[key]), key
    # every optimizer step logged exactly once, with the uninterrupted run's loss, LR and grad norm
    keys = ("step", "train/loss", "train/lr", "train/grad_norm")
    rows = [tuple(r[k] for k in keys) for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    ref_rows = [tuple(r[k] for k in keys) for r in read_metrics(ref / "metrics.jsonl") if "train/loss" in r]
    assert rows == ref_rows
    assert in_save >= 3 and resumes >= 6 and partial_reported >= 2, (in_save, resumes, partial_reported)
    print(f"kill -9 fuzz: {kills} kills ({in_save} inside a save), {resumes} resumes, {elapsed:.0f} s")
