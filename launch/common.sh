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

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}
