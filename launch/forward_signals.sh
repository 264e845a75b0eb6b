# Sourced by launch/*.sh and slurm/*.sbatch (bash). Signal forwarding for the preemption path.
#
#   run_forwarding CMD [ARGS...]
# starts CMD in the background with SIGUSR1 ignored (so a launcher like torchrun, whose default SIGUSR1 action is
# to die, survives it; the training processes install their own handler), and forwards every SIGUSR1/SIGTERM this
# shell receives. Returns CMD's exit status.
#
# Where the signal goes (FORWARD_TO):
#   workers (default)  the training processes among CMD's descendants: processes started as `python ... -m train`
#                      whose parent is not one (so DataLoader workers forked from them are left alone).
#   child              CMD itself (e.g. srun, which relays the signal to its tasks on every node).
# SIGUSR1 reaches each target once, when it has a handler for it (SigCgt in /proc/PID/status): a training process
# that is still starting ignores SIGUSR1 (inherited "ignore"), so the signal waits (checked every second) until it
# has installed its handler. Never sending it twice matters: Python restores the default action while it exits,
# and a late repeat would kill a process that has already checkpointed. SIGTERM is forwarded at once, every time.
# A signal that arrives in the first FORWARD_GRACE seconds (0) is held until then.
# A script that must not lose a SIGUSR1 that arrives before run_forwarding starts sets, as its first line,
#   trap '_FS_EARLY=USR1' USR1

_fs_log() { echo "[forward_signals $(date -u +%H:%M:%S)] $*" >&2; }

# (explicit `return 0/1` everywhere: these run inside trap handlers, where a bare `return` reports the status
# of the command the trap interrupted)
_fs_is_worker() {  # pid: argv looks like `python [options] -m train ...`
    local -a a
    local i
    [[ -r /proc/$1/cmdline ]] || return 1
    mapfile -d '' -t a <"/proc/$1/cmdline" 2>/dev/null || return 1
    for ((i = 1; i < ${#a[@]}; i++)); do
        case ${a[i]} in
            -m) [[ ${a[i + 1]:-} == train ]] && return 0 || return 1 ;;
            -*) ;;
            *) return 1 ;;
        esac
    done
    return 1
}

_fs_descendants() {
    local c
    for c in $(pgrep -P "$1" 2>/dev/null); do
        echo "$c"
        _fs_descendants "$c"
    done
    return 0
}

training_pids() {  # root pid -> the training processes below it
    local p pp
    for p in $(_fs_descendants "$1"); do
        _fs_is_worker "$p" || continue
        pp=$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ')
        [[ -n $pp ]] && _fs_is_worker "$pp" && continue
        echo "$p"
    done
    return 0
}

_fs_targets() {
    if [[ ${FORWARD_TO:-workers} == child ]]; then
        echo "$_FS_CHILD"
    else
        training_pids "$_FS_CHILD"
    fi
    return 0
}

_fs_catches() {  # pid signum: 0 when the process has a handler installed for the signal (SigCgt)
    local mask
    mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
    [[ $mask =~ ^[0-9a-fA-F]+$ ]] || return 1
    (((16#$mask >> ($2 - 1)) & 1)) && return 0 || return 1
}

_fs_deliver_usr1() {  # SIGUSR1, once, to every target that handles it now; sets _FS_SENT, _FS_WAITING
    local p
    _FS_SENT="" _FS_WAITING=""
    for p in $(_fs_targets); do
        [[ $_FS_USR1_DONE == *" $p "* ]] && continue
        # srun takes its signals with sigwait (blocked, not "caught"): child mode sends without the check
        if [[ ${FORWARD_TO:-workers} == child ]] || _fs_catches "$p" "$_FS_USR1_NUM"; then
            kill -s USR1 "$p" 2>/dev/null && _FS_USR1_DONE+="$p " && _FS_SENT+="$p "
        else
            _FS_WAITING+="$p "
        fi
    done
    return 0
}

_fs_on() {  # SIG
    if ((SECONDS - _FS_T0 < ${FORWARD_GRACE:-0})); then
        _fs_log "SIG$1 received during startup: held for ${FORWARD_GRACE}s"
        [[ $1 == USR1 ]] && _FS_PENDING=USR1
        [[ $1 == TERM ]] && _FS_PENDING_TERM=1
        return 0
    fi
    if [[ $1 == USR1 ]]; then
        _FS_PENDING=USR1
        _fs_deliver_usr1
        _fs_log "SIGUSR1 received: forwarded to ${FORWARD_TO:-workers} [ $_FS_SENT]${_FS_WAITING:+, later to [ $_FS_WAITING] (no handler yet)}"
    else
        local p sent=""
        for p in $(_fs_targets); do kill -s "$1" "$p" 2>/dev/null && sent+="$p "; done
        _fs_log "SIG$1 received: forwarded to ${FORWARD_TO:-workers} [ $sent]"
    fi
    return 0
}

run_forwarding() {
    _FS_PENDING="" _FS_PENDING_TERM="" _FS_T0=$SECONDS _FS_USR1_DONE=" " _FS_USR1_NUM=$(kill -l USR1)
    if [[ -n ${_FS_EARLY:-} ]]; then   # set by a caller's early `trap '_FS_EARLY=USR1' USR1`
        _fs_log "SIGUSR1 received before the launch: forwarding it once the training processes run"
        _FS_PENDING=USR1
    fi
    trap '' USR1
    "$@" &
    _FS_CHILD=$!
    trap '_fs_on USR1' USR1
    trap '_fs_on TERM' TERM
    local rc=0 s
    while kill -0 "$_FS_CHILD" 2>/dev/null; do
        sleep 1 &
        s=$!
        wait "$s" 2>/dev/null || true
        kill "$s" 2>/dev/null || true
        ((SECONDS - _FS_T0 < ${FORWARD_GRACE:-0})) && continue
        if [[ -n $_FS_PENDING_TERM ]]; then
            _FS_PENDING_TERM=""
            _fs_on TERM
        fi
        if [[ -n $_FS_PENDING ]]; then
            _fs_deliver_usr1
            [[ -n $_FS_SENT ]] && _fs_log "SIGUSR1 forwarded to [ $_FS_SENT] (handler installed now)"
        fi
    done
    wait "$_FS_CHILD" || rc=$?
    trap - USR1 TERM
    return "$rc"
}
