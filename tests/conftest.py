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
# Before any test module imports huggingface_hub (it reads these once, at import): nothing is downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def free_port() -> int:
    from train.engine.dist import free_port as port

    return port()


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


class Zygote:
    """Client of ``tests/zygote.py``: single-process runs forked from a warm interpreter (see its docstring)."""

    def __init__(self) -> None:
        import json
        import threading

        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "zygote.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=self.env,
        )
        first = self.proc.stdout.readline()
        if json.loads(first or b"{}").get("ready") is not True:
            raise RuntimeError(f"tests/zygote.py did not start: {first!r}")
        self.lock, self.ids, self.done = threading.Lock(), 0, {}
        self.events: dict[int, threading.Event] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        import json

        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.lock:
                self.done[msg["id"]] = msg["rc"]
                event = self.events.get(msg["id"])
            if event:
                event.set()

    def usable(self, env: dict) -> bool:
        from zygote import IMPORT_TIME_PREFIXES, SET_AT_RUN_TIME

        keys = {
            k for k in (*env, *self.env) if k.startswith(IMPORT_TIME_PREFIXES) and k not in SET_AT_RUN_TIME
        }
        differ = sorted(k for k in keys if env.get(k) != self.env.get(k))
        if differ and os.environ.get("GLUE_TEST_ZYGOTE_DEBUG"):
            print(f"zygote: a fresh interpreter for this run ({', '.join(differ)} differ)", file=sys.stderr)
        return self.proc.poll() is None and not differ

    def run(self, argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        import json
        import tempfile
        import threading

        with self.lock:
            self.ids += 1
            rid = self.ids
            event = self.events[rid] = threading.Event()
        folder = Path(tempfile.mkdtemp(prefix="zygote-"))
        out, err = folder / "out", folder / "err"
        req = {"id": rid, "argv": argv, "env": env, "cwd": str(REPO), "out": str(out), "err": str(err)}
        with self.lock:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        if not event.wait(timeout):
            raise subprocess.TimeoutExpired(["python", "-m", "train", *argv], timeout)
        with self.lock:
            rc = self.done.pop(rid)
        text = (out.read_text(errors="replace"), err.read_text(errors="replace"))
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        return subprocess.CompletedProcess(["python", "-m", "train", *argv], rc, *text)


_zygote: Zygote | None = None


def _single_process(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``python -m train ARGS`` in its own process: forked from the warm interpreter where that is the same."""
    global _zygote
    if os.environ.get("GLUE_TEST_NO_ZYGOTE") != "1":
        if _zygote is None:
            try:
                _zygote = Zygote()
            except RuntimeError as e:  # e.g. an import fails: every run then shows why, as a fresh process
                os.environ["GLUE_TEST_NO_ZYGOTE"] = "1"
                print(f"warning: {e}; running each program in a fresh interpreter", file=sys.stderr)
                return _single_process(args, env, timeout)
        if _zygote.usable(env):
            return _zygote.run(args, env, timeout)
    cmd = [sys.executable, "-m", "train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_train(
    args: list[str],
    nproc: int = 1,
    launcher: str = "torchrun",
    timeout: int = 600,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``python -m train`` as a real process (or ``nproc`` processes under a real launcher)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc == 1 and launcher == "torchrun":
        cmd = [sys.executable, "-m", "train", *args]
        proc = _single_process(args, full_env, timeout)
    else:
        if launcher == "torchrun":
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
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def load_weights(run_dir: Path, which: str = "final") -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / which / "model.safetensors"))


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, Path]:
    """Tiny random encoders of every family with real-format tokenizers (tests/families.py), built once."""
    from families import build_all

    return build_all(tmp_path_factory.mktemp("families"))
