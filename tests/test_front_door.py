"""Never lose a user's work; answer bad input with one clear sentence.

Every case runs the real program (``python -m train``: forked from the warm test interpreter, or a fresh process
where signals or the environment need one) on the bundled tiny model and sample, and checks the exit code, the
absence of a traceback, the message, and, for the data-loss classes, that every file that was there before is
still there byte for byte. docs/reliability.md has the table of classes and their tests.
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
import torch
from conftest import REPO, SMOKE, load_weights, run_train

from train.cli import main

SAMPLE = REPO / "train" / "assets" / "glue_sample"
TINY = REPO / "train" / "assets" / "tiny-bert"
QUICK = ["train.max_steps=6", "train.log_every=2", "eval.every_epoch=false", "data.max_eval_samples=32"]
EXACT = ["checkpoint.every_steps=2", "checkpoint.keep_last=3"]  # dropout on: resumes are exact with it too


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train(out: Path, *extra: str, config: Path = SMOKE, **kw) -> subprocess.CompletedProcess:
    return run_train(["--config", str(config), f"output_dir={out}", *QUICK, *extra], check=False, **kw)


def one_error(proc: subprocess.CompletedProcess, *texts: str, code: int = 2) -> str:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for text in texts:
        assert text in errors[0], f"{text!r} not in: {errors[0]}"
    return errors[0]


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished, exact (dropout 0) run with checkpoints at steps 2, 4 and 6; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    ok(train(out, *EXACT))
    return out


def copy_of(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ----------------------------------------------------------------------------------------------------------
# 1. run-folder ownership


def test_a_folder_the_program_did_not_make_is_refused_untouched(tmp_path):
    mine = tmp_path / "mine"
    (mine / "final").mkdir(parents=True)
    (mine / "final" / "thesis.tex").write_text("years of work")
    (mine / "notes.md").write_text("notes")
    before = snapshot(mine)
    one_error(
        train(mine), str(mine), "not made by this program", "final/", "notes.md", "nothing there is touched"
    )
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["final", "notes.md"]
    # output_dir=. (the working directory, here the repository) is refused the same way
    one_error(train(Path(".")), "not made by this program")
    assert not (REPO / ".glue-train").exists() and not (REPO / "config.yaml").exists()


def test_output_dir_that_is_a_file_or_unwritable(tmp_path):
    (tmp_path / "afile").write_text("x")
    one_error(train(tmp_path / "afile"), "is a file, not a folder")
    one_error(train(Path("/proc/glue-train-test/run")), "/proc/glue-train-test/run", "cannot write there")


# ----------------------------------------------------------------------------------------------------------
# 2. one rule per restart


def test_the_same_command_on_a_finished_run_prints_results_and_trains_nothing(finished, tmp_path):
    run = copy_of(finished, tmp_path / "run")
    before = snapshot(run)
    log = ok(train(run, *EXACT))
    assert "nothing to train" in log and "best dev" in log and str(run) in log
    res = json.loads((run / "eval_results.json").read_text())
    assert f"{res['best']['splits']['validation']['accuracy']:.4f}" in log
    assert snapshot(run) == before  # not one byte rewritten


def test_another_config_is_refused_and_overwrite_keeps_the_old_run(finished, tmp_path):
    run = copy_of(finished, tmp_path / "run")
    before = snapshot(run)
    one_error(train(run, *EXACT, "train.lr=5e-4"), "different config", "train.lr", "overwrite=true")
    assert snapshot(run) == before
    log = ok(train(run, *EXACT, "train.lr=5e-4", "overwrite=true"))
    (previous,) = run.glob("previous-*")
    assert f"moved to {previous}" in log and "fresh" in log and "resumed from" not in log
    kept = {
        k.removeprefix(previous.name + "/"): v
        for k, v in snapshot(run).items()
        if k.startswith(previous.name)
    }
    assert kept == {k: v for k, v in before.items() if k != ".glue-train"}  # the old run, byte for byte
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/lr" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]  # this run's rows only, each step once
    assert train_rows[0]["train/lr"] == pytest.approx(5e-4 * (6 - 1) / 6)  # the new lr, not the old config's


def test_resume_never_moves_the_history_aside(finished, tmp_path):
    run = copy_of(finished, tmp_path / "run")
    before = snapshot(run)
    ok(train(run, *EXACT, "checkpoint.resume=never"))
    (previous,) = run.glob("previous-*")
    assert snapshot(previous) == {k: v for k, v in before.items() if k != ".glue-train"}
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # 2, 4, 6 + the final eval row at 6


def test_a_failed_start_leaves_nothing_that_blocks_the_fix(tmp_path):
    out = tmp_path / "run"
    one_error(train(out, "data.glue_dir=/no/such/glue"), "/no/such/glue")
    assert not out.exists() or not any(out.iterdir())
    ok(train(out, f"data.glue_dir={SAMPLE}"))  # the corrected command: not "a different config"
    assert (out / "eval_results.json").exists()


def test_the_same_folder_spelled_differently_or_moved(finished, tmp_path):
    run = copy_of(finished, tmp_path / "run")
    for spelling in (f"{run}/", f"{run}/../run"):
        assert "nothing to train" in ok(train(Path(spelling), *EXACT)), spelling
    moved = tmp_path / "elsewhere" / "moved-run"
    moved.parent.mkdir()
    run.rename(moved)
    assert "nothing to train" in ok(train(moved, *EXACT))


# ----------------------------------------------------------------------------------------------------------
# 3. resume checks


def test_a_checkpoint_of_another_task_is_refused(finished, tmp_path):
    (ckpt, *_) = sorted((finished / "checkpoints").glob("step-*"))
    one_error(
        train(tmp_path / "rte", *EXACT, "data.task=rte", f"checkpoint.resume={ckpt}"),
        "another config",
        "data.task",
    )


def test_a_damaged_checkpoint_falls_back_and_the_run_ends_as_if_uninterrupted(finished, tmp_path):
    """As after a crash: the newest checkpoint gone, the next has a damaged RNG file, metrics.jsonl cut short."""
    run = copy_of(finished, tmp_path / "run")
    for path in (
        run / "eval_results.json",
        run / "final",
        run / "best",
        run / "checkpoints" / "step-00000006",
    ):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    rng = run / "checkpoints" / "step-00000004" / "rng_state_0.json"
    rng.write_bytes(rng.read_bytes()[:-20] + b"\0" * 20)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "train/lo')  # a write cut short by the crash
    log = ok(train(run, *EXACT))
    assert "step-00000004: rng_state_0.json is damaged" in log
    assert "resumed from" in log and "step-00000002 at step 2" in log
    assert "dropping its last line" in log
    ref, got = load_weights(finished), load_weights(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # the same training as the uninterrupted run
    train_steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert train_steps.count(4) == 1 and 7 not in train_steps


def test_no_usable_checkpoint_is_an_error(finished, tmp_path):
    run = copy_of(finished, tmp_path / "run")
    (run / "eval_results.json").unlink()
    for ckpt in (run / "checkpoints").glob("step-*"):
        (ckpt / "trainer_state.json").write_text('{"train_st')
    one_error(train(run, *EXACT), "no usable checkpoint", "trainer_state.json", "overwrite=true")


# ----------------------------------------------------------------------------------------------------------
# 4. every value validated where the config is loaded (in-process: no training starts)


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("train.lr=nan", "train.lr must be a finite number"),
        ("train.lr=0", "train.lr must be > 0"),
        ("train.adam_beta1=1.5", "train.adam_beta1 must be in [0, 1)"),
        ("train.adam_eps=0", "train.adam_eps must be > 0"),
        ("train.weight_decay=-1", "train.weight_decay must be >= 0"),
        ("train.max_grad_norm=-1", "train.max_grad_norm must be > 0 (or null"),
        ("train.max_grad_norm=0", "train.max_grad_norm must be > 0 (or null"),
        ("data.num_workers=-1", "data.num_workers must be in [0, 256]"),
        ("seed=-1", "seed must be in [0, 2^32)"),
        ("seed=4294967296", "seed must be in [0, 2^32)"),
        ("train.epochs=0", "train.epochs must be at least 1"),
        ("output_dir=", "output_dir is empty"),
        ("output_dir=runs/{task}-{lr}", "may only use {task}, {model}, {seed}"),
        ("output_dir=$GLUE_NO_SUCH_VAR/x", "environment variable in it is not set"),
    ],
)
def test_out_of_range_values(override, expect, capsys):
    assert main(["--config", str(SMOKE), override]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and expect in err and "Traceback" not in err, err


def test_paths_expand_and_yaml_may_not_repeat_a_key(tmp_path, monkeypatch, capsys):
    from train.config import load_config

    monkeypatch.setenv("GLUE_TEST_ROOT", str(tmp_path))
    cfg = load_config(SMOKE, ["output_dir=$GLUE_TEST_ROOT/{task}", "data.cache_dir=~/cache"])
    assert cfg.output_dir == f"{tmp_path}/{{task}}" and cfg.data.cache_dir == str(Path.home() / "cache")
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 1.0e-3\nmodel:\n  dropout: 0\ntrain:\n  epochs: 2\n")
    assert main(["--config", str(twice)]) == 2
    err = capsys.readouterr().err
    assert f"{twice}:5:" in err and "key 'train' is written twice" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------
# 5. one error boundary


def _glue_copy(root: Path, edit) -> Path:
    dest = root / "glue"
    shutil.copytree(SAMPLE, dest)
    edit(dest / "SST-2")
    return dest


def test_unreadable_files_name_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("# caf\xe9\ntrain:\n  epochs: 1\n".encode("latin-1"))
    assert main(["--config", str(config)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err

    def latin1(folder: Path) -> None:
        lines = (folder / "train.tsv").read_bytes().split(b"\n")
        lines[4] = "na\xefve film\t1".encode("latin-1")
        (folder / "train.tsv").write_bytes(b"\n".join(lines))

    glue = _glue_copy(tmp_path, latin1)
    one_error(train(tmp_path / "run", f"data.glue_dir={glue}"), f"{glue}/SST-2/train.tsv:5:", "not UTF-8")


@pytest.mark.parametrize(
    ("index", "expect"), [("abc", "test index 'abc' is not an integer"), ("0", "appears twice")]
)
def test_bad_test_index(index, expect, tmp_path):
    def edit(folder: Path) -> None:
        lines = (folder / "test.tsv").read_text().split("\n")
        lines[3] = f"{index}\t{lines[3].split(chr(9), 1)[1]}"
        (folder / "test.tsv").write_text("\n".join(lines))

    glue = _glue_copy(tmp_path, edit)
    one_error(train(tmp_path / "run", f"data.glue_dir={glue}"), f"{glue}/SST-2/test.tsv:4:", expect)


def test_model_folder_without_tokenizer(tmp_path):
    model = tmp_path / "weights-only"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TINY / name, model / name)
    one_error(train(tmp_path / "run", f"model.name_or_path={model}"), str(model), "has no tokenizer")


def test_a_damaged_tokenized_cache_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    ok(train(tmp_path / "a", f"data.cache_dir={cache}"))
    (entry,) = [p for p in (cache / "tokenized").glob("sst2-train-*") if p.is_dir()]
    (arrow,) = entry.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])
    log = ok(train(tmp_path / "b", f"data.cache_dir={cache}"))
    assert f"tokenized cache {entry} is damaged" in log and "tokenized sst2/train" in log


def _popen(out: Path, *extra: str) -> subprocess.Popen:
    args = ["--config", str(SMOKE), f"output_dir={out}", "train.epochs=50", "train.log_every=1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "train", *args], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    seen, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return seen
    proc.kill()
    raise AssertionError(f"never saw {text!r}:\n{''.join(seen)[-3000:]}")


def test_ctrl_c_checkpoints_and_exits_130_with_the_resume_command(tmp_path):
    out = tmp_path / "run"
    proc = _popen(out)
    _wait_for(proc, "step 3/")
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in rest, rest[-3000:]
    assert "interrupted (Ctrl-C): checkpoint of step" in rest and "python -m train --config" in rest
    (ckpt,) = (out / "checkpoints").glob("step-*")
    again = _popen(out)  # the same command resumes
    seen = "".join(_wait_for(again, "resumed from"))
    again.send_signal(signal.SIGINT)
    again.send_signal(signal.SIGINT)  # the second Ctrl-C does not wait for a checkpoint
    rest = again.communicate(timeout=120)[1]
    assert f"resumed from {ckpt}" in seen
    assert again.returncode == 130 and "Traceback" not in rest, rest[-3000:]


# ----------------------------------------------------------------------------------------------------------
# 6. W&B never hangs


def _wandb_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        "WANDB_DIR": str(tmp / "wb"),
        "WANDB_CONFIG_DIR": str(tmp / "wbc"),
        "HOME": str(tmp),
        "WANDB_SILENT": "true",
    }
    return {**{k: "" for k in os.environ if k.startswith("WANDB_")}, **env, **extra}


def test_wandb_without_a_key_goes_offline_unless_online_was_asked_for(tmp_path):
    env = _wandb_env(tmp_path)
    env.pop("WANDB_API_KEY", None)
    env["WANDB_MODE"] = ""
    log = ok(train(tmp_path / "run", "tracking.wandb.project=p", env=env))
    assert "W&B: no API key" in log and "wandb sync" in log
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    one_error(
        train(tmp_path / "online", "tracking.wandb.project=p", "tracking.wandb.mode=online", env=env),
        "W&B online mode was asked for but no API key",
        "wandb login",
    )


def test_wandb_unreachable_goes_offline(tmp_path):
    closed = _closed_port()
    env = _wandb_env(
        tmp_path, WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{closed}", WANDB_MODE=""
    )
    log = ok(train(tmp_path / "run", "tracking.wandb.project=p", env=env, timeout=120))
    assert "W&B could not be reached within 10 s" in log and "logging offline instead" in log
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["wandb"]["mode"] == "offline" and Path(info["wandb"]["sync_dir"]).is_dir()


def _closed_port() -> int:
    from train.engine.dist import free_port

    return free_port()  # free right now: nothing answers there


# ----------------------------------------------------------------------------------------------------------
# 8. concurrent runs sharing one cache


def test_four_processes_fill_one_empty_cache(tmp_path):
    cache = tmp_path / "cache"
    args = ["-m", "train", "prepare", "--config", str(SMOKE), f"data.cache_dir={cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outs]
    reports = [sorted(ln for ln in o[0].splitlines() if ln.startswith("prepared sst2/")) for o in outs]
    assert all(r == reports[0] for r in reports) and len(reports[0]) == 3  # same rows, same cache entries
    entries = sorted(p for p in (cache / "tokenized").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(entries) == 3 and not list((cache / "tokenized").glob(".*tmp*"))

    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    train_entry = next(p for p in entries if p.name.startswith("sst2-train"))
    got = datasets.load_from_disk(str(train_entry))["input_ids"]
    rows = (SAMPLE / "SST-2" / "train.tsv").read_text().splitlines()[1:]
    want = tok([r.split("\t")[0] for r in rows if r], truncation=True, max_length=128)["input_ids"]
    assert got == want
