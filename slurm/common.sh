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
# shellcheck source=launch/relay.sh
source "$ROOT/launch/relay.sh"

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
    python3 -m train slurm-info "$@" || echo "slurm: could not write slurm_info.json (see above); continuing" >&2
}
export ROOT
