#!/usr/bin/env bash
# A SLURM cluster on this machine, for the tests and for trying slurm/*.sh without a cluster.
#
#   bash scripts/slurm_cluster.sh start  [--nodes N] [DIR]   # munged + slurmctld + slurmd(s), waits until idle
#   bash scripts/slurm_cluster.sh status [DIR]   # exit 0 when it answers and every node is usable
#   bash scripts/slurm_cluster.sh stop   [DIR]   # cancels its jobs, stops the daemons, removes what start made
#   export SLURM_CONF=DIR/slurm.conf             # then sbatch / squeue / scontrol talk to it
#
# One node (default): this machine itself, in partition `debug` (the default partition).
# --nodes N (N >= 2) adds N nodes node1..nodeN in partition `multi`: each its own slurmd in its own
# network namespace and UTS namespace (hostname nodeI), joined by a bridge in a private 10.x.y.0/24
# (derived from DIR; slurmctld listens on its .1, nodeI has .1I). /etc/hosts gets one marked block
# naming node1..nodeN, so `scontrol show hostnames`, srun and the training rendezvous (MASTER_ADDR =
# the first node) treat them as different hosts; the file system is shared (it is the same disk).
# Traffic stays on this machine: loopback and the bridge's addresses. `sbatch -p multi --nodes=2 ...`.
# SLURM's multiple-slurmd mode (`slurmd -N name`, several daemons sharing one host and address) is not
# used: namespaces give each node its own hostname and address, as on a real cluster.
#
# Needs root and `apt-get install -y slurmctld slurmd slurm-client munge` (Debian: .ci/run does it);
# --nodes also needs `ip` (iproute2) and `unshare` (util-linux) and the right to create namespaces.
# Everything lives under DIR (default /tmp/slurm-<hash of this checkout>): its own munge key, munge
# socket, slurm.conf (the node line from `slurmd -C`), state, spool, logs and pid files, and its own
# ports (derived from DIR, checked free), so two clusters on one machine never collide and the
# machine's /etc/slurm and /etc/munge are not used. No systemd: the daemons run in the foreground
# mode (-D) as background processes of this script. `stop` removes the namespaces, the bridge and
# the /etc/hosts block it made (DIR/nodes records how many).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="${1:-status}"
[ $# -gt 0 ] && shift
NODES="" DIR_ARG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="${2:-}"; shift 2 || true ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    *) DIR_ARG="$1"; shift ;;
  esac
done
DIR="${DIR_ARG:-${SLURM_CLUSTER_DIR:-/tmp/slurm-$(printf '%s' "$ROOT" | md5sum | cut -c1-8)}}"
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge-socket/munge.socket"
NAME="c$(printf '%s' "$DIR" | md5sum | cut -c1-8)"
HASH="$(printf '%s' "$DIR" | md5sum)"
NET="10.$(( 0x${HASH:8:2} % 200 + 20 )).$(( 0x${HASH:10:2} ))"   # the nodes' private /24
BRIDGE="mmb${HASH:0:6}"
HOSTS_BEGIN="# >>> scripts/slurm_cluster.sh $DIR >>>"
HOSTS_END="# <<< scripts/slurm_cluster.sh $DIR <<<"
# the namespace nodes of a running cluster: what `start --nodes` recorded
extra_nodes() { cat "$DIR/nodes" 2>/dev/null || echo 0; }

say() { echo "[slurm_cluster] $*"; }
die() { echo "[slurm_cluster] error: $*" >&2; exit 1; }
alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }
# every node's state, one word: "idle" when all are idle, else the first other state
all_nodes_state() {
  local states
  states="$(alive slurmctld && SLURM_CONF="$CONF" sinfo -h -N -o %T 2>/dev/null | sort -u || true)"
  [ "$states" = idle ] && echo idle || { printf '%s\n' "$states" | grep -vx idle | head -1; }
}

free_port() {  # the first free TCP port at or after $1
  python3 - "$1" <<'EOF'
import socket, sys
port = int(sys.argv[1])
while True:
    with socket.socket() as s:
        try:
            s.bind(("", port)); break
        except OSError:
            port += 1
print(port)
EOF
}

start() {
  NODES="${NODES:-1}"
  case "$NODES" in ''|*[!0-9]*) die "--nodes $NODES: a number of nodes (1, or 2 and more)" ;; esac
  [ "$NODES" -ge 1 ] || die "--nodes $NODES: at least 1"
  local extra=0
  [ "$NODES" -ge 2 ] && extra="$NODES"
  [ "$(id -u)" = 0 ] || die "needs root (slurmd runs jobs as their users; munged runs as user munge)"
  for bin in munged slurmctld slurmd sbatch sinfo scontrol; do
    command -v "$bin" >/dev/null || die "$bin not found: apt-get install -y slurmctld slurmd slurm-client munge"
  done
  id munge >/dev/null 2>&1 || die "no user 'munge' (install the munge package)"
  if alive slurmctld && alive slurmd && [ "$(extra_nodes)" = "$extra" ] && [ "$(all_nodes_state)" = idle ]; then
    say "already running: export SLURM_CONF=$CONF"; return 0
  fi
  stop_daemons quiet
  remove_network
  mkdir -p "$DIR"/{state,spool,log}
  chmod 755 "$DIR"
  runuser -u munge -- test -x "$DIR" || die "user munge cannot reach $DIR (a parent directory is private): choose another DIR"
  # munge: own key, socket, pid, log and seed files, owned by munge (munged refuses insecure paths)
  mkdir -p "$DIR/munge" "$DIR/munge-socket"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chown -R munge:munge "$DIR/munge" "$DIR/munge-socket"
  chmod 700 "$DIR/munge"
  chmod 755 "$DIR/munge-socket"   # clients need to reach the socket
  chmod 400 "$DIR/munge/munge.key"
  runuser -u munge -- munged --key-file="$DIR/munge/munge.key" --socket="$SOCKET" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" || die "munged did not start (see $DIR/munge/munged.log)"
  cp "$DIR/munge/munged.pid" "$DIR/munged.pid"
  for _ in $(seq 50); do [ -S "$SOCKET" ] && break; sleep 0.1; done
  munge -S "$SOCKET" -n </dev/null | unmunge -S "$SOCKET" >/dev/null || die "munge round trip failed"

  # ports from the directory name, moved up if taken
  local base=$((20000 + 0x$(printf '%s' "$DIR" | md5sum | cut -c1-4) % 20000))
  local ctld_port slurmd_port
  ctld_port=$(free_port "$base")
  slurmd_port=$(free_port $((ctld_port + 1)))
  local node
  node="$(slurmd -C | head -1)"   # NodeName=... CPUs=... RealMemory=...
  local ctld_host
  ctld_host="$(hostname -s)"
  if [ "$extra" -ge 2 ]; then
    make_network "$extra"
    ctld_host="$ctld_host($NET.1)"   # the namespaces reach slurmctld on the bridge
  fi
  echo "$extra" > "$DIR/nodes"
  cat > "$CONF" <<EOF
# generated by scripts/slurm_cluster.sh $(date -Is); this machine (partition debug) and $extra namespace nodes (partition multi)
ClusterName=$NAME
FirstJobId=$(( (0x$(printf '%s' "$DIR" | md5sum | cut -c5-8) % 900 + 100) * 1000 ))
SlurmctldHost=$ctld_host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/state/slurmctld.pidfile
SlurmdPidFile=$DIR/spool/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SchedulerParameters=sched_interval=2
PlugStackConfig=$DIR/plugstack.conf
$node State=UNKNOWN
PartitionName=debug Nodes=$(hostname -s) Default=YES MaxTime=INFINITE State=UP
EOF
  sed -i 's/ UpTime=[^ ]*//' "$CONF"
  if [ "$extra" -ge 2 ]; then   # the same hardware as the host's line, each at its own address
    local hw i
    hw="$(sed -n 's/^NodeName=[^ ]* \(.*\) State=UNKNOWN$/\1/p' "$CONF" | head -1)"
    for i in $(seq "$extra"); do echo "NodeName=node$i NodeAddr=$NET.1$i $hw State=UNKNOWN" >> "$CONF"; done
    echo "PartitionName=multi Nodes=node[1-$extra] MaxTime=INFINITE State=UP" >> "$CONF"
  fi
  : > "$DIR/plugstack.conf"
  nohup slurmctld -D -c -f "$CONF" > "$DIR/log/slurmctld.out" 2>&1 &
  echo $! > "$DIR/slurmctld.pid"
  for _ in $(seq 100); do SLURM_CONF="$CONF" scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
  nohup slurmd -D -f "$CONF" > "$DIR/log/slurmd.out" 2>&1 &
  echo $! > "$DIR/slurmd.pid"
  local i
  for i in $(seq "$extra"); do   # its own network and UTS namespace: slurmd finds itself as nodeI
    mkdir -p "$DIR/spool/node$i"
    # nsenter, not `ip netns exec`: that one also remounts /sys, hiding /sys/fs/cgroup from slurmd
    nohup nsenter --net="/var/run/netns/$NAME-node$i" unshare --uts sh -c "hostname node$i && exec slurmd -D -f '$CONF'" \
      > "$DIR/log/slurmd-node$i.out" 2>&1 &
    echo $! > "$DIR/slurmd-node$i.pid"
  done
  local state="" daemon
  for _ in $(seq 150); do
    state="$(all_nodes_state)"
    [ "$state" = idle ] && break
    alive slurmctld || die "slurmctld exited: $(tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmctld.out" 2>/dev/null)"
    for daemon in slurmd $(for i in $(seq "$extra"); do echo "slurmd-node$i"; done); do
      alive "$daemon" || die "$daemon exited: $(tail -5 "$DIR/log/$daemon.out" "$DIR"/log/slurmd-*.log 2>/dev/null)"
    done
    sleep 0.2
  done
  [ "$state" = idle ] || die "nodes not idle after 30 s (state '${state}'); logs in $DIR/log"
  if [ "$extra" -ge 2 ]; then
    say "running (node $(hostname -s) idle in partition debug; node[1-$extra] idle in partition multi, $NET.0/24," \
        "ports $ctld_port/$slurmd_port): export SLURM_CONF=$CONF"
  else
    say "running (node $(hostname -s) idle, ports $ctld_port/$slurmd_port): export SLURM_CONF=$CONF"
  fi
}

make_network() {   # N: a bridge, N namespaces with a veth each, the /etc/hosts block
  local n="$1" i
  for bin in ip unshare nsenter; do command -v "$bin" >/dev/null || die "--nodes needs $bin (iproute2, util-linux)"; done
  if ip -4 -o addr show | grep -q " $NET\."; then
    die "$NET.0/24 is already used on this machine (ip addr); choose another DIR"
  fi
  for i in $(seq "$n"); do
    if without_our_block /etc/hosts | grep -v "^ *#" | grep -qw "node$i"; then
      die "/etc/hosts already names node$i (another cluster of this script, or the machine's own): stop that one first"
    fi
  done
  ip link add "$BRIDGE" type bridge 2>/dev/null || die "cannot create a bridge (ip link add type bridge): no network namespaces here"
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq "$n"); do
    ip netns add "$NAME-node$i" || die "cannot create a network namespace (ip netns add)"
    ip link add "${BRIDGE/mmb/mmv}$i" type veth peer name eth0 netns "$NAME-node$i"
    ip link set "${BRIDGE/mmb/mmv}$i" master "$BRIDGE"
    ip link set "${BRIDGE/mmb/mmv}$i" up
    ip netns exec "$NAME-node$i" ip addr add "$NET.1$i/24" dev eth0
    ip netns exec "$NAME-node$i" ip link set eth0 up
    ip netns exec "$NAME-node$i" ip link set lo up
  done
  { echo "$HOSTS_BEGIN"; for i in $(seq "$n"); do echo "$NET.1$i node$i"; done; echo "$HOSTS_END"; } >> /etc/hosts
}

without_our_block() {   # FILE without the lines from HOSTS_BEGIN to HOSTS_END
  awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' "$1"
}

remove_network() {   # what make_network made (DIR/nodes says how many), whatever is left of it
  local n i kept
  n="$(extra_nodes)"
  for i in $(seq "$n"); do ip netns del "$NAME-node$i" 2>/dev/null || true; done   # takes its veth along
  ip link del "$BRIDGE" 2>/dev/null || true
  if grep -qxF "$HOSTS_BEGIN" /etc/hosts 2>/dev/null; then
    kept="$(without_our_block /etc/hosts)"
    printf '%s\n' "$kept" > /etc/hosts   # in place: /etc/hosts may be a bind mount
  fi
  rm -f "$DIR/nodes"
}

stop_daemons() {
  local name pid i
  for name in $(for i in $(seq "$(extra_nodes)"); do echo "slurmd-node$i"; done) slurmd slurmctld munged; do
    if alive "$name"; then
      pid="$(cat "$DIR/$name.pid")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
      [ "${1:-}" = quiet ] || say "stopped $name ($pid)"
    fi
    rm -f "$DIR/$name.pid"
  done
}

stop() {
  if alive slurmctld; then   # cancel our jobs first, or their slurmstepd would outlive slurmd
    local jobs
    jobs="$(SLURM_CONF="$CONF" squeue -h -o %A 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
      say "cancelling jobs: $(echo $jobs)"
      # shellcheck disable=SC2086
      SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
      for _ in $(seq 120); do
        [ -z "$(SLURM_CONF="$CONF" squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5
      done
    fi
  fi
  stop_daemons
  remove_network
  say "stopped ($DIR)"
}

status() {
  [ -f "$CONF" ] || { say "not started ($DIR)"; return 1; }
  local ok=0
  for name in munged slurmctld slurmd $(for i in $(seq "$(extra_nodes)"); do echo "slurmd-node$i"; done); do
    if alive "$name"; then say "$name running ($(cat "$DIR/$name.pid"))"; else say "$name not running"; ok=1; fi
  done
  local state
  state="$(all_nodes_state)"
  say "node state: ${state:-unknown}; export SLURM_CONF=$CONF"
  case "$state" in idle|mixed|allocated|completing) ;; *) ok=1 ;; esac
  return $ok
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  conf) echo "$CONF" ;;
  *) die "usage: $0 start [--nodes N] [DIR] | stop [DIR] | status [DIR] | conf [DIR]" ;;
esac
