#!/usr/bin/env bash
# Start `glue-train train` under torchrun. Knobs are environment variables; every argument goes to the program.
#
#   bash launch/torchrun.sh --config configs/tasks/sst2.yaml              # all GPUs of this machine
#   NPROC=2 bash launch/torchrun.sh --config configs/smoke.yaml           # 2 processes (CPU/gloo without a GPU)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 MASTER_PORT=29500 bash launch/torchrun.sh --config ...   # on each node
#
# Knobs (default):
#   NPROC          processes on this node (the GPUs: CUDA_VISIBLE_DEVICES / nvidia-smi; 1 without a GPU)
#   NNODES         nodes (1). With 1 node torchrun runs --standalone (a free local port, no clashes).
#   NODE_RANK      this node's rank (0)
#   MASTER_ADDR    rendezvous host, the head node (127.0.0.1)
#   MASTER_PORT    rendezvous port (29500)
#   RDZV_BACKEND   c10d (default for NNODES > 1) or static (uses NODE_RANK, MASTER_ADDR, MASTER_PORT as given)
#   RDZV_ID        rendezvous id shared by all nodes of one run ($SLURM_JOB_ID or "glue")
#   TORCHRUN       torchrun command ("python3 -m train.engine.agent torchrun": torchrun in-process, ending in one
#                  line and the training processes' exit code instead of its traceback; "torchrun" works too)
#   TORCHRUN_ARGS  extra torchrun options, word-split (e.g. "--max_restarts 0 --log_dir logs")
#   STOP_SIGNALS   the signals torchrun hands to the training processes (SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1)
#   SHUTDOWN_TIMEOUT seconds torchrun gives them after such a signal to write their checkpoint, then SIGKILL (240;
#                  less than the 300 s of the sbatch scripts' --signal=B:USR1@300)
#   RELAY          1: torchrun under launch/relay.sh: signals sent to this script reach it, one that comes before
#                  it is ready is held, and after a stop the exit code is the training processes'. 0: exec torchrun.
#   DRY_RUN        1: print the resolved command and exit
# The batch size arithmetic lives in the program (it derives gradient accumulation from the world size).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# `-m train` must import this checkout even when started from elsewhere (e.g. a SLURM spool dir)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"

NPROC=${NPROC:-$(count_gpus)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-glue}}
STOP_SIGNALS=${STOP_SIGNALS:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
RELAY=${RELAY:-1}
read -r -a launcher <<<"${TORCHRUN:-python3 -m train.engine.agent torchrun}"
read -r -a extra <<<"${TORCHRUN_ARGS:-}"

if [[ $NNODES == 1 ]]; then
    RDZV_BACKEND=${RDZV_BACKEND:-standalone}
else
    RDZV_BACKEND=${RDZV_BACKEND:-c10d}
fi
case $RDZV_BACKEND in
    standalone) rdzv=(--standalone --nnodes 1) ;;
    c10d) rdzv=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --rdzv_backend c10d
                --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID") ;;
    static) rdzv=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
                  --master_port "$MASTER_PORT") ;;
    *) echo "launch/torchrun.sh: RDZV_BACKEND must be standalone, c10d or static, not '$RDZV_BACKEND'" >&2; exit 2 ;;
esac

cmd=("${launcher[@]}" "${rdzv[@]}" --nproc_per_node "$NPROC" --signals-to-handle "$STOP_SIGNALS"
     --shutdown-timeout "$SHUTDOWN_TIMEOUT" "${extra[@]}" -m train "$@")
echo "+ $(printf '%q ' "${cmd[@]}")" | sed 's/ $//' >&2
[[ ${DRY_RUN:-0} == 1 ]] && exit 0

# shellcheck source=launch/relay.sh
source "$ROOT/launch/relay.sh"
if [[ $RELAY == 1 ]]; then
    RELAY_TO=launcher run_relayed "${cmd[@]}"
else
    exec "${cmd[@]}"
fi
