"""GLUE sweep: plan, local scheduling (one run per GPU), SLURM list + submission, skip/resume, end to end."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from train.sweeps import report, sweep
from train.sweeps import spaces as search

FINISHED = '{"final": {"step": 4, "splits": {}}}'  # a whole eval_results.json (its presence: finished)
TINY_TASK = """\
model:
  name_or_path: builtin:tiny-bert
data:
  task: {task}
  glue_dir: builtin:glue-sample
train:
  epochs: 1
  max_steps: 6
  lr: 1.0e-3
  log_every: 2
checkpoint:
  every_steps: 2
"""

# A stand-in for `python -m train`: records its device and timing, sleeps, "finishes" or fails.
FAKE_TRAIN = textwrap.dedent(
    """\
    import json, os, sys, time
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    out = args["output_dir"]
    name = os.path.basename(out)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0.4")))
    with open(os.environ["FAKE_LOG"], "a") as fh:
        fh.write(json.dumps({"name": name, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start,
                             "end": time.time(), "argv": sys.argv[1:]}) + "\\n")
    if name in os.environ.get("FAKE_FAIL", "").split(","):
        print("boom: simulated failure", file=sys.stderr)
        sys.exit(3)
    with open(os.path.join(out, "eval_results.json"), "w") as fh:
        json.dump({"task": name.split("-")[0], "seed": int(args["seed"]), "final": {}}, fh)
    """
)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "configs"
    folder.mkdir()
    for task in ("sst2", "rte"):
        (folder / f"{task}.yaml").write_text(TINY_TASK.format(task=task))
    return folder


@pytest.fixture
def fake_train(tmp_path: Path, monkeypatch) -> Path:
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    log = tmp_path / "fake_calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setattr(
        sweep, "train_command", lambda run: [sys.executable, str(script), *sweep.train_overrides(run)]
    )
    return log


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ----------------------------------------------------------------------------------------------------------
# plan


def test_parse_tasks_and_seeds():
    assert sweep.parse_tasks("all") == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert sweep.parse_tasks("RTE, wnli,rte") == ["rte", "wnli"]
    with pytest.raises(sweep.SweepError, match="unknown task"):
        sweep.parse_tasks("rte,mnli-m")
    assert sweep.parse_seeds("1,2") == [1, 2]
    assert sweep.parse_seeds("1-3,7,2") == [1, 2, 3, 7]
    with pytest.raises(sweep.SweepError, match="not a seed"):
        sweep.parse_seeds("1,x")
    with pytest.raises(sweep.SweepError, match="the range '5-1' runs backwards; write 1-5"):
        sweep.parse_seeds("5-1")
    with pytest.raises(sweep.SweepError, match=r"4294967296 is not a seed; seeds are in \[0, 2\^32\)"):
        sweep.parse_seeds("4294967296")


def test_a_sweep_too_large_to_mean_is_refused_at_once(tmp_path: Path, config_dir: Path):
    """Sizes are checked before anything is built: 1-100000000 hung while listing a hundred million seeds."""
    for bad, match in (
        (lambda: sweep.parse_seeds("1-100000000"), "more than 10,000 seeds"),
        (lambda: sweep.parse_seeds("0-4294967295"), "more than 10,000 seeds"),
        (
            lambda: sweep.override_sets([f"train.k{i}=1,2,3,4,5,6,7,8,9,10" for i in range(12)]),
            "override sets",
        ),
        (lambda: sweep.plan(["rte", "sst2"], list(range(5001)), tmp_path, config_dir), "= 10,002 runs"),
    ):
        with pytest.raises(sweep.SweepError, match=match):
            bad()
    assert len(sweep.plan(["rte"], sweep.parse_seeds("1-10000"), tmp_path, config_dir)) == 10_000


def test_plan_folders_commands_and_override_sets(tmp_path: Path, config_dir: Path):
    runs = sweep.plan(["rte", "sst2"], [1, 2], tmp_path / "out", config_dir, ["train.epochs=3"])
    assert [r.name for r in runs] == ["rte-s1", "rte-s2", "sst2-s1", "sst2-s2"]
    assert runs[0].folder == (tmp_path / "out" / "rte-s1").resolve()
    cmd = sweep.train_command(runs[1])
    assert cmd[1:5] == ["-m", "train", "--config", str(config_dir.resolve() / "rte.yaml")]
    assert cmd[5:] == [
        "seed=2",
        f"output_dir={runs[1].folder}",
        "tracking.wandb.sweep_name=out",
        "train.epochs=3",
    ]
    grid = sweep.plan(
        ["rte"],
        [1],
        tmp_path / "out",
        config_dir,
        ["train.epochs=3"],
        ["train.lr=2e-5,3e-5", "train.warmup_ratio=0.1"],
    )
    assert [r.name for r in grid] == ["rte-s1-lr2e-5_warmup-ratio0.1", "rte-s1-lr3e-5_warmup-ratio0.1"]
    assert grid[1].overrides == ("train.epochs=3", "train.lr=3e-5", "train.warmup_ratio=0.1")
    single = sweep.plan(["rte"], [1], tmp_path / "out", config_dir, grid=["train.lr=3e-5"])
    assert single[0].name == "rte-s1" and single[0].overrides == ("train.lr=3e-5",)
    with pytest.raises(sweep.SweepError, match="--grid"):
        sweep.override_sets(["train.lr"])
    with pytest.raises(sweep.SweepError, match="same folder tag"):
        sweep.plan(["rte"], [1], tmp_path, config_dir, grid=["data.glue_dir=a/b,a_b"])
    with pytest.raises(sweep.SweepError, match="sets seed and output_dir"):
        sweep.plan(["rte"], [1], tmp_path, config_dir, ["output_dir=/x"])


def test_check_plan_reports_every_problem_before_running(tmp_path: Path, config_dir: Path):
    (config_dir / "mrpc.yaml").write_text(TINY_TASK.format(task="rte"))
    runs = sweep.plan(["rte", "mrpc", "cola"], [1], tmp_path / "out", config_dir, ["train.lrr=1"])
    with pytest.raises(sweep.SweepError) as err:
        sweep.check_plan(runs)
    msg = str(err.value)
    assert "cola.yaml" in msg and "no task config" in msg
    assert "unknown config key 'train.lrr'" in msg
    runs = sweep.plan(["mrpc"], [1], tmp_path / "out", config_dir)
    with pytest.raises(sweep.SweepError, match="trains data.task=rte, not mrpc"):
        sweep.check_plan(runs)
    assert (
        sweep.main(
            [
                "--tasks",
                "rte",
                "--seeds",
                "1",
                "--out",
                str(tmp_path / "o"),
                "--config-dir",
                str(config_dir),
                "train.nope=1",
            ]
        )
        == 2
    )


def test_check_plan_refuses_runs_whose_data_lack_their_task(tmp_path: Path, config_dir: Path):
    """Said before anything starts, not at each run's turn: a bundled sample without the task, a local GLUE
    folder without it."""
    (config_dir / "cola.yaml").write_text(TINY_TASK.format(task="cola"))
    glue = tmp_path / "glue"
    (glue / "RTE").mkdir(parents=True)
    runs = sweep.plan(["rte", "cola"], [1], tmp_path / "out", config_dir)
    runs += sweep.plan(["rte"], [1], tmp_path / "local", config_dir, [f"data.glue_dir={glue}"])
    with pytest.raises(sweep.SweepError) as err:
        sweep.check_plan(runs)
    msg = str(err.value)
    assert "cola-s1: data.glue_dir=builtin:glue-sample holds the tasks mrpc, rte, sst2 only" in msg, msg
    assert f"rte-s1: missing GLUE file {glue / 'RTE' / 'train.tsv'}" in msg, msg
    assert len(msg.splitlines()) == 2, msg  # the bundled RTE run is fine


def test_config_drift_is_a_warning(tmp_path: Path, config_dir: Path):
    (run,) = sweep.plan(["rte"], [1], tmp_path / "out", config_dir)
    assert sweep.check_plan([run]) == []
    from train.config import dump, load_config

    run.folder.mkdir(parents=True)
    (run.folder / "config.yaml").write_text(dump(load_config(run.config, ["train.lr=0.5"])))
    (warning,) = sweep.check_plan([run])
    assert "rte-s1" in warning and "train.lr" in warning


# ----------------------------------------------------------------------------------------------------------
# local scheduling (a fake training program: fast, and it shows which GPU each run got)


def test_visible_gpus_from_env(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert sweep.visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.visible_gpus() == []


def test_one_run_per_gpu_and_failures_do_not_stop_the_sweep(
    tmp_path, config_dir, fake_train, monkeypatch, capsys
):
    monkeypatch.setattr(sweep, "visible_gpus", lambda: ["4", "7"])
    monkeypatch.setenv("FAKE_FAIL", "rte-s2")
    out = tmp_path / "out"
    args = ["--tasks", "sst2,rte", "--seeds", "1,2,3", "--out", str(out), "--config-dir", str(config_dir)]
    assert sweep.main(args) == 1  # one run failed
    got = calls(fake_train)
    assert len(got) == 6 and {c["gpu"] for c in got} == {"4", "7"}  # each child sees exactly one GPU
    events = sorted([(c["start"], 1) for c in got] + [(c["end"], -1) for c in got])
    running = [sum(d for _, d in events[: i + 1]) for i in range(len(events))]
    assert max(running) == 2  # two GPUs -> two runs at a time, never more
    for gpu in ("4", "7"):  # never two runs on one GPU at the same time
        spans = sorted((c["start"], c["end"]) for c in got if c["gpu"] == gpu)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    status = json.loads((out / sweep.STATUS).read_text())
    assert status["rte-s2"]["rc"] == 3 and not status["rte-s2"]["finished"]
    assert all(status[n]["rc"] == 0 for n in status if n != "rte-s2")
    printed = capsys.readouterr().out
    assert "rte-s2: FAILED (exit 3)" in printed and "boom: simulated failure" in printed
    assert "boom" in (out / "logs" / "rte-s2.log").read_text()
    # the report lists the failed run
    records = {r.name: r for r in report.scan(out)}
    assert records["rte-s2"].status == "failed"

    # rerun: only the failed run starts again, the five finished ones are skipped
    monkeypatch.setenv("FAKE_FAIL", "")
    assert sweep.main(args) == 0
    assert [c["name"] for c in calls(fake_train)[6:]] == ["rte-s2"]
    assert "5 finished (skipped), 1 to run" in capsys.readouterr().out


def test_sequential_on_cpu(tmp_path, config_dir, fake_train, monkeypatch):
    monkeypatch.setattr(sweep, "visible_gpus", lambda: [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the child env is inherited untouched on CPU
    monkeypatch.setenv("FAKE_SLEEP", "0.2")
    out = tmp_path / "out"
    assert (
        sweep.main(["--tasks", "rte", "--seeds", "1-3", "--out", str(out), "--config-dir", str(config_dir)])
        == 0
    )
    got = sorted(calls(fake_train), key=lambda c: c["start"])
    assert [c["name"] for c in got] == ["rte-s1", "rte-s2", "rte-s3"]
    assert all(a["end"] <= b["start"] for a, b in zip(got, got[1:], strict=False))
    manifest = json.loads((out / sweep.MANIFEST).read_text())
    assert [r["folder"] for r in manifest["runs"]] == ["rte-s1", "rte-s2", "rte-s3"]


def test_stop_children_asks_for_a_checkpoint(tmp_path: Path):
    marker = tmp_path / "got-sigterm"
    code = (
        f"import signal, sys, time, pathlib\n"
        f"def h(*a):\n    pathlib.Path({str(marker)!r}).write_text('ok'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, h)\nprint('ready', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    child = sweep._Child(None, proc, None, time.monotonic())
    sweep.stop_children({"0": child}, grace=20)
    assert proc.returncode == 0 and marker.read_text() == "ok"


# ----------------------------------------------------------------------------------------------------------
# SLURM


def test_slurm_dry_run_writes_the_list_and_prints_sbatch(tmp_path, config_dir, capsys):
    out = tmp_path / "out"
    (out / "rte-s1").mkdir(parents=True)
    (out / "rte-s1" / "eval_results.json").write_text(FINISHED)  # finished: not in the list
    (out / "sst2-s2").mkdir(parents=True)
    (out / "sst2-s2" / "eval_results.json").write_text('{"final": ')  # damaged: no result, so in the list
    common = ["--out", str(out), "--config-dir", str(config_dir)]
    args = ["--tasks", "sst2,rte", "--seeds", "1,2", *common, "--slurm", "--dry-run", "train.lr=3e-5"]
    assert sweep.main(args) == 0
    lines = (out / sweep.LIST_FILE).read_text().splitlines()
    res, cfg = out.resolve(), config_dir.resolve()
    assert lines == [
        f"sst2 1 config={cfg}/sst2.yaml output_dir={res}/sst2-s1 tracking.wandb.sweep_name=out train.lr=3e-5",
        f"sst2 2 config={cfg}/sst2.yaml output_dir={res}/sst2-s2 tracking.wandb.sweep_name=out train.lr=3e-5",
        f"rte 2 config={cfg}/rte.yaml output_dir={res}/rte-s2 tracking.wandb.sweep_name=out train.lr=3e-5",
    ]
    captured = capsys.readouterr()
    printed = captured.out
    assert f"{out / 'sst2-s2' / 'eval_results.json'} is damaged" in captured.out + captured.err
    script = sweep.REPO / "slurm" / "sweep.sbatch"
    expected = [
        "sbatch",
        "--array=0-2",
        f"--output={res}/logs/%x-%A_%a.out",
        str(script),
        f"{res}/{sweep.LIST_FILE}",
    ]
    assert shlex.join(expected) in printed
    assert (out / "logs").is_dir()  # SLURM does not create the --output folder
    cmd = sweep.sbatch_command(Path("d/l.txt"), 8, Path("s.sbatch"), 3, ["--partition=gpu"])
    assert cmd == [
        "sbatch",
        "--array=0-7%3",
        "--output=d/logs/%x-%A_%a.out",
        "--partition=gpu",
        "s.sbatch",
        "d/l.txt",
    ]
    assert (
        sweep.main(["--tasks", "rte", "--seeds", "1", *common, "--dry-run"]) == 2
    )  # --dry-run needs --slurm


def test_slurm_submits_with_sbatch(tmp_path, config_dir, monkeypatch, capfd):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch_args\necho "Submitted batch job 42"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    script = tmp_path / "sweep.sbatch"
    script.write_text("#!/bin/bash\n")
    out = tmp_path / "out"
    args = [
        "--tasks",
        "rte",
        "--seeds",
        "1-4",
        "--out",
        str(out),
        "--config-dir",
        str(config_dir),
        "--slurm",
        "--sbatch-script",
        str(script),
        "--max-parallel",
        "2",
        "--sbatch-arg=--qos=low",
    ]
    assert sweep.main(args) == 0
    res = out.resolve()
    assert (tmp_path / "sbatch_args").read_text().split() == [
        "--array=0-3%2",
        f"--output={res}/logs/%x-%A_%a.out",
        "--qos=low",
        str(script),
        f"{res}/{sweep.LIST_FILE}",
    ]
    assert "Submitted batch job 42" in capfd.readouterr().out
    assert len((out / sweep.LIST_FILE).read_text().splitlines()) == 4


# ----------------------------------------------------------------------------------------------------------
# end to end with the real training program


def _train_rows(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def _kill_after_first_checkpoint(run: sweep.SweepRun, timeout: float = 300) -> None:
    """Start the run's real training process and SIGKILL it once a complete checkpoint exists."""
    proc = subprocess.Popen(
        sweep.train_command(run),
        env=sweep.child_env(None),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while sweep.newest_checkpoint(run) is None:
            assert proc.poll() is None, f"training exited early ({proc.returncode})"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_sweep_end_to_end_skips_finished_and_resumes_killed(tmp_path, config_dir, capsys):
    out = tmp_path / "sweep"
    args = ["--tasks", "sst2,rte", "--seeds", "1,2", "--out", str(out), "--config-dir", str(config_dir)]
    assert sweep.main(args) == 0, capsys.readouterr().out
    runs = sweep.plan(["sst2", "rte"], [1, 2], out, config_dir)
    for run in runs:
        results = json.loads((run.folder / "eval_results.json").read_text())
        assert (results["task"], results["seed"]) == (run.task, run.seed)
        assert _train_rows(run.folder) == [2, 4, 6]
    capsys.readouterr()

    # re-running skips every finished run
    stamps = {r.name: (r.folder / "eval_results.json").stat().st_mtime_ns for r in runs}
    assert sweep.main(args) == 0
    assert "4 finished (skipped), 0 to run" in capsys.readouterr().out
    assert stamps == {r.name: (r.folder / "eval_results.json").stat().st_mtime_ns for r in runs}

    # a run killed mid-training is resumed from its checkpoint by the next sweep
    killed = next(r for r in runs if r.name == "rte-s1")
    for path in sorted(killed.folder.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    _kill_after_first_checkpoint(killed)
    assert not sweep.is_finished(killed)
    ckpt = sweep.newest_checkpoint(killed)
    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert f"rte-s1: resuming from {ckpt}" in printed and "3 finished (skipped), 1 to run" in printed
    assert "resumed from" in (out / "logs" / "rte-s1.log").read_text()
    assert sweep.is_finished(killed) and _train_rows(killed.folder) == [2, 4, 6]

    # and the report sees 2 seeds per task
    rep = report.build_report(out)
    (group,) = rep.groups
    assert {e.entry.label: e.n for e in group.entries if e.n} == {"SST-2": 2, "RTE": 2}
    assert all(r.status == "finished" for r in rep.records)
    assert rep.outputs["png"].read_bytes().startswith(b"\x89PNG")


@pytest.mark.slurm
def test_sweep_on_a_real_slurm_array(tmp_path, config_dir, monkeypatch, capfd):
    """Needs the test cluster (tests/slurm/cluster.sh start): the list file runs through slurm/sweep.sbatch."""
    if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        pytest.skip("no SLURM cluster: run `tests/slurm/cluster.sh start` first")
    monkeypatch.setenv("PROCS_PER_NODE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    args = [
        "--tasks",
        "rte",
        "--seeds",
        "1,2",
        "--out",
        str(out),
        "--config-dir",
        str(config_dir),
        "--slurm",
        "--sbatch-arg=--gres=none",
        "--sbatch-arg=--cpus-per-task=2",
        "eval.predict_test=false",
    ]
    assert sweep.main(args) == 0
    job = re.search(r"Submitted batch job (\d+)", capfd.readouterr().out).group(1)
    runs = sweep.plan(["rte"], [1, 2], out, config_dir)
    deadline = time.monotonic() + 600
    try:
        while not all(sweep.is_finished(r) for r in runs):
            assert time.monotonic() < deadline, sorted(p.name for p in (out / "logs").iterdir())
            time.sleep(2)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    for i, run in enumerate(runs):
        cfg = yaml.safe_load((run.folder / "config.yaml").read_text())
        assert (cfg["seed"], cfg["data"]["task"], cfg["eval"]["predict_test"]) == (run.seed, "rte", False)
        assert (out / "logs" / f"glue-sweep-{job}_{i}.out").is_file()
    assert sweep.main(args) == 0  # everything finished: nothing to submit
    assert "2 of 2 runs already finished" in capfd.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# search spaces


def test_search_files_equal_their_grid_options(tmp_path: Path, config_dir: Path, capsys):
    """Every shipped search space loads; --search bert.yaml is the --grid options it stands for."""
    spaces = {
        p.stem: search.load_search(p) for p in sorted((sweep.REPO / "sweeps" / "search").glob("*.yaml"))
    }
    assert {"bert", "roberta", "quick"} <= set(spaces)
    assert all(s.source.strip() for s in spaces.values())
    assert spaces["bert"].grid == ("train.lr=2e-5,3e-5,5e-5", "train.epochs=2,3,4")
    assert "train.weight_decay=0.1" in spaces["roberta"].overrides
    out = tmp_path / "out"
    by_search = sweep.plan(
        ["rte", "sst2"], [1, 2], out, config_dir, *sweep.search_options("sweeps/search/bert.yaml", [])[::-1]
    )
    by_grid = sweep.plan(
        ["rte", "sst2"], [1, 2], out, config_dir, [], ["train.lr=2e-5,3e-5,5e-5", "train.epochs=2,3,4"]
    )
    assert by_search == by_grid and len(by_search) == 2 * 2 * 9
    assert by_search[0].name == "rte-s1-lr2e-5_epochs2" and by_search[0].set_overrides == (
        "train.lr=2e-5",
        "train.epochs=2",
    )
    # roberta: 6 sets, each with the fixed settings before its grid point, and every config loads
    (run, *_) = runs = sweep.plan(
        ["rte"], [1], out, config_dir, *sweep.search_options("sweeps/search/roberta.yaml", [])[::-1]
    )
    assert len(runs) == 6 and run.overrides[-2:] == ("train.lr=1e-5", "train.effective_batch_size=16")
    assert "train.max_grad_norm=null" in run.overrides
    sweep.check_plan(runs)
    from train.config import load_config

    cfg = load_config(run.configs, sweep.train_overrides(run))
    assert (cfg.train.weight_decay, cfg.train.max_grad_norm, cfg.train.lr) == (0.1, None, 1e-5)
    args = ["--tasks", "rte", "--seeds", "1", "--out", str(out), "--config-dir", str(config_dir)]
    assert sweep.main([*args, "--search", "sweeps/search/quick.yaml", "--slurm", "--dry-run"]) == 0
    assert len((out / sweep.LIST_FILE).read_text().splitlines()) == 3
    assert sweep.main([*args, "--search", "sweeps/search/quick.yaml", "--grid", "train.lr=1,2"]) == 2
    assert "already an axis" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("source: x\n", "needs 'grid'"),
        ("grid:\n  train.lr: [1e-5]\n", "needs 'grid' (its axes) and 'source'"),
        ("source: x\ngrid:\n  train.lr: []\n", "needs a list of values"),
        ("source: x\ngrid:\n  train.lr: [1e-5, 2e-5]\n  train.lr: [3e-5]\n", "names ['train.lr'] twice"),
        ("source: x\ngrid: {train.lr: [1e-5]}\noverrides: [train.lr=2e-5]\n", "both a grid axis and"),
        ("source: x\ngrid: {train.lr: [1e-5]}\noverrides: [nonsense]\n", ":3: override 'nonsense'"),
        ("source: x\ngrids: {}\n", "unknown field(s) ['grids']"),
    ],
)
def test_search_file_errors_name_the_file(tmp_path: Path, text: str, message: str):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(search.SearchError) as err:
        search.load_search(path)
    assert message in str(err.value) and str(path) in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# --warm-start mnli


@pytest.fixture
def warm_config_dir(config_dir: Path) -> Path:
    """MNLI and STS-B configs on a GLUE folder holding their training files (the bundled sample has neither; the
    sweep checks that each run's folder holds its task: these tests' stand-in training never reads them)."""
    from train.tasks import get_task

    glue = config_dir.parent / "glue"
    for task in ("mnli", "stsb"):
        train = glue / get_task(task).split("train")[0].tsv
        train.parent.mkdir(parents=True)
        train.write_text("index\tsentence1\tsentence2\tlabel\n")
        text = TINY_TASK.format(task=task).replace("builtin:glue-sample", str(glue))
        (config_dir / f"{task}.yaml").write_text(text)
    return config_dir


def test_warm_start_runs_mnli_first_locally(tmp_path, warm_config_dir, fake_train, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "visible_gpus", lambda: ["0", "1"])
    out = tmp_path / "out"
    args = [
        "--tasks",
        "rte,sst2,stsb,mnli",
        "--seeds",
        "1,2",
        "--out",
        str(out),
        "--config-dir",
        str(warm_config_dir),
    ]
    assert sweep.main([*args, "--warm-start", "mnli"]) == 0
    got = calls(fake_train)
    mnli_end = max(c["end"] for c in got if c["name"].startswith("mnli"))
    warm = [c for c in got if c["name"].split("-")[0] in sweep.WARM_TASKS]
    assert len(got) == 8 and len(warm) == 4
    assert all(c["start"] >= mnli_end for c in warm)  # every MNLI run had finished
    by_start = [c["name"] for c in sorted(got, key=lambda c: c["start"])]
    assert sorted(by_start[:2]) == ["mnli-s1", "mnli-s2"]  # first in the queue
    for c in got:
        init = [a for a in c["argv"] if a.startswith("model.init_from=")]
        assert init == ([f"model.init_from={out.resolve()}@mnli"] if c in warm else [])
    manifest = {r["name"]: r for r in json.loads((out / sweep.MANIFEST).read_text())["runs"]}
    assert manifest["rte-s1"]["after"] == "mnli" and manifest["sst2-s1"]["after"] is None

    # an MNLI run that fails: nothing warm starts, the others run, the sweep says so and exits 1
    out2 = tmp_path / "out2"
    monkeypatch.setenv("FAKE_FAIL", "mnli-s2")
    args2 = [*args[:5], str(out2), *args[6:], "--warm-start", "mnli"]
    assert sweep.main(args2) == 1
    names = [c["name"] for c in calls(fake_train)[8:]]
    assert sorted(names) == ["mnli-s1", "mnli-s2", "sst2-s1", "sst2-s2"]
    printed = capsys.readouterr().out
    assert (
        "not starting rte-s1, rte-s2, stsb-s1, stsb-s2: a mnli run they start from did not finish" in printed
    )
    assert sweep.main(["--tasks", "rte", "--seeds", "1", "--out", str(tmp_path / "none"), "--config-dir",
                       str(warm_config_dir), "--warm-start", "mnli"]) == 2  # fmt: skip
    assert "add mnli to --tasks" in capsys.readouterr().err


def test_warm_start_slurm_second_array_depends_on_the_first(tmp_path, warm_config_dir, monkeypatch, capfd):
    out = tmp_path / "out"
    common = ["--out", str(out), "--config-dir", str(warm_config_dir), "--warm-start", "mnli", "--slurm"]
    res, script = out.resolve(), sweep.REPO / "slurm" / "sweep.sbatch"
    # --dry-run: both arrays, as a script that hands the first job id to the second's --dependency
    assert sweep.main(["--tasks", "mnli,rte,stsb", "--seeds", "1,2", *common, "--dry-run"]) == 0
    printed = capfd.readouterr().out.strip().splitlines()[-2:]
    log = f"--output={res}/logs/%x-%A_%a.out"
    assert printed == [
        f"JOB=$(sbatch --parsable --array=0-1 {log} {script} {res}/{sweep.LIST_FILE})",
        f"sbatch --array=0-3 {log} --dependency=afterok:${{JOB}} {script} {res}/{sweep.WARM_LIST_FILE}",
    ]
    first = (out / sweep.LIST_FILE).read_text().splitlines()
    second = (out / sweep.WARM_LIST_FILE).read_text().splitlines()
    assert [ln.split()[:2] for ln in first] == [["mnli", "1"], ["mnli", "2"]]
    assert [ln.split()[:2] for ln in second] == [["rte", "1"], ["rte", "2"], ["stsb", "1"], ["stsb", "2"]]
    assert all(ln.endswith(f"model.init_from={res}@mnli") for ln in second)

    # submitted: the second sbatch waits for exactly the first array's MNLI tasks
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch_args\necho "Submitted batch job 42"\n'
    )
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert sweep.main(["--tasks", "sst2,mnli,rte", "--seeds", "1,2", *common]) == 0
    calls_ = (tmp_path / "sbatch_args").read_text().splitlines()
    assert calls_[0] == f"--array=0-3 {log} {script} {res}/{sweep.LIST_FILE}"
    assert (
        calls_[1] == f"--array=0-1 {log} --dependency=afterok:42_0:42_1 {script} {res}/{sweep.WARM_LIST_FILE}"
    )
    assert [ln.split()[:2] for ln in (out / sweep.LIST_FILE).read_text().splitlines()][:2] == [
        ["mnli", "1"],
        ["mnli", "2"],
    ]
    # MNLI finished: the warm array goes alone, without a dependency
    for seed in (1, 2):
        (out / f"mnli-s{seed}").mkdir(exist_ok=True)
        (out / f"mnli-s{seed}" / "eval_results.json").write_text(FINISHED)
        (out / f"sst2-s{seed}").mkdir(exist_ok=True)
        (out / f"sst2-s{seed}" / "eval_results.json").write_text(FINISHED)
    (tmp_path / "sbatch_args").unlink()
    assert sweep.main(["--tasks", "sst2,mnli,rte", "--seeds", "1,2", *common]) == 0
    assert (tmp_path / "sbatch_args").read_text().splitlines() == [
        f"--array=0-1 {log} {script} {res}/{sweep.WARM_LIST_FILE}"
    ]


WARM_TASK = """\
model:
  name_or_path: builtin:tiny-bert
data:
  task: {task}
  glue_dir: {glue}
train:
  epochs: 1
  max_steps: 4
  lr: 1.0e-3
  log_every: 2
eval:
  predict_test: false
"""


@pytest.fixture
def real_warm_configs(tmp_path: Path) -> Path:
    """Tiny real runs: MNLI and STS-B on the test fixtures, RTE and SST-2 on the bundled sample."""
    folder = tmp_path / "warm-configs"
    folder.mkdir()
    fixtures = sweep.REPO / "tests" / "fixtures"
    sample = "builtin:glue-sample"
    for task, glue in (("mnli", fixtures), ("stsb", fixtures), ("rte", sample), ("sst2", sample)):
        (folder / f"{task}.yaml").write_text(WARM_TASK.format(task=task, glue=glue))
    return folder


def _check_warm_runs(out: Path, tasks: tuple[str, ...]) -> None:
    """Each warm-started run began after the MNLI run finished, from its best model, and says so."""
    mnli = (out / "mnli-s1").resolve()
    done = (mnli / "eval_results.json").stat().st_mtime
    for task in tasks:
        run = out / f"{task}-s1"
        info = json.loads((run / "run_info.json").read_text())["init_from"]
        assert info["run"] == str(mnli) and info["model_folder"] == str(mnli / "best"), info
        assert info["selected"]["task"] == "mnli" and info["head"]["kind"] == "new"
        assert (
            yaml.safe_load((run / "config.yaml").read_text())["model"]["init_from"] == f"{out.resolve()}@mnli"
        )
        assert (run / "config.yaml").stat().st_mtime >= done  # it started after MNLI had finished
        assert sweep.is_finished(sweep.plan([task], [1], out)[0])


@pytest.mark.slow
def test_warm_start_end_to_end_locally(tmp_path, real_warm_configs):
    out = tmp_path / "sweep"
    args = [
        "--tasks",
        "rte,stsb,mnli",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--config-dir",
        str(real_warm_configs),
    ]
    assert sweep.main([*args, "--warm-start", "mnli"]) == 0
    _check_warm_runs(out, ("rte", "stsb"))


@pytest.mark.slurm
def test_warm_start_on_a_real_slurm_cluster(tmp_path, real_warm_configs, monkeypatch, capfd):
    """Needs the test cluster (tests/slurm/cluster.sh start): the warm array waits for the first array's MNLI task
    (afterok on that array element: SST-2, also in the first array, need not finish first)."""
    if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        pytest.skip("no SLURM cluster: run `tests/slurm/cluster.sh start` first")
    monkeypatch.setenv("PROCS_PER_NODE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    args = [
        "--tasks",
        "mnli,sst2,rte,stsb",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--config-dir",
        str(real_warm_configs),
    ]
    slurm = ["--slurm", "--sbatch-arg=--gres=none", "--sbatch-arg=--cpus-per-task=2"]
    assert sweep.main([*args, "--warm-start", "mnli", *slurm]) == 0
    first, second = re.findall(r"Submitted batch job (\d+)", capfd.readouterr().out)
    try:
        shown = subprocess.run(["scontrol", "show", "job", second], capture_output=True, text=True).stdout
        assert re.search(rf"Dependency=afterok:{first}_0\b", shown), shown  # while MNLI runs or waits
        runs = [out / f"{t}-s1" for t in ("mnli", "sst2", "rte", "stsb")]
        deadline = time.monotonic() + 600
        while not all((r / "eval_results.json").is_file() for r in runs):
            assert time.monotonic() < deadline, sorted(p.name for p in (out / "logs").iterdir())
            time.sleep(2)
    finally:
        subprocess.run(["scancel", first, second], capture_output=True)
    _check_warm_runs(out, ("rte", "stsb"))
    assert (out / "logs" / f"glue-sweep-{second}_0.out").is_file()


def test_an_out_that_is_a_file_is_named_and_kept(tmp_path: Path, config_dir: Path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("the user's")
    for out, expect in (
        (mine, f"error: {mine} is a file where a folder is needed (it is left as it is)"),
        (mine / "sweep", f"error: {mine / 'sweep'}: a part of this path is a file, not a folder"),
    ):
        args = ["--tasks", "rte", "--seeds", "1", "--out", str(out), "--config-dir", str(config_dir)]
        assert sweep.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(expect) and err.count("error:") == 1, err
    assert mine.read_text() == "the user's"
