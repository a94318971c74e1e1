#!/usr/bin/env bash
# A SLURM cluster of N nodes on this machine, for the tests: one munged and slurmctld in the root
# namespaces, and node1..nodeN, each a slurmd in a network namespace of its own (dis-node<k>)
# and a UTS namespace (its hostname is node<k>), joined by veth pairs to a bridge (disbr0).
# Addresses: $SUBNET.1 is the controller (the bridge), node<k> is $SUBNET.<k+1>; every
# namespace's /etc/hosts (/etc/netns/dis-node<k>/hosts) names all of them. Needs root (it
# installs the Debian packages when missing).
#
#   tools/local_slurm.sh start [--nodes N]  # N nodes (default 1); prints the line to export: SLURM_CONF=...
#   tools/local_slurm.sh status
#   tools/local_slurm.sh kill-node K        # node<K> lost: its slurmd and every process in it, SIGKILL
#   tools/local_slurm.sh start-node K       # node<K> back: a fresh slurmd (it returns to service)
#   tools/local_slurm.sh stop               # every process, namespace, link and file it made
#
# State directory: $DIS_SLURM_STATE (default /tmp/dis_dist_slurm). Clients (sbatch, squeue,
# scontrol, submitit) find the cluster through SLURM_CONF=$DIS_SLURM_STATE/slurm.conf. Run a
# command on a node: ip netns exec dis-node1 unshare --uts sh -c 'hostname node1; exec CMD'.
set -euo pipefail

STATE=${DIS_SLURM_STATE:-/tmp/dis_dist_slurm}
CONF=$STATE/slurm.conf
SOCKET=$STATE/munge/munge.socket.2
SUBNET=${DIS_SLURM_SUBNET:-10.177.0}  # a /24 of its own: keep it off every real network
BRIDGE=disbr0
NS_PREFIX=dis-node
PACKAGES=(slurmctld slurmd slurm-client munge iproute2 util-linux)

die() { echo "local_slurm: $*" >&2; exit 1; }

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: run as root, or: sudo apt-get install ${missing[*]}"
  echo "local_slurm: installing ${missing[*]}"
  apt-get install -y -qq "${missing[@]}" >/dev/null || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

# Whether the pid in file $1 is alive (a zombie, killed but not yet reaped, is not).
running() { [ -f "$1" ] && alive "$(cat "$1")"; }
# Whether any of the pids is alive (zombies are not).
alive() {
  local p state
  for p in "$@"; do
    state=$(ps -o stat= -p "$p" 2>/dev/null) && [ -n "$state" ] && [ "${state:0:1}" != Z ] && return 0
  done
  return 1
}
nodes() { cat "$STATE/nodes" 2>/dev/null || echo 0; }
ns() { echo "$NS_PREFIX$1"; }
veth() { echo "disveth$1"; }  # the root side of node<k>'s link (the other end is eth0 inside)

write_conf() {
  local n=$1 mem k
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
  mem=$((mem * 9 / 10 / n))
  {
    cat <<EOF
ClusterName=dislocal
SlurmctldHost=$(hostname -s)($SUBNET.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldPort=${DIS_SLURMCTLD_PORT:-6817}
SlurmdPort=${DIS_SLURMD_PORT:-6818}
SchedulerParameters=bf_interval=1,sched_interval=2
# A node that stops answering is DOWN after SlurmdTimeout; its jobs are requeued (JobRequeue,
# and --requeue in the sbatch scripts); a DOWN node is back when its slurmd registers again.
SlurmdTimeout=5
MessageTimeout=5
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
EOF
    for k in $(seq "$n"); do
      echo "NodeName=node$k NodeAddr=$SUBNET.$((k + 1)) CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } >"$CONF"
}

# The bridge (the controller's address) and node<k>'s namespace, link and hosts file.
make_network() {
  local n=$1 k hosts
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  hosts="127.0.0.1 localhost"$'\n'"::1 localhost ip6-localhost ip6-loopback"$'\n'"$SUBNET.1 $(hostname -s) dis-ctl"
  for k in $(seq "$n"); do hosts+=$'\n'"$SUBNET.$((k + 1)) node$k"; done
  for k in $(seq "$n"); do
    if ! ip netns list | grep -qx "$(ns "$k")\( .*\)\?"; then
      ip netns add "$(ns "$k")"
    fi
    if ! ip link show "$(veth "$k")" >/dev/null 2>&1; then
      ip link add "$(veth "$k")" type veth peer name eth0 netns "$(ns "$k")"
      ip link set "$(veth "$k")" master "$BRIDGE"
      ip -n "$(ns "$k")" addr add "$SUBNET.$((k + 1))/24" dev eth0
    fi
    ip link set "$(veth "$k")" up
    ip -n "$(ns "$k")" link set lo up
    ip -n "$(ns "$k")" link set eth0 up
    mkdir -p "/etc/netns/$(ns "$k")"
    echo "$hosts" >"/etc/netns/$(ns "$k")/hosts"
  done
}

# slurmd of node<k> in its namespaces; the jobs it starts inherit them: the network namespace,
# a UTS namespace (hostname node<k>) and a mount namespace whose /etc/hosts is the node's (what
# `ip netns exec` does, without its fresh /sys, which would hide the cgroup mounts slurmd needs).
start_node() {
  local k=$1
  running "$STATE/run/slurmd-node$k.pid" && return
  mkdir -p "$STATE/spool/node$k"
  # shellcheck disable=SC2016  # expanded by the inner shell
  SLURM_CONF=$CONF nsenter --net="/run/netns/$(ns "$k")" unshare --mount --uts sh -c \
    'mount --bind "$3" /etc/hosts && hostname "$1" && exec slurmd -N "$1" -f "$2"' \
    sh "node$k" "$CONF" "/etc/netns/$(ns "$k")/hosts"
}

# SIGKILL to every process in node<k>'s network namespace (its slurmd, steps and job processes).
kill_node() {
  local k=$1 pids
  for _ in 1 2 3; do
    pids=$(ip netns pids "$(ns "$k")" 2>/dev/null || true)
    [ -z "$pids" ] && break
    # shellcheck disable=SC2086  # a list of pids
    kill -9 $pids 2>/dev/null || true
    sleep 0.2
  done
  rm -f "$STATE/run/slurmd-node$k.pid"
}

wait_idle() {
  local n=$1
  for _ in $(seq 60); do
    if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)$')" -ge "$n" ]; then
      return
    fi
    for k in $(seq "$n"); do scontrol update nodename="node$k" state=resume >/dev/null 2>&1 || true; done
    sleep 1
  done
  tail -n 20 "$STATE"/log/*.log >&2 || true
  die "the nodes did not become idle within 60 s (logs above)"
}

start() {
  local n=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) n=${2:?--nodes N}; shift 2 ;;
      --nodes=*) n=${1#--nodes=}; shift ;;
      *) die "start: unknown argument $1" ;;
    esac
  done
  if ! [[ "$n" =~ ^[1-9][0-9]?$ ]] || [ "$n" -gt 50 ]; then die "--nodes $n: give 1 to 50"; fi
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
  if running "$STATE/run/slurmctld.pid" && [ "$(nodes)" != "$n" ]; then
    die "a cluster of $(nodes) node(s) is running: tools/local_slurm.sh stop first"
  fi
  install_packages
  mkdir -p "$STATE"/{munge,spool/ctld,log,run}
  if ! running "$STATE/munge/munged.pid"; then
    [ -f "$STATE/munge/munge.key" ] || mungekey -c -k "$STATE/munge/munge.key"
    chmod 400 "$STATE/munge/munge.key"
    munged --force --key-file="$STATE/munge/munge.key" --socket="$SOCKET" \
      --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
      --seed-file="$STATE/munge/munged.seed"
  fi
  echo "$n" >"$STATE/nodes"
  make_network "$n"
  write_conf "$n"
  export SLURM_CONF=$CONF
  # -c: a fresh controller forgets the jobs of an earlier start (a job it believed running
  # would hold the node until its time limit).
  running "$STATE/run/slurmctld.pid" || slurmctld -c -f "$CONF"
  for k in $(seq "$n"); do start_node "$k"; done
  wait_idle "$n"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  local n k file pids=()
  n=$(nodes)
  for k in $(seq "$n"); do kill_node "$k"; done
  for file in "$STATE/run/slurmd.pid" "$STATE/run/slurmctld.pid" "$STATE/munge/munged.pid"; do
    if running "$file"; then pids+=("$(cat "$file")"); fi
  done
  if [ ${#pids[@]} -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 300); do  # slurmctld saves its state first
      alive "${pids[@]}" || break
      sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
  fi
  for k in $(seq "$n"); do
    ip link del "$(veth "$k")" 2>/dev/null || true
    ip netns del "$(ns "$k")" 2>/dev/null || true
    rm -rf "/etc/netns/$(ns "$k")"
  done
  rmdir /etc/netns 2>/dev/null || true  # only when empty
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -f "$STATE/nodes"
}

status() {
  export SLURM_CONF=$CONF
  sinfo -N -o '%N %T %c %O' && squeue
}

node_arg() {
  if ! [[ "${1:-}" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ] || [ "$1" -gt "$(nodes)" ]; then
    die "give a node number 1..$(nodes)"
  fi
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  kill-node) node_arg "${2:-}"; kill_node "$2" ;;
  start-node) node_arg "${2:-}"; start_node "$2" ;;
  *) die "usage: $0 start [--nodes N]|stop|status|kill-node K|start-node K" ;;
esac
