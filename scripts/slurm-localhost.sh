#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests and trying `wsi-response slurm` (Debian/Ubuntu, root).
#
#   scripts/slurm-localhost.sh start    install (apt-get) what is missing, write /etc/slurm/slurm.conf,
#                                       start munged, slurmctld and slurmd; wait until the node is idle.
#                                       Last stdout line: "started" or "already running".
#   scripts/slurm-localhost.sh stop     stop the daemons this script started (by their pid files)
#   scripts/slurm-localhost.sh status   sinfo of the node
#
# No systemd needed: the daemons are started directly. State, logs and pid files live in
# $WSI_SLURM_STATE (default /var/tmp/wsi-response-slurm). A slurm.conf not written by this script
# is never overwritten. Partition `debug` (default), select/cons_tres, no accounting, no GPUs.
set -euo pipefail

STATE=${WSI_SLURM_STATE:-/var/tmp/wsi-response-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by wsi-response scripts/slurm-localhost.sh"
HOST=$(hostname -s)

die() { echo "slurm-localhost: $*" >&2; exit 1; }

install_missing() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "needs root to install ${missing[*]} (apt-get)"
    command -v apt-get >/dev/null || die "no apt-get to install ${missing[*]}"
    echo "slurm-localhost: installing ${missing[*]} ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed"
    # policy-rc.d keeps the packages from trying to start services (no systemd here)
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}

running() {  # pid file $1 names a live process
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    local node mem cpus
    node=$(slurmd -C | head -1)                    # this host's CPUs/sockets/cores/threads/memory
    mem=$(echo "$node" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    cpus=$(echo "$node" | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
    mem=$(( mem * 9 / 10 ))                        # below what slurmd sees, or the node drains
    node=$(echo "$node" | sed "s/RealMemory=[0-9]*/RealMemory=$mem/")
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
    cat > "$CONF" <<EOF
$MARK
ClusterName=localhost
SlurmctldHost=$HOST
AuthType=auth/munge
SlurmUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# without a default memory per CPU every job takes the whole node and array tasks run one at a time
DefMemPerCPU=$(( mem / cpus < 4096 ? mem / cpus : 4096 ))
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$node State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if ! running /run/munge/munged.pid; then
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        chmod 0755 /run/munge
        if [ ! -s /etc/munge/munge.key ]; then
            mungekey --create --keyfile=/etc/munge/munge.key
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
        runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
    fi
    munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
}

node_state() {
    sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1
}

start() {
    install_missing
    if running "$STATE/slurmctld.pid" && running "$STATE/slurmd.pid" && [ "$(node_state)" = idle ]; then
        echo "already running"
        return 0
    fi
    write_conf
    start_munge
    running "$STATE/slurmctld.pid" || slurmctld -c || die "slurmctld did not start (see $STATE/slurmctld.log)"
    running "$STATE/slurmd.pid" || slurmd || die "slurmd did not start (see $STATE/slurmd.log)"
    local state=""
    for _ in $(seq 1 120); do
        state=$(node_state || true)
        case "$state" in
            idle|mixed|allocated) echo "slurm-localhost: node $HOST is $state" >&2; echo "started"; return 0 ;;
            down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $HOST did not become idle within 60 s (state: ${state:-none}); see $STATE/slurmctld.log and $STATE/slurmd.log"
}

stop() {
    local pidfile
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
        if running "$pidfile"; then
            kill "$(cat "$pidfile")"
        fi
    done
    echo "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo -N -l ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
