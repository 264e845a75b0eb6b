#!/usr/bin/env bash
# A real, loopback-only SLURM cluster on this one machine, for the `slurm` tests.
#
#   tests/slurm/cluster.sh start    # install (apt, Debian 12) if missing, configure, start, wait until idle
#   tests/slurm/cluster.sh status   # exit 0 when our daemons run and both nodes answer
#   tests/slurm/cluster.sh stop     # cancel jobs, stop only the daemons we started, undo every change
#
# Two emulated nodes n1, n2 on this host (Debian's slurmd has multiple-slurmd support), partitions
#   debug (default), low (PriorityTier=1, GraceTime=15, preempted by REQUEUE), high (preempts low).
# No systemd: munged, slurmctld and two slurmd are started by hand; their PID files live in $STATE_DIR.
# What it changes outside $STATE_DIR, and undoes on stop:
#   /etc/slurm/slurm.conf, /etc/slurm/gres.conf   (existing ones are moved aside and restored; gres.conf gives
#                           each node 2 pretend GPUs without device files, so SLURM_GPUS_ON_NODE can be tested)
#   /etc/hosts              (one line `127.0.0.1 n1 n2 # glue-slurm-test`, so c10d rendezvous can resolve them)
# Knobs: SLURM_TEST_DIR (state; default: the running cluster's, else /tmp/glue-slurm), SLURM_TEST_TIMEOUT (s to wait
# for idle nodes, 60).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
MARK="# glue-slurm-test"
STATE_DIR=${SLURM_TEST_DIR:-}
if [[ -z $STATE_DIR && -f $CONF ]] && grep -q "^$MARK" "$CONF"; then
    # a cluster we started earlier (maybe with another SLURM_TEST_DIR): its state dir is in our config
    STATE_DIR=$(sed -n 's|^StateSaveLocation=\(.*\)/ctld$|\1|p' "$CONF")
fi
STATE_DIR=${STATE_DIR:-/tmp/glue-slurm}
HOSTS_LINE="127.0.0.1 n1 n2 $MARK"
NODES=(n1 n2)
TIMEOUT=${SLURM_TEST_TIMEOUT:-60}

log() { echo "[cluster.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (installs packages, starts daemons)"; }

install_packages() {
    local missing=0 b
    for b in slurmctld slurmd sbatch munged; do
        command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "slurm/munge missing and no apt-get (Debian 12 expected)"
    log "installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

# pid from a pid file if that process is alive and runs the expected program
live_pid() {  # file program
    local f=$1 prog=$2 pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    grep -qa -- "$prog" "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

write_conf() {
    local host
    host=$(hostname -s)
    mkdir -p "$STATE_DIR"/{ctld,log,spool} /etc/slurm
    if [[ -e $CONF ]] && ! grep -q "^$MARK" "$CONF"; then
        [[ -e $STATE_DIR/slurm.conf.orig ]] || cp -p "$CONF" "$STATE_DIR/slurm.conf.orig"
    fi
    cat >"$CONF" <<EOF
$MARK: written by tests/slurm/cluster.sh, removed by \`cluster.sh stop\`
ClusterName=gluetest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
CommunicationParameters=NoInAddrAny
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=4
KillWait=5
InactiveLimit=0
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
GresTypes=gpu
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=4 RealMemory=8000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=low Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=15
PartitionName=high Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    # two pretend GPUs per node (no device files): SLURM_GPUS_ON_NODE is set for jobs that ask for them; the
    # processes still run on CPU
    if [[ -e $GRES_CONF ]] && ! grep -q "^$MARK" "$GRES_CONF"; then
        [[ -e $STATE_DIR/gres.conf.orig ]] || cp -p "$GRES_CONF" "$STATE_DIR/gres.conf.orig"
    fi
    printf '%s\n%s\n' "$MARK: written by tests/slurm/cluster.sh, removed by \`cluster.sh stop\`" \
        "NodeName=n[1-2] Name=gpu File=/dev/null,/dev/zero" >"$GRES_CONF"
    if ! grep -q "$MARK" /etc/hosts; then
        echo "$HOSTS_LINE" >>/etc/hosts
    fi
}

start_munge() {
    if pgrep -x munged >/dev/null; then
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    fi
    [[ -s /etc/munge/munge.key ]] || {
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then runuser -u munge -- mungekey -c -f -k /etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; fi
        chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    local pid
    for _ in $(seq 50); do
        pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
        [[ -n $pid ]] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    [[ -n $pid ]] || die "munged did not start"
    echo "$pid" >"$STATE_DIR/munged.pid"   # ours: stop kills it
}

nodes_idle() {
    local out
    out=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null) || return 1
    [[ $(grep -cE '^n[12] (idle|mix|alloc)' <<<"$out") == 2 ]]
}

cmd_status() {
    live_pid "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null || { log "slurmctld not running"; return 1; }
    local n
    for n in "${NODES[@]}"; do
        live_pid "$STATE_DIR/slurmd-$n.pid" slurmd >/dev/null || { log "slurmd $n not running"; return 1; }
    done
    nodes_idle || { log "nodes not up: $(sinfo -h -N -o '%N %t' 2>&1 | tr '\n' ' ')"; return 1; }
    return 0
}

cmd_start() {
    need_root
    if [[ -e $CONF ]] && grep -q "^$MARK" "$CONF" && cmd_status 2>/dev/null; then
        log "already up"; sinfo; return 0
    fi
    # a partial earlier start: clean it away first
    [[ -d $STATE_DIR ]] && cmd_stop
    install_packages
    mkdir -p "$STATE_DIR"
    write_conf
    start_munge
    slurmctld -c || die "slurmctld failed: $(tail -5 "$STATE_DIR/log/slurmctld.log" 2>/dev/null)"
    local n
    for n in "${NODES[@]}"; do
        slurmd -N "$n" || die "slurmd -N $n failed: $(tail -5 "$STATE_DIR/log/slurmd-$n.log" 2>/dev/null)"
    done
    local t0=$SECONDS
    until nodes_idle; do
        if ((SECONDS - t0 > TIMEOUT)); then
            sinfo -N -l >&2 || true
            tail -20 "$STATE_DIR"/log/*.log >&2 || true
            die "nodes not idle after ${TIMEOUT}s"
        fi
        sleep 0.5
    done
    log "up in $((SECONDS - t0))s after daemon start (state in $STATE_DIR)"
    sinfo
}

kill_pidfile() {  # file program
    local pid
    pid=$(live_pid "$1" "$2") || { rm -f "$1"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$1"
}

cmd_stop() {
    need_root
    # jobs first, while the controller still runs, so their slurmstepd and processes go away
    if live_pid "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null; then
        scancel --full --quiet --state=RUNNING,PENDING,SUSPENDED,REQUEUED 2>/dev/null || true
        scancel --quiet 2>/dev/null || true
        for _ in $(seq 30); do
            [[ -z $(squeue -h -t all -o %i 2>/dev/null | head -1) ]] && break
            # finished jobs stay visible MinJobAge seconds; we only wait for active ones
            [[ -z $(squeue -h -t R,CG,PD,S,CF,RQ -o %i 2>/dev/null | head -1) ]] && break
            sleep 0.5
        done
    fi
    local n
    for n in "${NODES[@]}"; do kill_pidfile "$STATE_DIR/slurmd-$n.pid" slurmd; done
    # any step daemons left behind by our slurmds (their spool dir is ours)
    local p
    for p in $(pgrep -x slurmstepd || true); do
        if grep -qa "$STATE_DIR" "/proc/$p/environ" "/proc/$p/cmdline" 2>/dev/null \
            || [[ $(readlink "/proc/$p/cwd" 2>/dev/null) == "$STATE_DIR"* ]]; then
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    kill_pidfile "$STATE_DIR/slurmctld.pid" slurmctld
    kill_pidfile "$STATE_DIR/munged.pid" munged
    if [[ -e $CONF ]] && grep -q "^$MARK" "$CONF"; then
        rm -f "$CONF"
        [[ -e $STATE_DIR/slurm.conf.orig ]] && mv "$STATE_DIR/slurm.conf.orig" "$CONF"
    fi
    if [[ -e $GRES_CONF ]] && grep -q "^$MARK" "$GRES_CONF"; then
        rm -f "$GRES_CONF"
        [[ -e $STATE_DIR/gres.conf.orig ]] && mv "$STATE_DIR/gres.conf.orig" "$GRES_CONF"
    fi
    if grep -q "$MARK" /etc/hosts; then
        # /etc/hosts may be a bind mount: rewrite in place, never replace the file
        local kept
        kept=$(grep -v "$MARK" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
    rm -rf "$STATE_DIR"
    log "stopped"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status && { log "up"; sinfo; } ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
