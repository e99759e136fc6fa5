#!/usr/bin/env bash
# A real single-node Slurm on this machine, for tests and local trials of `pretrain-launch --slurm`.
#
#   scripts/slurm_cluster.sh start    install the Debian packages if missing (root), start
#                                     munged, slurmctld and slurmd; wait until the node is idle
#   scripts/slurm_cluster.sh stop     stop exactly the daemons `start` started, remove its files
#   scripts/slurm_cluster.sh status   exit 0 when the cluster answers
#
# Needs root (the daemons run as root without systemd or cgroups) and, the first time, apt.
# Everything it creates lives in $SLURM_CLUSTER_DIR (default /tmp/pretrain-slurm), except
# /etc/slurm/slurm.conf: clients read it there without SLURM_CONF. An existing slurm.conf is
# kept aside and put back by `stop`. Settings and their reasons: shared/design/FEASIBILITY.md.
set -euo pipefail

DIR=${SLURM_CLUSTER_DIR:-/tmp/pretrain-slurm}
CONF=/etc/slurm/slurm.conf
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)

die() { echo "slurm_cluster: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing needs root: run as root, or apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get: install ${PACKAGES[*]}"
    echo "slurm_cluster: installing ${PACKAGES[*]}" >&2
    apt-get update -qq || die "apt-get update failed: no package index reachable"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
        >/dev/null || die "apt-get install ${PACKAGES[*]} failed"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    # CPUs, sockets, cores and threads as slurmd sees them; memory a little below what it sees.
    local hw mem
    hw=$(slurmd -C | head -n1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
    mem=$(slurmd -C | head -n1 | tr ' ' '\n' | sed -n 's/^RealMemory=//p')
    mem=$((mem * 9 / 10))
    mkdir -p /etc/slurm
    if [ -f "$CONF" ] && ! grep -q "^# pretrain slurm_cluster.sh" "$CONF"; then
        cp "$CONF" "$DIR/slurm.conf.before"  # someone else's: put back by stop
    fi
    cat >"$CONF" <<EOF
# pretrain slurm_cluster.sh: a single-node cluster; removed by \`scripts/slurm_cluster.sh stop\`
ClusterName=pretrain
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
# Credentials expire fast so a requeued job may start again within seconds, not minutes.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
# No systemd or cgroups here: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Cores, not memory: with CR_Core_Memory a job without --mem takes all memory.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Fail at once what could never run, instead of pending forever.
EnforcePartLimits=ALL
DependencyParameters=kill_invalid_depend
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
ReturnToService=2
KillWait=10
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 $hw RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install_packages
    mkdir -p "$DIR/state" "$DIR/spool"
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
        echo "slurm_cluster: already running ($DIR)" >&2
        return 0
    fi
    # munged: ours only if none answers already (then stop leaves it alone).
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        [ -f /etc/munge/munge.key ] || die "no /etc/munge/munge.key: reinstall the munge package"
        runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/pretrain-munged.pid
        cp /run/munge/pretrain-munged.pid "$DIR/munged.pid"
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
        munge -n | unmunge >/dev/null || die "munged does not answer"
    fi
    write_conf
    slurmctld -i
    slurmd -N localhost
    for _ in $(seq 150); do
        if sinfo -h -N -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            echo "slurm_cluster: up ($DIR): $(sinfo -h -N -o '%N %c CPUs %t')" >&2
            return 0
        fi
        sleep 0.2
    done
    die "the node did not come up; see $DIR/slurmctld.log and $DIR/slurmd.log"
}

stop_pid() {  # the daemon whose pid file `start` kept, and nothing else
    local file=$1 pid
    alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    rm -f "$file"
}

stop() {
    [ -d "$DIR" ] || return 0
    # Jobs first: their processes are children of slurmstepd, which slurmd's exit leaves running.
    scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do
        [ -z "$(squeue -h -t R,CG 2>/dev/null)" ] && break
        sleep 0.2
    done
    stop_pid "$DIR/slurmd.pid"
    stop_pid "$DIR/slurmctld.pid"
    stop_pid "$DIR/munged.pid"
    if grep -qs "^# pretrain slurm_cluster.sh" "$CONF"; then
        rm -f "$CONF"
        [ -f "$DIR/slurm.conf.before" ] && mv "$DIR/slurm.conf.before" "$CONF"
    fi
    rm -rf "$DIR"
}

status() { scontrol ping 2>/dev/null | grep -q UP && sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'; }

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
