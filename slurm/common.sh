# Sourced by slurm/*.sbatch (bash), which find it through $GLUE_ROOT (default: the submit directory).
# Sets ROOT, activates $ROOT/.venv when no virtual environment is active, and defines:
#   procs_per_node          PROCS_PER_NODE, else the GPUs SLURM gave this node (SLURM_GPUS_ON_NODE), else 1
#   write_slurm_info ARGS   appends this start (job ids, restart count, nodes, git SHA, command) to
#                           <output_dir>/slurm_info.json; ARGS are the program's arguments (--config FILE k=v ...)
#   job_banner              one log line per start (requeued starts append to the same log: --open-mode=append)

ROOT=${GLUE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $ROOT/launch/torchrun.sh || ! -d $ROOT/train ]]; then
    echo "slurm: $ROOT is not the repository root; submit from it or set GLUE_ROOT" >&2
    exit 2
fi
if [[ -z ${VIRTUAL_ENV:-} && -f $ROOT/.venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    source "$ROOT/.venv/bin/activate"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck source=launch/forward_signals.sh
source "$ROOT/launch/forward_signals.sh"

procs_per_node() {
    if [[ -n ${PROCS_PER_NODE:-} ]]; then
        echo "$PROCS_PER_NODE"
    elif [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} != 0 ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    else
        echo "slurm: no GPUs allocated and PROCS_PER_NODE unset: 1 process per node" >&2
        echo 1
    fi
}

job_banner() {
    echo "=== $(date -u +%FT%TZ) job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})}" \
        "restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}: $*" >&2
}

write_slurm_info() {
    # never fails the job: a problem here is reported and the run goes on (the program validates the config)
    python3 - "$@" <<'PY' || echo "slurm: could not write slurm_info.json (see above); continuing" >&2
import datetime, json, os, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
config, overrides, i = None, [], 0
while i < len(args):
    a = args[i]
    if a == "--config" and i + 1 < len(args):
        config, i = args[i + 1], i + 2
        continue
    if a.startswith("--config="):
        config = a.split("=", 1)[1]
    elif "=" in a and not a.startswith("-"):
        overrides.append(a)
    i += 1
from train.config import load_config  # light; train.loop would import torch (seconds per start)

cfg = load_config(config, overrides)
# the same folder as train.loop.output_dir (tests/test_launchers.py checks they agree)
model = Path(cfg.model.name_or_path.replace("builtin:", "")).name
out = Path(cfg.output_dir.format(task=cfg.data.task, model=model, seed=cfg.seed))
root = os.environ["ROOT"]

def git(*cmd):
    r = subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None

env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("SLURM_") and k in {
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
    "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT", "SLURM_JOB_QOS",
    "SLURM_CLUSTER_NAME", "SLURM_SUBMIT_DIR", "SLURM_SUBMIT_HOST", "SLURM_GPUS_ON_NODE", "SLURM_CPUS_ON_NODE",
    "SLURM_JOB_GPUS", "SLURM_MEM_PER_NODE", "SLURM_TIMELIMIT"}}
start = {
    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    "batch_host": os.uname().nodename,
    "procs_per_node": int(os.environ.get("GLUE_PROCS_PER_NODE", "0")) or None,
    "script": os.environ.get("GLUE_SBATCH"),
    "args": args,
    "git_sha": git("rev-parse", "HEAD"),
    "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "slurm": env,
}
out.mkdir(parents=True, exist_ok=True)
path = out / "slurm_info.json"
info = json.loads(path.read_text()) if path.exists() else {"starts": []}
info["starts"].append(start)
info.update(job_id=env.get("SLURM_JOB_ID"), git_sha=start["git_sha"], restarts=start["restart_count"])
tmp = path.with_suffix(".json.tmp")
tmp.write_text(json.dumps(info, indent=1) + "\n")
tmp.replace(path)
print(f"slurm: wrote {path}", file=sys.stderr)
PY
}
export ROOT
