"""A warm interpreter that forks one process per ``python -m train`` run of the tests.

Importing torch, transformers, accelerate and datasets takes ~4 s of every tiny test run. This server imports
them once, then, per request, forks a child that sets the request's working directory and environment, points
its stdin/stdout/stderr at files, and calls ``train.cli.main(argv)`` exactly as ``python -m train`` does; the
child's exit status is the run's exit code. The server itself never computes anything (no thread pools exist
when it forks). Runs whose environment differs from the server's in variables read at import time (``HF_*``,
``TRANSFORMERS_*``, ``TORCH*``, ...) are not sent here: ``conftest.run_train`` starts a fresh interpreter for
them. ``GLUE_TEST_NO_ZYGOTE=1`` turns the server off.

Protocol: one JSON request per line on stdin ``{"id", "argv", "env", "cwd", "out", "err"}``; one JSON line per
finished child on stdout ``{"id", "rc"}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Read when these packages are imported: a request that changes them needs a fresh interpreter.
IMPORT_TIME_PREFIXES = (
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS_",
    "TORCH_",
    "PYTORCH_",
    "PYTHON",
    "OMP_",
    "MKL_",
    "CUDA",
)
# Set in the test process by the program itself or its libraries when a test calls them in-process (the program
# sets the first in every run anyway; the second is accelerate's, for CUDA machines): not a reason to re-import.
SET_AT_RUN_TIME = ("HF_DATASETS_DISABLE_PROGRESS_BARS", "PYTORCH_NVML_BASED_CUDA_CHECK")


def _child(req: dict) -> None:
    try:
        os.setsid()  # its own session: a test may signal the run's process group
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, target in ((stdin, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
        sys.argv = ["python -m train", *req["argv"]]
        from train.cli import main

        rc = main(req["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a real bug: show it as python -m train would
        import traceback

        traceback.print_exc()
        rc = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc or 0)


FAMILY_MODULES = (
    "bert",
    "roberta",
    "xlm_roberta",
    "distilbert",
    "deberta_v2",
    "electra",
    "albert",
    "modernbert",
    "mpnet",
)


def _warm_imports() -> None:
    """Import what every run imports (transformers and accelerate load most of it lazily, on first use)."""
    import importlib
    import importlib.util

    import accelerate.utils  # noqa: F401
    import datasets  # noqa: F401
    import torch.distributed.tensor  # noqa: F401
    import transformers
    from accelerate import Accelerator  # noqa: F401
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

    import train.cli
    import train.data.metrics  # noqa: F401
    import train.engine.loop  # noqa: F401
    import train.outputs.hooks  # noqa: F401

    for name in FAMILY_MODULES:
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        importlib.import_module(f"transformers.models.{name}.configuration_{name}")
    transformers.modeling_utils.PreTrainedModel  # noqa: B018
    train.cli.setup_logging  # noqa: B018
    # the end of every run: model cards (huggingface_hub) and curves.png (matplotlib, optional)
    import huggingface_hub.repocard  # noqa: F401

    if importlib.util.find_spec("matplotlib") is not None:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401


def serve() -> None:
    """Single-threaded on purpose: a fork from a process with other threads could inherit a held lock."""
    import select

    # the checkout this file is in, as ``python -m train`` run from its root would import it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _warm_imports()

    def send(msg: dict) -> None:
        os.write(1, (json.dumps(msg) + "\n").encode())

    send({"ready": True})
    children: dict[int, int] = {}  # pid -> request id
    buf, open_ = b"", True
    while open_ or children:
        ready, _, _ = select.select([0] if open_ else [], [], [], 0.05)
        if ready:
            chunk = os.read(0, 65536)
            open_ = bool(chunk)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(req)
                children[pid] = req["id"]
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                send({"id": children.pop(pid), "rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
