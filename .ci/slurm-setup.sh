#!/usr/bin/env bash
# Single-node Slurm (+ munge) from Debian's packages, for the end-to-end tests of `wsi-lymph … --cluster slurm`, and
# Slurm's PBS/Torque wrappers over it (package slurm-wlm-torque: qsub/qstat/qdel that submit `#PBS` job scripts to
# this Slurm) for those of `--cluster pbs` (tests/test_pbs.py).
#
# Runs as root on a Debian 12 machine without systemd (CI, a developer VM): the daemons are started by hand.
# Idempotent: a second run keeps daemons that are already up with the same configuration, restarts them when the
# configuration changed, and resumes a drained node. Recipe, facts and pitfalls: ../shared/docs/slurm-single-node.md.
# Partition `debug` on this host; no cgroups (proctrack/linuxproc, task/none), no accounting.
set -euo pipefail
started_ms=$(( $(date +%s%N) / 1000000 ))
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then  # installing and starting daemons needs root; a running Slurm is fine as it is
    if sinfo -h -o %T >/dev/null 2>&1; then echo "slurm-setup: not root; using the Slurm that runs"; exit 0; fi
    echo "slurm-setup: run as root (it installs Debian's slurm and munge packages and starts the daemons)" >&2
    exit 1
fi

# Only what is missing: a second run installs nothing. slurm-wlm-torque also registers mpiexec.slurm as mpirun
# (update-alternatives) where no MPI provides one; it conflicts with Torque's and Grid Engine's own clients.
missing=()
for package in slurmctld slurmd slurm-client munge slurm-wlm-torque; do
    dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

alive() {  # alive PIDFILE NAME: the process named in PIDFILE runs, is NAME (not a reused pid) and is no zombie
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    [ "$(sed -n 's/^.*) \(.\).*/\1/p' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

# ---------------------------------------------------------------- munge (Slurm's authentication)
[ -s /etc/munge/munge.key ] || mungekey --create --force
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if ! alive /run/munge/munged.pid munged; then
    # --force: a socket left behind by a munged that was killed must not stop a new one.
    runuser -u munge -- /usr/sbin/munged --force
fi
munge -n | unmunge >/dev/null

# ---------------------------------------------------------------- slurm.conf
H=$(hostname -s)
NCPU=$(nproc)
# RealMemory must be set: jobs ask for --mem, and a node without it has 1 MB.
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
conf=$(mktemp)
cat > "$conf" <<CONF
# Written by wsi-lymph .ci/slurm-setup.sh: one node, partition debug.
ClusterName=ci
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=60
NodeName=${H} NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${H} Default=YES MaxTime=INFINITE State=UP
CONF
restart=0
if ! cmp -s "$conf" /etc/slurm/slurm.conf; then
    install -m 0644 "$conf" /etc/slurm/slurm.conf
    restart=1
fi
rm -f "$conf"

# ---------------------------------------------------------------- daemons
if [ "$restart" = 1 ]; then
    for daemon in slurmd slurmctld; do
        pidfile=/run/slurm/$daemon.pid
        if alive "$pidfile" "$daemon"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 50); do alive "$pidfile" "$daemon" || break; sleep 0.1; done
        fi
    done
fi
# -c: a controller started anew forgets the jobs and node states of an earlier run (a stale, drained node or the
# dask-worker jobs of a killed CI run would otherwise come back).
alive /run/slurm/slurmctld.pid slurmctld || slurmctld -c
alive /run/slurm/slurmd.pid slurmd || slurmd -c

state() { sinfo -h -n "$H" -o %T 2>/dev/null | head -n 1 | tr -d '*~#'; }
for _ in $(seq 60); do
    case "$(state)" in
        idle|mixed|allocated|completing) break ;;
        drained|draining|down) scontrol update nodename="$H" state=resume || true ;;
    esac
    sleep 0.5
done
case "$(state)" in
    idle|mixed|allocated|completing) ;;
    *) echo "slurm-setup: node $H is '$(state)'" >&2; tail -n 30 /var/log/slurm/*.log >&2; exit 1 ;;
esac
timeout 60 srun -t 1 -n 1 hostname >/dev/null
node_state=$(state)  # before the PBS check below, whose cancelled job leaves the node "completing" for a moment
# The PBS wrappers: a #PBS script through qsub, seen by qstat, removed by qdel (they read Slurm through its Perl API,
# which must match the running daemons).
pbs_script=$(mktemp)
printf '%s\n' '#!/bin/sh' '#PBS -N slurm-setup-pbs' '#PBS -l walltime=00:01:00' 'sleep 30' > "$pbs_script"
if ! pbs_job=$(cd /tmp && timeout 60 qsub -o /dev/null -e /dev/null "$pbs_script" 2>&1); then
    echo "slurm-setup: qsub failed: $pbs_job" >&2
    rm -f "$pbs_script"
    exit 1
fi
rm -f "$pbs_script"
timeout 60 qstat "$pbs_job" >/dev/null || { echo "slurm-setup: qstat does not list job $pbs_job" >&2; exit 1; }
timeout 60 qdel "$pbs_job"
elapsed_ms=$(( $(date +%s%N) / 1000000 - started_ms ))
echo "slurm-setup: node $H $node_state, $NCPU CPUs, $MEM_MB MB, qsub/qstat/qdel over it;" \
    "ready in $(awk "BEGIN{printf \"%.1f\", $elapsed_ms/1000}") s"
