"""``glue-train slurm-info ARGS``: append this SLURM start to ``<output_dir>/slurm_info.json``.

Called by ``slurm/common.sh`` (``write_slurm_info``) before the program starts, with the program's own arguments
(``--config FILE [--config FILE ...] key.sub=value ...``), so the record lands in the run folder the program will
use (``train.config.run_folder``). Light on purpose: no torch import (it runs on every start of every job).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from train.config import load_config, run_folder
from train.errors import FolderInUse, guarded
from train.tracking.provenance import git_info

SLURM_KEYS = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
    "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT", "SLURM_JOB_QOS",
    "SLURM_CLUSTER_NAME", "SLURM_SUBMIT_DIR", "SLURM_SUBMIT_HOST", "SLURM_GPUS_ON_NODE", "SLURM_CPUS_ON_NODE",
    "SLURM_JOB_GPUS", "SLURM_MEM_PER_NODE", "SLURM_TIMELIMIT",
)  # fmt: skip


def start_record(args: list[str], root: str) -> dict:
    """What this start of the job was: time, SLURM ids (never other environment variables), command, git SHA."""
    env = {k: os.environ[k] for k in SLURM_KEYS if k in os.environ}
    git = git_info(Path(root))
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "batch_host": os.uname().nodename,
        "procs_per_node": int(os.environ.get("GLUE_PROCS_PER_NODE", "0")) or None,
        "script": os.environ.get("GLUE_SBATCH"),
        "args": args,
        "git_sha": git.get("sha"),
        "git_dirty": bool(git.get("dirty")),
        "slurm": env,
    }


def append(out: Path, start: dict) -> Path | None:
    """Add ``start`` to the run folder's record; a folder that is not this program's is left alone."""
    from train.folders import lock
    from train.folders.runfolder import entries, is_own_folder

    if out.exists() and entries(out) and not is_own_folder(out):
        return None  # the program itself refuses such a folder, with the reason
    # never into a folder another run holds (raises FolderInUse; the program itself then refuses to start)
    with lock.holding(
        out, "slurm-info", what=f"output_dir {out}", advice="not recording this start", wait_s=30
    ):
        return _append(out, start)


def _append(out: Path, start: dict) -> Path:
    from train.files import write_atomic
    from train.folders.runfolder import mark

    mark(out)
    path = out / "slurm_info.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        info = {"starts": []}
    info.setdefault("starts", []).append(start)
    info.update(
        job_id=start["slurm"].get("SLURM_JOB_ID"), git_sha=start["git_sha"], restarts=start["restart_count"]
    )
    write_atomic(path, json.dumps(info, indent=1) + "\n")
    return path


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="glue-train slurm-info",
        description="Record this SLURM job start in the run folder the training arguments name "
        "(the sbatch scripts call it with the job's own arguments).",
    )
    parser.add_argument("--config", action="append", default=[], help="as for glue-train train")
    known, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    out = run_folder(load_config(known.config, overrides))
    try:
        path = append(
            out, start_record(argv, os.environ.get("ROOT", str(Path(__file__).resolve().parents[2])))
        )
    except FolderInUse as e:
        print(f"slurm: {e}", file=sys.stderr)
        return 0
    print(
        f"slurm: wrote {path}" if path else f"slurm: {out} is not a run folder; not writing there",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``glue-train slurm-info``; errors through the CLI's one boundary."""
    return guarded(lambda: _main(argv))
