"""One boundary per input: whatever a library raises while the program reads what the user supplied (model folder,
tokenizer, weights, a run folder's files, the output_dir template, the launcher's environment, a dev set too small
for its metric) is one ``error:`` naming it, exit 2, no traceback. Each case here was found by tests/test_fuzz.py
or named in a report; they stay as plain regression tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMOKE, free_port, run_train
from test_fuzz import cli, holds, load_both

from train.errors import ConfigError, InputError, reading

TINY = REPO / "train" / "assets" / "tiny-bert"
FIXTURES = REPO / "tests" / "fixtures"
FAST = ["eval.predict_test=false", "train.max_steps=2"]


def one_error(proc: subprocess.CompletedProcess, *expect: str) -> str:
    holds(proc.returncode, proc.stderr, 0, " ".join(proc.args))
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    for text in expect:
        assert text in line, line
    return line


# ----------------------------------------------------------------------------------------------------------
# the boundary itself, with real libraries


def test_reading_names_the_input_whatever_the_library_raises(tmp_path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(weights))
    weights.write_bytes(weights.read_bytes()[:200])
    damaged = r"the weights .*model.safetensors: cannot be read \(SafetensorError"
    with pytest.raises(InputError, match=damaged), reading("the weights", weights, "copy them again"):
        load_file(str(weights))
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    with (
        pytest.raises(InputError, match="tokenizer.json: cannot be read"),
        reading("the tokenizer", bad, "again"),
    ):
        Tokenizer.from_file(str(bad))
    with (
        pytest.raises(ConfigError, match="x.json: cannot be read .JSONDecodeError"),
        reading("config", "x.json", "fix it", ConfigError),
    ):
        json.loads("{")


def test_reading_keeps_the_programs_own_bugs() -> None:
    from train.config import _num  # any function of the package

    # raised in train/: a bug, not the input's fault; its traceback stays
    with pytest.raises(TypeError), reading("anything", "x", "y"):
        _num(None)  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt), reading("anything", "x", "y"):
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------------------
# the launcher's environment


@pytest.mark.parametrize(
    ("env", "expect"),
    [
        ({"RANK": "1", "WORLD_SIZE": "2"}, "no launcher started this process"),
        ({"RANK": "1"}, "(RANK=1: a rank must be below its world size)"),
        ({"RANK": "abc"}, "RANK='abc', not a whole number"),
        (
            {"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
            "below its world size",
        ),
    ],
)
def test_a_stale_launcher_environment_is_said_by_every_rank(env, expect, tmp_path) -> None:
    """A leftover ``export RANK=1`` made the one process a silent follower that waited 10 minutes for a rank 0."""
    clean = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    }
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(SMOKE), *FAST, f"output_dir={tmp_path / 'run'}"],
        env={**clean, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_error(proc, expect, "unset")
    assert not (tmp_path / "run").exists()
    proc = subprocess.run(  # every command has the same boundary
        [sys.executable, "-m", "train", "summary", str(tmp_path)],
        env={**clean, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_error(proc, expect)


SAY = "from train.errors import report_error, DataError; report_error(DataError({!r}))"


def test_an_error_of_every_rank_is_said_once_and_one_of_a_rank_alone_is_said(tmp_path) -> None:
    """Real processes of one launch (same launcher variables, same parent): the first to report an error every rank
    has prints it, the others do not; rank 1 failing alone with its own message prints it."""
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "TORCHELASTIC_RUN_ID": f"fuzz-{os.getpid()}-{tmp_path.name}",
    }

    def say(rank: int, text: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", SAY.format(text)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert say(1, "the same for all") == "error: the same for all\n"  # rank 1 first: it says it
    assert say(0, "the same for all") == ""  # rank 0 then: already said in this launch
    assert say(1, "rank 1 alone") == "error: rank 1 alone\n"


# ----------------------------------------------------------------------------------------------------------
# model folders (found by the fuzzer)


def _model(tmp_path: Path, name: str, data: bytes | None) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    if data is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    ("name", "damage", "expect"),
    [
        ("model.safetensors", lambda b: b[:5000], "the weights in"),
        ("model.safetensors", lambda b: b[:8] + b"x" * 32 + b[40:], "the weights in"),
        ("tokenizer_config.json", lambda b: b'{"tokenizer_class": 5}', "the tokenizer in"),
        ("tokenizer.json", lambda b: b[:1000], "could not load"),
        ("config.json", lambda b: b"[1, 2]", "could not load"),
    ],
)
def test_a_damaged_model_file_is_named(tmp_path, name, damage, expect) -> None:
    folder = _model(tmp_path, name, damage((TINY / name).read_bytes()))
    with pytest.raises(ConfigError, match=expect) as e:
        load_both(folder)
    assert str(folder) in str(e.value)


def test_an_empty_vocabulary_without_tokenizer_json(tmp_path) -> None:
    folder = _model(tmp_path, "vocab.txt", b"")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="the tokenizer in .*Missing \\[UNK\\] token"):
        load_both(folder)


def test_a_config_larger_than_its_weights(tmp_path) -> None:
    """num_hidden_layers=2350285303133 built layers for hours before any weight was read."""
    cfg = json.loads((TINY / "config.json").read_text())
    folder = _model(tmp_path, "config.json", json.dumps({**cfg, "num_hidden_layers": 2350285303133}).encode())
    with pytest.raises(ConfigError, match="num_hidden_layers=2350285303133, more than the"):
        load_both(folder)


def test_a_truncated_weights_file_in_a_real_run(tmp_path) -> None:
    folder = _model(tmp_path, "model.safetensors", (TINY / "model.safetensors").read_bytes()[:5000])
    args = ["--config", str(SMOKE), *FAST, f"output_dir={tmp_path / 'run'}", f"model.name_or_path={folder}"]
    one_error(run_train(args, check=False), "model.name_or_path: the weights in", "SafetensorError")


# ----------------------------------------------------------------------------------------------------------
# a dev set that cannot give the task's metric


def _stsb(tmp_path: Path, dev_rows: list[str]) -> Path:
    glue = tmp_path / "glue"
    shutil.copytree(FIXTURES / "STS-B", glue / "STS-B")
    header = (FIXTURES / "STS-B" / "dev.tsv").read_text().splitlines(keepends=True)[0]
    (glue / "STS-B" / "dev.tsv").write_text(header + "".join(dev_rows))
    return glue


def _dev_row(i: int, score: str) -> str:
    return f"{i}\tmain-news\tx\t2012\t{i}\tnone\tnone\tA man plays {i}.\tA person plays {i}.\t{score}\n"


@pytest.mark.parametrize(
    ("rows", "expect"),
    [
        ([_dev_row(0, "3.2")], "it has 1 row, and pearson needs at least two"),
        ([_dev_row(i, "2.5") for i in range(4)], "every one of its 4 rows has the score 2.5"),
    ],
)
def test_a_dev_set_without_a_correlation_is_refused_before_training(tmp_path, rows, expect) -> None:
    """A one-row STS-B dev set crashed in scipy after training had finished."""
    glue = _stsb(tmp_path, rows)
    out = tmp_path / "run"
    args = ["--config", str(SMOKE), *FAST, "data.task=stsb", f"data.glue_dir={glue}", f"output_dir={out}"]
    one_error(run_train(args, check=False), str(glue / "STS-B" / "dev.tsv"), expect)
    assert not (out / "metrics.jsonl").exists()  # refused before the first step


def test_a_dev_set_cut_too_short_names_max_eval_samples(tmp_path) -> None:
    glue = _stsb(tmp_path, [_dev_row(0, "1.0"), _dev_row(1, "4.0"), _dev_row(2, "2.0")])
    args = [
        "--config",
        str(SMOKE),
        *FAST,
        "data.task=stsb",
        f"data.glue_dir={glue}",
        f"output_dir={tmp_path / 'r'}",
    ]
    one_error(run_train([*args, "data.max_eval_samples=1"], check=False), "data.max_eval_samples=1")


def test_correlations_of_one_value_do_not_crash() -> None:
    import numpy as np

    from train.data.metrics import compute_metrics
    from train.tasks import TASKS

    got = compute_metrics(TASKS["stsb"], np.array([1.0]), np.array([2.0]))
    assert got == {"pearson": 0.0, "spearman": 0.0, "score": 0.0}


# ----------------------------------------------------------------------------------------------------------
# settings that only a real value shows wrong


def test_an_output_dir_template_with_a_format_spec() -> None:
    rc, _, err = cli(["train", "--config", str(SMOKE), "--print-config", "output_dir=runs/x-{seed:zz}"])
    assert (
        rc == 2 and "output_dir='runs/x-{seed:zz}' is not a valid template" in err and "Traceback" not in err
    )
    rc, out, _ = cli(["train", "--config", str(SMOKE), "--print-config", "output_dir=runs/x-{seed:05d}"])
    assert rc == 0 and "runs/x-{seed:05d}" in out


def test_an_unknown_compile_backend(tmp_path) -> None:
    args = [
        "--config",
        str(SMOKE),
        *FAST,
        f"output_dir={tmp_path / 'run'}",
        "fast.enabled=true",
        "fast.backend=nosuch",
    ]
    one_error(
        run_train(args, check=False), "fast.backend='nosuch' is not a torch.compile backend", "aot_eager"
    )


# ----------------------------------------------------------------------------------------------------------
# a run folder's damaged files


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inputs") / "run"
    run_train(["--config", str(SMOKE), *FAST, f"output_dir={out}"])
    return out


@pytest.mark.parametrize(
    ("name", "data", "expect", "commands"),
    [
        (
            "metrics.jsonl",
            b"\xff\xfe{\n",
            "metrics.jsonl: cannot be read (UnicodeDecodeError",
            ("summary", "card"),
        ),
        ("metrics.jsonl", b"[1]\n", "metrics.jsonl:", ("summary", "card")),
        ("run_info.json", b"[]", "run_info.json: holds a JSON list, not a dict", ("summary", "card")),
        ("config.yaml", b"\x80on: auto\n", "config.yaml: cannot be read (UnicodeDecodeError", ("card",)),
    ],
)
def test_a_damaged_run_folder_file_is_named(finished, tmp_path, name, data, expect, commands) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with open(out / name, "ab" if name.endswith(".jsonl") else "wb") as fh:
        fh.write(data)
    for command in commands:
        one_error(run_train([command, str(out)], check=False), expect)


def test_a_metrics_row_cut_by_a_kill_is_skipped(finished, tmp_path) -> None:
    from train.files import read_jsonl

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    rows = read_jsonl(out / "metrics.jsonl")
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 9, "train/lo')  # the row being written when the run was killed
    assert read_jsonl(out / "metrics.jsonl") == rows


def test_an_error_of_every_rank_is_said_once_under_torchrun(tmp_path) -> None:
    """Both ranks of a real launch meet the same config error: one ``error:`` line, not two, not none."""
    args = ["--config", str(SMOKE), "train.lr=-1", f"output_dir={tmp_path / 'run'}"]
    proc = run_train(args, nproc=2, check=False, timeout=120)
    assert proc.returncode != 0
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
        "error: command line: train.lr must be > 0, got -1.0"
    ]


def test_a_wandb_setting_that_wandb_refuses(tmp_path) -> None:
    """A tag of 300 characters: W&B's own settings check (pydantic) raised a traceback at wandb.init."""
    tag = "x" * 300
    args = ["--config", str(SMOKE), *FAST, f"output_dir={tmp_path / 'run'}", "tracking.wandb.project=p"]
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    proc = run_train([*args, f"tracking.wandb.tags=a,{tag}"], check=False, env=env, timeout=120)
    one_error(proc, "W&B: the settings", "run_tags", "Tags must be between 1 and 64 characters")


# ----------------------------------------------------------------------------------------------------------
# a batch larger than the data: memory in proportion to the data, not to the number asked for


def test_a_slot_larger_than_the_data_holds_only_rows_that_can_be_real() -> None:
    from train.data.batches import Layout, PlanSampler

    for effective, per_device, world in (
        (1_000_000, None, 1),
        (1_000_000, None, 2),
        (64, 8, 2),
        (16, None, 1),
    ):
        lay = Layout.derive(effective, per_device, world)
        ranks = [list(PlanSampler(5, lay, r, seed=1)) for r in range(world)]
        for slots in ranks:
            assert all(len(slot) == lay.rows_per_forward(5) == min(lay.per_device, 5) for slot in slots)
        real = sorted(i for slots in ranks for slot in slots for i, w in slot if w)
        assert real == [0, 1, 2, 3, 4]  # every row once per epoch, as with full slots


def test_a_batch_of_a_million_on_512_rows_trains_one_step_of_them(tmp_path) -> None:
    out = tmp_path / "run"
    proc = run_train(
        [
            "--config",
            str(SMOKE),
            f"output_dir={out}",
            "train.effective_batch_size=1000000",
            "train.epochs=1",
            *FAST,
        ],
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((out / "eval_results.json").read_text())["final"]["step"] == 1
    assert rows and "Traceback" not in proc.stderr


def test_compiled_eval_batches_hold_at_most_the_largest_split() -> None:
    from train.engine.fastpath import eval_rows_per_forward

    assert eval_rows_per_forward(1_000_000, [872, 1821]) == 1821
    assert eval_rows_per_forward(16, [872, 1821]) == 16
    assert eval_rows_per_forward(16, []) == 1


def test_a_compiled_eval_batch_of_a_million_on_16_rows(tmp_path) -> None:
    """The fast path pads eval batches to a fixed row count: with eval.batch_size=1000000 that was a compiled
    forward (and its dummy warm-up batch) of a million rows for a dev set of 16."""
    out = tmp_path / "run"
    args = ["--config", str(SMOKE), f"output_dir={out}", *FAST, "eval.batch_size=1000000"]
    args += [
        "data.max_eval_samples=16",
        "fast.enabled=true",
        "fast.backend=aot_eager",
        "fast.bucket_multiple=128",
    ]
    proc = run_train(args, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["fast_path"].startswith("fast path on"), info["fast_path"]
    folder = Path(info["compile_cache"]["dir"]) / "glue-train"
    record = json.loads((folder / f"{info['compile_cache']['key']}.json").read_text())
    assert record["parts"]["eval_rows"] == 16 and record["parts"]["train_rows"] == 16
    results = json.loads((out / "eval_results.json").read_text())["final"]["splits"]
    assert 0.0 <= results["validation"]["accuracy"] <= 1.0


def test_more_loader_workers_than_cpus_train_with_a_warning(tmp_path) -> None:
    cpus = len(os.sched_getaffinity(0))
    out = tmp_path / "run"
    proc = run_train(
        ["--config", str(SMOKE), f"output_dir={out}", *FAST, f"data.num_workers={cpus + 1}"], check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert f"data.num_workers={cpus + 1} starts {cpus + 1} loader processes" in text
    assert f"this process may use {cpus} CPUs" in text
    one_error(
        run_train(
            ["--config", str(SMOKE), f"output_dir={tmp_path / 'b'}", "data.num_workers=100000"], check=False
        ),
        "data.num_workers",
        "100000",
    )
