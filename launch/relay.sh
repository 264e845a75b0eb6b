# Sourced by launch/*.sh and slurm/*.sbatch (bash): stop signals for a launcher that hands them on itself.
#
# torchrun (and `accelerate launch`, which runs torchrun's agent) passes SIGTERM/SIGINT/SIGUSR1 to the training
# processes (--signals-to-handle / TORCHELASTIC_SIGNALS_TO_HANDLE) and waits for them to write their checkpoint
# (--shutdown-timeout / TORCH_ELASTIC_SHUTDOWN_TIMEOUT) before SIGKILL. srun passes its signals to its tasks.
# What they do not do, and `run_relayed CMD [ARGS...]` does (CMD runs in the background):
#   - hear a signal meant for this shell: SLURM's --signal=B:... and `scancel --batch` reach the batch shell only;
#     this shell's SIGUSR1/SIGTERM go to CMD (Ctrl-C reaches every process of the terminal's group itself);
#   - keep a signal that comes too early: until CMD (and the training processes it started, its children) handle
#     it, the signal is held here, so a launcher or a process still starting is never killed by it (a signal that
#     came before run_relayed ran is passed in as RELAY_PENDING=USR1|TERM); RELAY_GRACE seconds (0) after
#     CMD starts, it is held too (srun's tasks set their own traps only then);
#   - exit with the training processes' status: after a signal the agents (torchrun, accelerate; run by
#     train/engine/agent.py) exit 128+N whatever they did. Each process writes its exit code to $GLUE_EXIT_DIR/<rank>
#     (train/cli.py); when all of them say 0, so does run_relayed.
# RELAY_TO says who gets the signal: `cmd` (the default: srun), `launcher` (CMD, once it and the training
# processes it started, its children, all handle it: torchrun) or `children` (CMD's children themselves: for
# `accelerate launch`, which does not hand SIGUSR1 on; its agent keeps torchrun's default list).
# Returns CMD's exit status otherwise.

_relay_log() { echo "[relay $(date -u +%H:%M:%S)] $*" >&2; }

_relay_handles() {  # pid signal-number: 0 when the process catches or blocks (srun: sigwait) the signal
    local cgt blk
    cgt=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
    blk=$(awk '/^SigBlk:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
    [[ $cgt =~ ^[0-9a-fA-F]+$ && $blk =~ ^[0-9a-fA-F]+$ ]] || return 1
    ((((16#$cgt | 16#$blk) >> ($2 - 1)) & 1)) && return 0 || return 1
}

_relay_targets() {
    if [[ ${RELAY_TO:-cmd} == children ]]; then pgrep -P "$_RELAY_CHILD" 2>/dev/null; else echo "$_RELAY_CHILD"; fi
    return 0
}

_relay_ready() {  # signal-name: every process the signal reaches (the targets, the children) handles it
    local p num children
    num=$(kill -l "$1")
    ((SECONDS - _RELAY_T0 >= ${RELAY_GRACE:-0})) || return 1
    children=""
    if [[ ${RELAY_TO:-cmd} != cmd ]]; then
        children=$(pgrep -P "$_RELAY_CHILD" 2>/dev/null)
        [[ -n $children ]] || return 1
    fi
    for p in $(_relay_targets) $children; do
        _relay_handles "$p" "$num" || return 1
    done
    return 0
}

run_relayed() {
    local rc=0 s code all_zero=1 n=0 f
    _RELAY_PENDING=${RELAY_PENDING:-} _RELAY_SENT="" _RELAY_T0=$SECONDS
    GLUE_EXIT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/glue-exit.XXXXXX")
    export GLUE_EXIT_DIR
    trap '' USR1 # CMD starts with SIGUSR1 ignored (its default action kills); it installs its own handler
    "$@" &
    _RELAY_CHILD=$!
    for s in USR1 TERM; do
        # shellcheck disable=SC2064  # the signal name is fixed now
        trap "_RELAY_PENDING=$s" "$s"
    done
    while kill -0 "$_RELAY_CHILD" 2>/dev/null; do
        if [[ -n $_RELAY_PENDING ]] && _relay_ready "$_RELAY_PENDING"; then
            _RELAY_WHAT=$(ps -o args= -p "$_RELAY_CHILD" | cut -c1-80)
            # shellcheck disable=SC2046  # one pid per word
            kill -s "$_RELAY_PENDING" $(_relay_targets) 2>/dev/null &&
                _relay_log "SIG$_RELAY_PENDING passed to the ${RELAY_TO:-cmd}: $_RELAY_WHAT"
            _RELAY_SENT=$_RELAY_PENDING _RELAY_PENDING=""
        fi
        sleep 0.2 &
        wait $! 2>/dev/null || true # a trapped signal ends the wait at once
    done
    wait "$_RELAY_CHILD" || rc=$?
    trap - USR1 TERM
    if [[ -n $_RELAY_SENT && $rc != 0 ]]; then
        for f in "$GLUE_EXIT_DIR"/*; do
            [[ -f $f ]] || continue
            n=$((n + 1))
            code=$(<"$f")
            [[ $code == 0 ]] || all_zero=0
        done
        if ((n > 0 && all_zero)); then
            _relay_log "${_RELAY_WHAT%% *} exited $rc after SIG$_RELAY_SENT; its $n training process(es) stopped cleanly: exit 0"
            rc=0
        fi
    fi
    rm -rf "$GLUE_EXIT_DIR"
    return "$rc"
}
