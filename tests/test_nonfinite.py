"""Non-finite loss policy, driven by the NaN-injection hook (GLUE_TRAIN_DEBUG_NAN_AT_STEP).

bf16/fp32: the run stops with an error naming the step, nothing is saved after it, and the last good
checkpoint resumes; with train.max_nonfinite_skips=N up to N bad steps are skipped. fp16 (GPU): the loss
scaler skips the step and train/skipped_steps counts it. Two processes: both ranks stop at the same step.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from conftest import SMOKE, load_weights, run_train

from train.engine.nonfinite import NAN_ENV, Guard, nan_steps
from train.errors import ConfigError, NonFiniteError
from train.tracking.tracker import read_metrics

BASE = ["model.dropout=0", "eval.predict_test=false", "train.max_steps=12", "checkpoint.keep_last=2"]


def _error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def _finite(run_dir) -> bool:
    return all(torch.isfinite(t).all() for t in load_weights(run_dir).values())


def test_nan_steps_parser(monkeypatch) -> None:
    monkeypatch.setenv(NAN_ENV, "3, 5@1,7@0")
    assert nan_steps(0) == {3, 7}
    assert nan_steps(1) == {3, 5}
    monkeypatch.delenv(NAN_ENV)
    assert nan_steps(0) == frozenset()


def _fake_acc(device: str = "cpu", kind: str = "DistributedType.NO") -> types.SimpleNamespace:
    return types.SimpleNamespace(
        device=torch.device(device), process_index=0, num_processes=1, distributed_type=kind
    )


def test_guard_records_the_first_bad_step_and_raises_at_check() -> None:
    guard = Guard(_fake_acc(), torch.nn.Linear(2, 2), "no", 0, lambda: "ckpt/step-1")
    for step, norm in ((1, 0.5), (2, float("nan")), (3, float("inf")), (4, 0.5)):
        guard.after_backward(step, torch.tensor(norm), torch.tensor(1.0))
    with pytest.raises(
        NonFiniteError, match=r"at optimizer step 2 \(precision no; detected here\).*ckpt/step-1"
    ):
        guard.check("here")
    fp16 = Guard(_fake_acc(), torch.nn.Linear(2, 2), "fp16", 0)
    fp16.after_backward(1, torch.tensor(float("nan")), torch.tensor(1.0))
    fp16.check("here")  # the scaler's business: no error


def test_skips_refused_under_deepspeed() -> None:
    from train.engine.backends.deepspeed import DeepSpeed

    with pytest.raises(ConfigError, match="train.max_nonfinite_skips=2 is not supported under deepspeed"):
        Guard(_fake_acc(), torch.nn.Linear(2, 2), "bf16", 2, backend=DeepSpeed())


def test_fp32_nan_stops_without_saving_and_resumes(tmp_path) -> None:
    out = tmp_path / "run"
    args = [
        "--config",
        str(SMOKE),
        f"output_dir={out}",
        "precision=no",
        *BASE,
        "checkpoint.every_steps=2",
        "train.log_every=4",
    ]
    proc = run_train(args, env={NAN_ENV: "5"}, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = _error(proc)
    ckpts = out / "checkpoints"
    assert "non-finite training loss or gradient norm at optimizer step 5" in err
    assert "detected before the checkpoint of step 6" in err  # the first sync point after step 5
    assert f"the last good checkpoint is {ckpts / 'step-00000004'}" in err
    assert "train.max_nonfinite_skips" in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]
    assert not (out / "eval_results.json").exists() and not (out / "final").exists()
    # without the fault, the same command resumes from the last good checkpoint and finishes
    proc = run_train(args)
    assert f"resumed from {ckpts / 'step-00000004'} at step 4" in proc.stderr
    assert _finite(out)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12] and all(math.isfinite(r["train/loss"]) for r in rows)


def test_bf16_nan_detected_at_log_window(tmp_path) -> None:
    out = tmp_path / "run"
    proc = run_train(
        ["--config", str(SMOKE), f"output_dir={out}", "precision=bf16", *BASE, "train.log_every=2"],
        env={NAN_ENV: "3"},
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = _error(proc)
    assert "at optimizer step 3 (precision bf16; detected at the log of step 4)" in err
    assert "there is no earlier checkpoint" in err
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0]["train/loss"] is not None and rows[1]["train/loss"] is None  # NaN is logged as null
    assert not (out / "checkpoints").exists() and not (out / "eval_results.json").exists()


def test_fp32_skips_up_to_n_then_stops(tmp_path) -> None:
    out = tmp_path / "skip"
    args = ["--config", str(SMOKE), "precision=no", *BASE, "train.log_every=1", "train.max_nonfinite_skips=1"]
    run_train([*args, f"output_dir={out}"], env={NAN_ENV: "3"})
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert [r["train/skipped_steps"] for r in rows] == [0, 0] + [1] * 10
    assert rows[2]["train/loss"] is None and rows[2]["train/lr"] == rows[3]["train/lr"]  # no scheduler step
    assert _finite(out)
    proc = run_train([*args, f"output_dir={tmp_path / 'stop'}"], env={NAN_ENV: "3,5"}, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "at optimizer step 5 (precision no; more than train.max_nonfinite_skips=1 such steps)" in _error(
        proc
    )


def test_two_processes_agree_and_exit(tmp_path) -> None:
    """NaN on rank 1 only: both ranks stop at the same step with the same error; nothing hangs."""
    out = tmp_path / "run"
    proc = run_train(
        [
            "--config",
            str(SMOKE),
            f"output_dir={out}",
            "precision=no",
            *BASE,
            "train.log_every=2",
            "checkpoint.every_steps=2",
        ],
        nproc=2,
        env={NAN_ENV: "3@1"},
        check=False,
        timeout=300,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: non-finite")]
    assert len(errors) == 1, proc.stderr[-4000:]  # every rank stops with it; rank 0 says it, once
    assert all("at optimizer step 3" in e and "detected at the log of step 4" in e for e in errors)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_overflow_skipped_and_counted(tmp_path) -> None:
    out = tmp_path / "run"
    run_train(
        ["--config", str(SMOKE), f"output_dir={out}", "precision=fp16", *BASE, "train.log_every=1"],
        env={NAN_ENV: "3"},
    )
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    skipped = [r["train/skipped_steps"] for r in rows]
    assert skipped[2] == skipped[1] + 1  # step 3 was skipped by the scaler and counted
    assert _finite(out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_guard_adds_no_host_sync_per_step() -> None:
    guard = Guard(_fake_acc("cuda"), torch.nn.Linear(2, 2).cuda(), "bf16", 0)
    norm = torch.tensor(float("nan"), device="cuda")
    loss = torch.tensor(1.0, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            guard.after_backward(step, norm if step == 2 else norm.nan_to_num(1.0), loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(guard.first_bad) == 2
