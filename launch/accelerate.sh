#!/usr/bin/env bash
# Start `glue-train train` under `accelerate launch`. Knobs are environment variables; an optional first argument
# names an Accelerate config file (configs/accelerate/*.yaml: DDP or DeepSpeed ZeRO); everything else goes to the
# program unchanged.
#
#   bash launch/accelerate.sh configs/accelerate/ddp.yaml --config configs/recipe.yaml
#   NPROC=2 bash launch/accelerate.sh --config configs/smoke.yaml         # 2 processes (CPU/gloo without a GPU)
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node01 bash launch/accelerate.sh configs/accelerate/zero2.yaml --config ...
#
# Knobs (default):
#   ACCELERATE_CONFIG  Accelerate config file (the first argument when it is an existing .yaml/.yml/.json file;
#                      none: plain DDP, `--multi_gpu` when there is more than one process)
#   NPROC          processes on this node (the GPUs: CUDA_VISIBLE_DEVICES / nvidia-smi; 1 without a GPU)
#   NNODES         nodes (1)
#   NODE_RANK      this node's rank (0)
#   MASTER_ADDR    head node (127.0.0.1)
#   MASTER_PORT    head node port (a free local port with 1 node, else 29500)
#   RDZV_BACKEND   static (default) or c10d, for more than one node
#   ACCELERATE     launcher command ("python3 -m train.engine.agent accelerate": accelerate in-process, ending in
#                  one line and the training processes' exit code instead of its traceback; "accelerate" works too)
#   ACCELERATE_ARGS extra `accelerate launch` options, word-split (e.g. "--mixed_precision bf16")
#   RELAY          1: SIGUSR1/SIGTERM sent to this script go to the training processes (launch/relay.sh; accelerate
#                  does not hand SIGUSR1 on: they are its children and get it from the relay). 0: exec accelerate.
#   DRY_RUN        1: print the resolved command and exit
# `--num_processes` is the total over all nodes (NPROC x NNODES), as Accelerate wants; the batch size arithmetic
# lives in the program (it derives gradient accumulation from the world size).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"

if [[ $# -gt 0 && $1 != -* && -f $1 && $1 =~ \.(ya?ml|json)$ ]]; then
    ACCELERATE_CONFIG=$1
    shift
fi
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-}
NPROC=${NPROC:-$(count_gpus)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [[ -z ${MASTER_PORT:-} ]]; then
    if [[ $NNODES == 1 && ${DRY_RUN:-0} != 1 ]]; then MASTER_PORT=$(free_port); else MASTER_PORT=29500; fi
fi
RDZV_BACKEND=${RDZV_BACKEND:-static}
RELAY=${RELAY:-1}
read -r -a launcher <<<"${ACCELERATE:-python3 -m train.engine.agent accelerate}"
read -r -a extra <<<"${ACCELERATE_ARGS:-}"

world=$((NPROC * NNODES))
opts=()
if [[ -n $ACCELERATE_CONFIG ]]; then
    opts+=(--config_file "$ACCELERATE_CONFIG")
elif ((world > 1)); then
    opts+=(--multi_gpu)   # also the way to get N gloo processes on CPU (`--cpu` would start one)
fi
opts+=(--num_processes "$world" --num_machines "$NNODES")
if ((world > 1)); then
    opts+=(--machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
    ((NNODES > 1)) && opts+=(--rdzv_backend "$RDZV_BACKEND")
fi

cmd=("${launcher[@]}" launch "${opts[@]}" "${extra[@]}" -m train "$@")
echo "+ $(printf '%q ' "${cmd[@]}")" | sed 's/ $//' >&2
[[ ${DRY_RUN:-0} == 1 ]] && exit 0

# shellcheck source=launch/relay.sh
source "$ROOT/launch/relay.sh"
if [[ $RELAY == 1 ]]; then
    RELAY_TO=children run_relayed "${cmd[@]}"
else
    trap '' USR1 # inherited as "ignored" by the launcher; the training processes install their own handler
    exec "${cmd[@]}"
fi
