"""Shared test helpers: run the real program (in-process or as real launcher processes) and read its outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_GLUE = REPO.parent / "shared" / "glue"
SMOKE = REPO / "configs" / "smoke.yaml"


def need_shared_glue() -> Path:
    if not (SHARED_GLUE / "SST-2" / "dev.tsv").exists():
        pytest.skip(
            f"real GLUE files not found at {SHARED_GLUE} (the ../shared checkout); skipping full-file test"
        )
    return SHARED_GLUE


@pytest.fixture(scope="session", autouse=True)
def _tokenized_cache(tmp_path_factory):
    """One tokenized-data cache per test session (CI may point GLUE_TRAIN_CACHE at a per-run folder)."""
    if "GLUE_TRAIN_CACHE" not in os.environ:
        os.environ["GLUE_TRAIN_CACHE"] = str(tmp_path_factory.mktemp("tokcache"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(launch_opts: list[str], nproc: int, args: list[str]) -> list[str]:
    """``accelerate launch <launch_opts> --num_processes N ... -m train <args>`` with this interpreter."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch_opts,
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        "-m",
        "train",
        *args,
    ]


def run_train(
    args: list[str],
    nproc: int = 1,
    launcher: str = "torchrun",
    timeout: int = 600,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``python -m train`` as a real process (or ``nproc`` processes under a real launcher)."""
    if nproc == 1 and launcher == "torchrun":
        cmd = [sys.executable, "-m", "train", *args]
    elif launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            "-m",
            "train",
            *args,
        ]
    else:
        cmd = accelerate_cmd(["--multi_gpu"], nproc, args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def load_weights(run_dir: Path, which: str = "final") -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / which / "model.safetensors"))
