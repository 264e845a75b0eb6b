"""A stop signal (SIGTERM, SIGUSR1) is honoured wherever the run is, on real processes with real signals.

Start-up: the handler is in place within a fraction of a second of the process start, and a signal while the
model loads or while the training file is tokenized ends the run in seconds with one line, exit 0 and nothing
published. Evaluation and test prediction: a signal abandons them (nothing recorded), the checkpoint is the one of
the last completed step, the evaluation is redone after the resume, and the resumed run ends with the
uninterrupted run's metrics and weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SMOKE, load_weights, need_shared_glue

STOP_WITHIN_S = 30.0  # the promise: honoured within 30 s (measured here: a few seconds on the tiny model)


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(cond, proc: subprocess.Popen, limit: float = 300.0, every: float = 0.002) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"the run ended (rc {proc.returncode}) before the moment to signal:\n{err[-4000:]}"
            )
        assert time.time() - t0 < limit, "the moment to signal never came"
        time.sleep(every)


def stop_now(proc: subprocess.Popen, sig: signal.Signals = signal.SIGTERM) -> tuple[int, str, float]:
    """Send ``sig``; the exit code, stderr and the seconds the run took to end."""
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, time.time() - t0


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler installed for ``sig`` (SigCgt in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool((int(line.split()[1], 16) >> (sig - 1)) & 1)
    except OSError:
        pass
    return False


def maps(pid: int, name: str) -> bool:
    """Whether the process has ``name`` mapped (the model's weights: safetensors maps them while loading)."""
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def assert_clean_early_stop(rc: int, err: str, took: float, out: Path, where: str) -> None:
    assert rc == 0, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("stopped while")]
    assert len(lines) == 1 and f"stopped while {where}," in lines[0], err[-4000:]
    assert took < STOP_WITHIN_S, f"{took:.1f} s from the signal to the end"
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()


def smoke(out: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), f"output_dir={out}", "eval.predict_test=false", *extra]


def test_a_signal_the_moment_the_handler_is_in_ends_cleanly(tmp_path: Path) -> None:
    """From the first line: the handler is installed within a second of the start (before torch is imported),
    and a SIGTERM then (imports, config) ends the run at the first check, in seconds."""
    out = tmp_path / "run"
    t0 = time.time()
    proc = start(smoke(out))
    wait_for(lambda: catches(proc.pid, signal.SIGTERM), proc, limit=30)
    installed = time.time() - t0
    rc, err, took = stop_now(proc)
    assert installed < 5.0, f"the handler came {installed:.1f} s after the start"
    assert rc == 0 and "Traceback" not in err, err[-4000:]
    assert "stopped while" in err and "before this start trained a step" in err, err[-4000:]
    assert took < STOP_WITHIN_S
    assert not (out / "checkpoints").exists()


def test_sigterm_while_the_model_loads(tmp_path: Path) -> None:
    """The signal lands while the weights are being read (their file appears in the process's mappings)."""
    out = tmp_path / "run"
    proc = start(smoke(out))
    wait_for(lambda: maps(proc.pid, "tiny-bert/model.safetensors"), proc)
    rc, err, took = stop_now(proc)
    assert_clean_early_stop(rc, err, took, out, "loading the model")


def test_sigusr1_while_tokenizing_publishes_nothing(tmp_path: Path) -> None:
    """The real SST-2 training file (67k rows) on a cold cache: the signal lands in the tokenizer's batches; the
    run ends in seconds and no half-made cache entry is published."""
    glue = need_shared_glue()
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = start(smoke(out, f"data.glue_dir={glue}"), env={"GLUE_TRAIN_CACHE": str(cache)})
    # the entry's writer lock appears when its tokenization begins (after the model and the key)
    wait_for(lambda: any((cache / "tokenized").glob("sst2-train-*.lock")), proc)
    rc, err, took = stop_now(proc, signal.SIGUSR1)
    assert_clean_early_stop(rc, err, took, out, "tokenizing sst2/train")
    entries = [p.name for p in (cache / "tokenized").iterdir()] if (cache / "tokenized").exists() else []
    assert not [e for e in entries if e.startswith("sst2-train-") and not e.endswith(".lock")], entries


@pytest.mark.slow  # ~20 s: imports, model, the first shape's compile
def test_sigterm_while_compiling_stops_between_shapes(tmp_path: Path) -> None:
    """The fast path forced on (aot_eager: real dynamo graphs, no code generation) compiles 4 bucket shapes up
    front; one compile cannot be interrupted, so the run stops after the shape under way."""
    out = tmp_path / "run"
    proc = start(smoke(out, "fast.enabled=true", "fast.backend=aot_eager", "fast.bucket_multiple=32"))
    lines: list[str] = []

    def compiling() -> bool:  # the fast path's decision is logged just before its first compile
        lines.append(proc.stderr.readline())
        return "compile backend=aot_eager" in lines[-1]

    wait_for(compiling, proc, every=0)
    rc, err, took = stop_now(proc)
    assert_clean_early_stop(rc, "".join(lines) + err, took, out, "compiling")


# ----------------------------------------------------------------------------------------------------------
# evaluation and test prediction: abandoned, checkpointed at the last step, redone after the resume


def slice_glue(root: Path, train: int, dev: int, test: int) -> Path:
    """A GLUE folder cut from the real SST-2 files: a short training file, a dev and test file as asked."""
    src = need_shared_glue() / "SST-2"
    dst = root / "SST-2"
    dst.mkdir(parents=True)
    for name, rows in (("train.tsv", train), ("dev.tsv", dev), ("test.tsv", test)):
        text = (src / name).read_text().splitlines(keepends=True)
        (dst / name).write_text("".join(text[: rows + 1]))
    return root


def eval_args(glue: Path, out: Path) -> list[str]:
    return [
        "--config",
        str(SMOKE),
        f"output_dir={out}",
        f"data.glue_dir={glue}",
        "train.max_steps=6",
        "train.log_every=1",
        "eval.every_steps=3",
        "eval.batch_size=8",
        "checkpoint.every_steps=null",
        "precision=no",
    ]


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def train_rows(out: Path) -> list[int]:
    return [r["step"] for r in rows(out) if "train/loss" in r]


def eval_rows(out: Path) -> list[dict]:
    return [r for r in rows(out) if any(k.startswith("eval/") for k in r)]


@pytest.fixture(scope="module")
def eval_glue(tmp_path_factory) -> Path:
    # dev: 872 rows = 109 batches of 8 (several seconds on the tiny model); test: 1,821 rows (a new best's)
    return slice_glue(tmp_path_factory.mktemp("glue"), train=256, dev=872, test=1821)


@pytest.fixture(scope="module")
def eval_reference(eval_glue: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = start(eval_args(eval_glue, out))
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["evaluating", "predicting the test splits"])
def test_a_stop_abandons_an_evaluation_that_the_resume_redoes(
    eval_glue: Path, eval_reference: Path, tmp_path: Path, phase: str
) -> None:
    glue = eval_glue
    if phase == "predicting the test splits":  # a dev set of 8 rows: over before the signal, the test set not
        glue = tmp_path / "glue"
        shutil.copytree(eval_glue, glue)
        dev = (glue / "SST-2" / "dev.tsv").read_text().splitlines(keepends=True)
        (glue / "SST-2" / "dev.tsv").write_text("".join(dev[:9]))
        ref = tmp_path / "ref"
        proc = start(eval_args(glue, ref))
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
    else:
        ref = eval_reference
    out = tmp_path / "run"
    proc = start(eval_args(glue, out))
    wait_for(lambda: 3 in train_rows(out), proc, every=0.01)  # step 3 trained: its evaluation begins
    rc, err, took = stop_now(proc)
    assert rc == 0 and "Traceback" not in err, err[-4000:]
    assert f"stopped while {phase} at step 3: abandoned" in err, err[-4000:]
    assert took < STOP_WITHIN_S, f"{took:.1f} s from the signal to the end"
    assert eval_rows(out) == [], "an abandoned evaluation was recorded"
    assert not (out / "best").exists() and not (out / "predictions").exists()
    saved = json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert saved["train_state"]["global_step"] == 3 and saved["train_state"]["eval_due"] is True

    proc = start(eval_args(glue, out))
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert "resumed from" in err and "at step 3" in err, err[-4000:]
    assert train_rows(out) == list(range(1, 7))
    assert [r["step"] for r in eval_rows(out)] == [r["step"] for r in eval_rows(ref)] == [3, 6]
    for got, want in zip(eval_rows(out), eval_rows(ref), strict=True):
        for k, v in want.items():
            if k.startswith("eval/"):
                assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (k, got[k], v)
    assert_same_results(out, ref)
    a, b = load_weights(out), load_weights(ref)
    for k in b:
        rel = float((a[k].double() - b[k].double()).norm()) / max(float(b[k].double().norm()), 1e-12)
        assert rel <= 1e-6, f"{k}: relative difference {rel:.3g} from the uninterrupted run"
    for name in ("SST-2.tsv",):
        assert (out / "predictions" / name).read_text() == (ref / "predictions" / name).read_text()


def assert_same_results(out: Path, ref: Path) -> None:
    a = json.loads((out / "eval_results.json").read_text())
    b = json.loads((ref / "eval_results.json").read_text())
    assert a["best"]["step"] == b["best"]["step"] and a["final"]["step"] == b["final"]["step"]
    for which in ("best", "final"):
        for split, metrics in b[which]["splits"].items():
            for k, v in metrics.items():
                assert a[which]["splits"][split][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (which, k)


@pytest.mark.slow
def test_one_rank_signalled_during_an_evaluation_stops_every_rank(eval_glue: Path, tmp_path: Path) -> None:
    """2 processes under torchrun; only rank 1 gets SIGTERM, in the middle of the evaluation: the ranks agree at
    the next vote, both abandon it, the checkpoint of the last step is written and torchrun's world ends cleanly."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from conftest import free_port

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
        ]
        + ["-m", "train", *eval_args(eval_glue, out), "train.per_device_batch_size=8"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: 3 in train_rows(out), proc, every=0.01)
    workers = {}
    for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        env_of = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        workers[next(e for e in env_of if e.startswith(b"RANK=")).decode()] = int(pid)
    t0 = time.time()
    os.kill(workers["RANK=1"], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    took = time.time() - t0
    assert proc.returncode == 0 and "Traceback" not in err, err[-4000:]
    assert took < STOP_WITHIN_S, f"{took:.1f} s from the signal to the end"
    assert "stopped while evaluating at step 3: abandoned" in err, err[-4000:]
    assert eval_rows(out) == []
    saved = json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert saved["train_state"]["eval_due"] is True
