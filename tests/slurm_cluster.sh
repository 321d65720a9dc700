#!/usr/bin/env bash
# A throwaway single-host SLURM cluster for tests (Debian 12 packages: slurmctld slurmd slurm-client munge).
#   bash tests/slurm_cluster.sh up [CPUS]   munged + slurmctld + one slurmd node (this host, NodeAddr 127.0.0.1)
#   bash tests/slurm_cluster.sh down        stop them again, by PID file (slurmd, slurmctld, munged)
# Needs root. Writes /etc/slurm/slurm.conf, /var/spool/slurm*, /var/log/slurm, /run/slurm, /run/munge.
# EnforcePartLimits=ALL makes a request larger than the cluster fail at submission instead of pending for ever.
set -euo pipefail
CMD=${1:?usage: slurm_cluster.sh up [CPUS] | down}

stop_pidfile() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
    sleep 0.1
  done
  echo "slurm_cluster: $file ($pid) still running after 15 s" >&2
  return 1
}

if [ "$CMD" = down ]; then
  status=0
  for f in /run/slurm/slurmd*.pid; do stop_pidfile "$f" || status=1; done
  stop_pidfile /run/slurm/slurmctld.pid || status=1
  stop_pidfile /run/munge/munged.pid || status=1
  exit $status
fi

[ "$CMD" = up ] || { echo "usage: slurm_cluster.sh up [CPUS] | down" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "slurm_cluster: needs root" >&2; exit 1; }
for exe in munged slurmctld slurmd sbatch scontrol sinfo; do
  command -v "$exe" >/dev/null || { echo "slurm_cluster: $exe not found (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 1; }
done
HOST=$(hostname -s)
CPUS=${2:-$(( $(nproc) < 4 ? 4 : $(nproc) ))}

if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --force
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 755 /run/munge
if ! { [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; }; then
  su -s /bin/sh munge -c /usr/sbin/munged
fi
munge -n | unmunge >/dev/null

install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
rm -rf /var/spool/slurmctld/*  # fresh controller state: no old jobs or nodes
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ibottest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmdParameters=config_overrides
MailProg=/bin/true
EnforcePartLimits=ALL
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld
slurmd
for _ in $(seq 1 150); do
  [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -cx idle || true)" -ge 1 ] && exit 0
  sleep 0.2
done
echo "slurm_cluster: node not idle after 30 s" >&2
sinfo -N >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
