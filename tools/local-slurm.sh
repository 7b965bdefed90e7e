#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying (and testing) the SLURM profile for real.
#   sudo bash tools/local-slurm.sh start     # install slurm-wlm + munge if missing, configure, start, wait for idle
#   sudo bash tools/local-slurm.sh stop      # stop the daemons this script started
#   bash tools/local-slurm.sh partitions     # the plugin's partition file for this cluster (after start)
# Needs root and apt (Debian/Ubuntu). The node gets this machine's real CPU count and memory (`slurmd -C`), in two
# partitions on the same node: `cpu` (default) and `gpu`, whose node declares one count-only "fake" GPU (no
# device file), so GPU routing can be tried without a GPU. No accounting database: use
# `--slurm-status-command squeue` (profiles/slurm sets it).
set -euo pipefail
STATE=${LOCAL_SLURM_DIR:-/var/lib/lowrank-slurm}
CONF=/etc/slurm/slurm.conf

die() { echo "local-slurm: $*" >&2; exit 1; }

install_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm is not installed and apt-get is not available"
    echo "local-slurm: installing slurm-wlm and munge (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
}

write_conf() {
    local node host
    node=$(slurmd -C | head -n1)               # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
    host=$(hostname -s)
    rm -rf "$STATE/ctld" "$STATE/d"           # a fresh cluster: no drained node or old job from an earlier start
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
    cat >"$CONF" <<EOF
# written by lowrank tools/local-slurm.sh: one node, no accounting
ClusterName=lowrank
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
SchedulerParameters=sched_interval=2
GresTypes=gpu
$node Gres=gpu:fake:1 State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP
EOF
    # a fake GPU: /dev/null as its device file (slurmd only checks that the file exists), enough for
    # --gpus=fake:1 to be scheduled; the job then sees CUDA_VISIBLE_DEVICES=0 and torch finds no CUDA device
    echo "Name=gpu Type=fake File=/dev/null" >/etc/slurm/gres.conf
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root (it installs packages and starts daemons)"
    install_missing
    if running "$STATE/slurmctld.pid" && running "$STATE/slurmd.pid"; then
        echo "local-slurm: already running"
    else
        stop_pidfile "$STATE/slurmd.pid"
        stop_pidfile "$STATE/slurmctld.pid"
        write_conf
        mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
        munge -n </dev/null >/dev/null 2>&1 || munged --force
        slurmctld
        slurmd
    fi
    for _ in $(seq 60); do
        if sinfo -h -N -p cpu -o %t 2>/dev/null | grep -qx idle; then
            sinfo -N -o "%N %P %c %m %G %t"
            return
        fi
        sleep 1
    done
    sinfo -N -l || true
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    die "the node did not become idle within 60 s"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {
    local f=$1
    if [ -f "$f" ]; then
        local pid
        pid=$(cat "$f")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        rm -f "$f"
    fi
}

stop() {
    [ "$(id -u)" = 0 ] || die "needs root"
    scancel --user=root 2>/dev/null || true
    stop_pidfile "$STATE/slurmd.pid"
    stop_pidfile "$STATE/slurmctld.pid"
    stop_pidfile /run/munge/munged.pid
    echo "local-slurm: stopped"
}

partitions() {
    # the plugin's partition limits for this cluster (slurm-partition-config), read from the running node
    local cpus mem
    read -r cpus mem < <(sinfo -h -N -p cpu -o "%c %m" | head -n1)
    cat <<EOF
partitions:
  cpu:
    max_runtime: 1440
    max_mem_mb: $mem
    max_threads: $cpus
  gpu:
    max_runtime: 1440
    max_mem_mb: $mem
    max_threads: $cpus
    max_gpu: 1
    available_gpu_models: [fake]
    max_cpus_per_gpu: $cpus
EOF
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    partitions) partitions ;;
    *) die "usage: $0 start|stop|partitions" ;;
esac
