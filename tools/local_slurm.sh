#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests: munged, slurmctld and slurmd with
# their state, sockets and logs under one directory. Needs root (it installs the Debian
# packages when missing).
#
#   tools/local_slurm.sh start      # prints the line to export: SLURM_CONF=...
#   tools/local_slurm.sh status
#   tools/local_slurm.sh stop
#
# State directory: $DIS_SLURM_STATE (default /tmp/dis_dist_slurm). Clients (sbatch, squeue,
# scontrol, submitit) find the cluster through SLURM_CONF=$DIS_SLURM_STATE/slurm.conf.
set -euo pipefail

STATE=${DIS_SLURM_STATE:-/tmp/dis_dist_slurm}
CONF=$STATE/slurm.conf
SOCKET=$STATE/munge/munge.socket.2
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local_slurm: $*" >&2; exit 1; }

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: run as root, or: sudo apt-get install ${missing[*]}"
  echo "local_slurm: installing ${missing[*]}"
  apt-get install -y -qq "${missing[@]}" >/dev/null || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

write_conf() {
  local node mem
  node=$(slurmd -C | head -n 1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  node=${node/RealMemory=$mem/RealMemory=$((mem * 9 / 10))}
  cat >"$CONF" <<EOF
ClusterName=dislocal
SlurmctldHost=$(hostname -s)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=${DIS_SLURMCTLD_PORT:-6817}
SlurmdPort=${DIS_SLURMD_PORT:-6818}
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install_packages
  mkdir -p "$STATE"/{munge,spool/ctld,spool/d,log,run}
  if ! running "$STATE/munge/munged.pid"; then
    [ -f "$STATE/munge/munge.key" ] || mungekey -c -k "$STATE/munge/munge.key"
    chmod 400 "$STATE/munge/munge.key"
    munged --force --key-file="$STATE/munge/munge.key" --socket="$SOCKET" \
      --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
      --seed-file="$STATE/munge/munged.seed"
  fi
  write_conf
  export SLURM_CONF=$CONF
  # -c: a fresh controller forgets the jobs of an earlier start (a job it believed running
  # would hold the node until its time limit).
  running "$STATE/run/slurmctld.pid" || slurmctld -c -f "$CONF"
  running "$STATE/run/slurmd.pid" || slurmd -f "$CONF"
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "export SLURM_CONF=$CONF"
      return
    fi
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  die "the node did not become idle within 60 s (logs above)"
}

stop() {
  for pid in "$STATE/run/slurmd.pid" "$STATE/run/slurmctld.pid" "$STATE/munge/munged.pid"; do
    if running "$pid"; then kill "$(cat "$pid")"; fi
  done
}

status() {
  export SLURM_CONF=$CONF
  sinfo && squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status" ;;
esac
