"""launch/torchrun.sh and launch/accelerate.sh: resolved commands (DRY_RUN=1), argument pass-through, signal
forwarding to the training processes (real torchrun, stand-in program), and real 2-process runs of the program
(marked slow): the uninterrupted run, and SIGTERM -> checkpoint -> restart -> the same weights (no SLURM)."""

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
from conftest import REPO, SMOKE, load_weights

TORCHRUN = REPO / "launch" / "torchrun.sh"
ACCELERATE = REPO / "launch" / "accelerate.sh"
KNOBS = (
    "NPROC",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RDZV_BACKEND",
    "RDZV_ID",
    "TORCHRUN",
    "TORCHRUN_ARGS",
    "ACCELERATE",
    "ACCELERATE_ARGS",
    "ACCELERATE_CONFIG",
    "RELAY",
    "STOP_SIGNALS",
    "SHUTDOWN_TIMEOUT",
    "DRY_RUN",
    "CUDA_VISIBLE_DEVICES",
)


def clean_env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in kw.items()})
    return env


def dry(script: Path, *args: str, **knobs) -> str:
    proc = subprocess.run(
        ["bash", str(script), *args],
        env=clean_env(DRY_RUN=1, **knobs),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("+ ")]
    return line[2:]


# ----------------------------------------------------------------------------------------------------------
# resolved commands


def test_torchrun_single_node_passes_args_through():
    cmd = dry(
        TORCHRUN, "--config", "configs/tasks/sst2.yaml", "train.lr=3e-5", "tracking.wandb.name=a b", NPROC=2
    )
    assert cmd == (
        "python3 -m train.engine.agent torchrun --standalone --nnodes 1 --nproc_per_node 2 --signals-to-handle SIGTERM\\,SIGINT\\,SIGHUP\\,SIGQUIT\\,SIGUSR1 --shutdown-timeout 240 "
        "-m train --config configs/tasks/sst2.yaml "
        "train.lr=3e-5 tracking.wandb.name=a\\ b"
    )


def test_torchrun_multinode_c10d_and_static():
    cmd = dry(
        TORCHRUN,
        "--config",
        "x.yaml",
        NPROC=4,
        NNODES=2,
        NODE_RANK=1,
        MASTER_ADDR="node7",
        MASTER_PORT=1234,
        RDZV_ID=99,
    )
    assert cmd == (
        "python3 -m train.engine.agent torchrun --nnodes 2 --node_rank 1 --rdzv_backend c10d --rdzv_endpoint node7:1234 --rdzv_id 99 "
        "--nproc_per_node 4 --signals-to-handle SIGTERM\\,SIGINT\\,SIGHUP\\,SIGQUIT\\,SIGUSR1 --shutdown-timeout 240 -m train --config x.yaml"
    )
    cmd = dry(
        TORCHRUN,
        NPROC=1,
        NNODES=3,
        NODE_RANK=2,
        MASTER_ADDR="h",
        MASTER_PORT=5,
        RDZV_BACKEND="static",
        TORCHRUN_ARGS="--max_restarts 0",
    )
    assert cmd == (
        "python3 -m train.engine.agent torchrun --nnodes 3 --node_rank 2 --master_addr h --master_port 5 --nproc_per_node 1 "
        "--signals-to-handle SIGTERM\\,SIGINT\\,SIGHUP\\,SIGQUIT\\,SIGUSR1 --shutdown-timeout 240 --max_restarts 0 -m train"
    )


def test_torchrun_nproc_defaults_to_visible_gpus_else_one(tmp_path):
    # PATH without nvidia-smi: a machine without GPUs runs one process
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("awk", "sed", "grep", "dirname", "date"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run(
        [shutil.which("bash"), str(TORCHRUN)],
        env={**clean_env(DRY_RUN=1), "PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "--nproc_per_node 1 " in proc.stderr, proc.stderr
    assert "--nproc_per_node 3 " in dry(TORCHRUN, CUDA_VISIBLE_DEVICES="0,1,5")


def test_torchrun_rejects_unknown_rendezvous():
    proc = subprocess.run(
        ["bash", str(TORCHRUN)],
        env=clean_env(DRY_RUN=1, RDZV_BACKEND="etcd3"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "RDZV_BACKEND must be" in proc.stderr


def test_accelerate_config_file_and_world(tmp_path):
    cfg = REPO / "configs" / "accelerate" / "ddp.yaml"
    if not cfg.exists():
        cfg = tmp_path / "ddp.yaml"
        cfg.write_text("distributed_type: MULTI_GPU\n")
    cmd = dry(
        ACCELERATE,
        str(cfg),
        "--config",
        "configs/recipe.yaml",
        "seed=3",
        NPROC=4,
        NNODES=2,
        NODE_RANK=1,
        MASTER_ADDR="head",
        MASTER_PORT=29400,
    )
    assert cmd == (
        f"python3 -m train.engine.agent accelerate launch --config_file {cfg} --num_processes 8 --num_machines 2 --machine_rank 1 "
        "--main_process_ip head --main_process_port 29400 --rdzv_backend static -m train "
        "--config configs/recipe.yaml seed=3"
    )


def test_accelerate_without_config_file():
    assert dry(ACCELERATE, "--config", "c.yaml", NPROC=2, MASTER_PORT=1111) == (
        "python3 -m train.engine.agent accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --machine_rank 0 "
        "--main_process_ip 127.0.0.1 --main_process_port 1111 -m train --config c.yaml"
    )
    assert dry(ACCELERATE, "--config", "c.yaml", NPROC=1) == (
        "python3 -m train.engine.agent accelerate launch --num_processes 1 --num_machines 1 -m train --config c.yaml"
    )


def test_slurm_info_lands_in_the_programs_output_dir(tmp_path):
    """slurm/common.sh derives the run folder without importing torch; it must be the program's folder."""
    from train.config import load_config
    from train.config import run_folder as output_dir

    args = ["--config", str(SMOKE), f"output_dir={tmp_path}/{{task}}-{{model}}-s{{seed}}", "seed=5"]
    expected = output_dir(load_config(str(SMOKE), args[2:]))
    env = clean_env(GLUE_ROOT=REPO, SLURM_JOB_ID=123, SLURM_RESTART_COUNT=1)
    proc = subprocess.run(
        ["bash", "-c", 'source "$GLUE_ROOT/slurm/common.sh" && write_slurm_info "$@"', "x", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads((expected / "slurm_info.json").read_text())
    (start,) = info["starts"]
    assert start["restart_count"] == 1 and start["slurm"]["SLURM_JOB_ID"] == "123" and start["args"] == args
    assert len(start["git_sha"]) == 40


# ----------------------------------------------------------------------------------------------------------
# signal forwarding, with a stand-in program (no model): real torchrun, real signals


STAND_IN = r"""
import os, signal, sys, time
out = os.environ["FW_OUT"]
rank = os.environ.get("RANK", "0")
exits = os.path.join(os.environ.get("GLUE_EXIT_DIR", out), rank)  # the program's exit code, as train/cli.py
open(exits, "w").write("running")
open(f"{out}/started-{rank}", "w").write(str(os.getpid()))
if os.environ.get("FW_KILL") == rank:  # as the kernel's OOM killer would
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(float(os.environ.get("FW_DELAY", "0")))  # the relay holds a signal until the handler is set
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
child = os.fork()
if child == 0:  # like a forked DataLoader worker: torchrun signals its process group too; the inherited
    time.sleep(6)  # handler keeps it alive (train/engine/preempt.py ignores signals in forked children)
    open(f"{out}/child-{rank}", "w").write("alive")
    os._exit(0)
open(f"{out}/ready-{rank}", "w").write(str(os.getpid()))
t0 = time.time()
while not got and time.time() - t0 < 30:
    time.sleep(0.05)
os.waitpid(child, 0)
open(f"{out}/worker-{rank}", "w").write(" ".join(got) + f" {sys.argv[1:]}")
open(exits, "w").write("0")
"""


@pytest.fixture
def stand_in_repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    (root / "launch").mkdir(parents=True)
    for f in (REPO / "launch").glob("*.sh"):
        shutil.copy(f, root / "launch" / f.name)
    # the package the launchers use (train.engine.agent, train.engine.dist), its entry point a stand-in
    shutil.copytree(REPO / "train", root / "train", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (root / "train" / "__main__.py").write_text(STAND_IN)
    return root


@pytest.mark.parametrize(
    "launcher,sig,early",
    [
        ("torchrun", "USR1", False),
        ("torchrun", "TERM", False),
        ("accelerate", "USR1", False),
        ("torchrun", "USR1", True),  # signalled before the program has its handler: delivered once it has
    ],
)
def test_signal_goes_to_training_processes_only(stand_in_repo, tmp_path, launcher, sig, early):
    out = tmp_path / "out"
    out.mkdir()
    env = clean_env(NPROC=2, FW_OUT=out, PYTHONPATH=stand_in_repo, FW_DELAY=4 if early else 0)
    proc = subprocess.Popen(
        ["bash", str(stand_in_repo / "launch" / f"{launcher}.sh"), "--config", "a b", "k=v"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )  # not the repo: `-m train` would find the real package in the cwd
    t0 = time.time()
    while len(list(out.glob("started-*" if early else "ready-*"))) < 2:
        assert proc.poll() is None and time.time() - t0 < 90, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.1)
    proc.send_signal(getattr(signal, f"SIG{sig}"))
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    for rank in ("0", "1"):
        assert (out / f"worker-{rank}").read_text() == f"{sig} ['--config', 'a b', 'k=v']", output
        assert (out / f"child-{rank}").read_text() == "alive", output  # the forked child was left alone
    to = "children" if launcher == "accelerate" else "launcher"  # accelerate does not hand SIGUSR1 on
    assert f"SIG{sig} passed to the {to}: " in output


# ----------------------------------------------------------------------------------------------------------
# the real program, 2 processes on CPU (gloo)

RUN_ARGS = [
    "--config",
    str(SMOKE),
    "model.dropout=0",
    "precision=no",
    "train.per_device_batch_size=1",
    "train.log_every=1",
    "checkpoint.every_steps=40",
    "eval.predict_test=false",
]
TOTAL_STEPS = 64


def train_steps(out: Path) -> list[int]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["step"] for r in rows if "train/loss" in r]


def launch(out: Path, **knobs) -> subprocess.Popen:
    env = clean_env(NPROC=2, OMP_NUM_THREADS=1, **knobs)
    return subprocess.Popen(
        ["bash", str(TORCHRUN), *RUN_ARGS, f"output_dir={out}"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("launch") / "reference"
    proc = launch(out)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-6000:]
    return out


@pytest.mark.slow
def test_torchrun_two_processes_real_run(torchrun_reference):
    out = torchrun_reference
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["grad_accum_steps"] == 8 and info["device"] == "cpu"
    assert (out / "eval_results.json").exists() and (out / "final" / "model.safetensors").exists()
    assert train_steps(out) == list(range(1, TOTAL_STEPS + 1))


@pytest.mark.slow
def test_sigterm_checkpoint_restart_same_weights(torchrun_reference, tmp_path):
    """No SLURM: SIGTERM to the launcher -> every rank stops after the current step, checkpoints, exits 0; the
    next start resumes mid-epoch; final weights equal the uninterrupted run's, every step trained once."""
    out = tmp_path / "run"
    proc = launch(out)
    t0 = time.time()
    while not (out / "metrics.jsonl").exists() or len(train_steps(out)) < 10:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < 300
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-6000:]
    assert not (out / "eval_results.json").exists(), "the run finished instead of stopping"
    assert "Traceback" not in output and "[launcher] stopped by SIGTERM" in output, output[-6000:]
    stopped = max(train_steps(out))
    assert 10 <= stopped < TOTAL_STEPS
    assert (out / "checkpoints" / f"step-{stopped:08d}" / "COMPLETE").exists()

    proc = launch(out)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-6000:]
    assert f"at step {stopped}" in output, output[-6000:]
    assert train_steps(out) == list(range(1, TOTAL_STEPS + 1))
    a, b = load_weights(out), load_weights(torchrun_reference)
    for k in b:
        rel = float((a[k].double() - b[k].double()).norm()) / max(float(b[k].double().norm()), 1e-12)
        assert rel <= 1e-6, f"{k}: relative difference {rel:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize(("script", "nproc"), [("torchrun", 2), ("accelerate", 2), ("accelerate", 1)])
def test_an_input_error_under_a_launcher_is_one_paragraph(tmp_path, script, nproc):
    """Every rank meets the error; the user reads it once and no traceback: the agent (train/engine/agent.py)
    ends in one line and passes the exit code on, instead of torchrun's ChildFailedError table or accelerate's
    CalledProcessError (which repeated the child's stderr)."""
    missing = tmp_path / "no-glue"
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / f"{script}.sh"), *RUN_ARGS, f"output_dir={tmp_path / 'r'}"]
        + [f"data.glue_dir={missing}"],
        env=clean_env(NPROC=nproc, OMP_NUM_THREADS=1),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert len(errors) == 1 and str(missing) in errors[0], proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]
    assert proc.stderr.rstrip().splitlines()[-1].startswith("[launcher] "), proc.stderr[-4000:]


@pytest.mark.parametrize(("launcher", "nproc"), [("torchrun", 2), ("accelerate", 1)])
def test_a_killed_process_is_named_by_the_launcher(stand_in_repo, tmp_path, launcher, nproc):
    """Nothing said above: the launcher's line says which process died of what, without a traceback."""
    out = tmp_path / "out"
    out.mkdir()
    kill = str(nproc - 1)
    proc = subprocess.run(
        ["bash", str(stand_in_repo / "launch" / f"{launcher}.sh")],
        env=clean_env(NPROC=nproc, FW_OUT=out, PYTHONPATH=stand_in_repo, FW_KILL=kill),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.rstrip().splitlines()[-1]
    who = f"training process of rank {kill}" if launcher == "torchrun" else "the training process"
    assert last == f"[launcher] {who} was killed by SIGKILL (by the system: out of memory?)" + (
        "; the others were stopped" if launcher == "torchrun" else ""
    ), proc.stderr[-3000:]


ALONE = r"""
import sys, torch, torch.distributed as dist
from train.errors import DataError, guarded

def command() -> int:
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        raise DataError("bad file /x/y.tsv, line 3: fix it")  # met by rank 0 alone
    dist.all_reduce(torch.zeros(1))  # rank 1 waits for a peer that has gone
    return 0

sys.exit(guarded(command))
"""


def test_a_rank_whose_peer_failed_says_only_that_it_stopped(tmp_path):
    """Rank 0 fails alone with its error; rank 1's collective breaks. Rank 1 prints one line, not gloo's
    traceback, and the launch ends with rank 0's exit code."""
    script = tmp_path / "alone.py"
    script.write_text(ALONE)
    proc = subprocess.run(
        [sys.executable, "-m", "train.engine.agent", "torchrun", "--standalone", "--nproc_per_node", "2"]
        + [str(script)],
        env=clean_env(OMP_NUM_THREADS=1, PYTHONPATH=REPO),  # this tree's train package
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: bad file /x/y.tsv, line 3: fix it"], proc.stderr[-3000:]
    assert "[rank 1] stopped: another process of this launch ended first" in proc.stderr, proc.stderr[-3000:]
    assert "[launcher] training process of rank 0 exited 2" in proc.stderr, proc.stderr[-3000:]
