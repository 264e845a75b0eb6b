# Sourced by launch/torchrun.sh and launch/accelerate.sh (bash): what both launchers need to know about this node.
#   count_gpus   GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list, else 1 (CPU)
#   free_port    a TCP port nobody listens on right now (for a one-node rendezvous)

count_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != "-1" ]]; then
        awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 1
    fi
}

free_port() {  # the one helper for it: train/engine/dist.py (the launchers set PYTHONPATH to the repository)
    python3 -c 'from train.engine.dist import free_port; print(free_port())' ||
        { echo "launch: python3 cannot import train (activate the project's virtual environment)" >&2; return 1; }
}
