# Started once per node by slurm/train.sbatch (srun --ntasks-per-node=1): this node's training
# processes. Arguments: train/<script>.py and its flags. Environment from train.sbatch: PYTHON, NNODES,
# NPROC_PER_NODE, NUM_PROCESSES, MASTER_ADDR, MASTER_PORT; SLURM_NODEID is this node's machine rank.
#
# Signals. The training script (train/common.py Preemption) turns SIGTERM and SIGUSR1 into
# "checkpoint at the next step boundary and exit 0". With one process it is exec'ed: nothing between.
# With several, torch's elastic agent inside `accelerate launch` starts them, each in a session of
# its own (a signal to this process group does not reach them), and left to itself it handles
# SIGTERM by passing it on, waiting at most 30 s, SIGKILLing what is left and exiting 1
# (SignalException) even when every training process checkpointed and exited 0. So here:
#   - SIGUSR1 and SIGTERM are ignored by the launcher, which inherits the disposition from here:
#     SLURM (and srun) deliver signals to every process of the step, and SIGUSR1 would kill a
#     launcher that does not handle it; its agent is told not to handle SIGTERM
#     (PET_SIGNALS_TO_HANDLE), so it waits for its training processes as in any run and exits
#     with their status, 0 after the checkpoint;
#   - this shell passes a SIGTERM or SIGUSR1 it receives on to the training processes (the
#     launcher's children), again every 5 s until the launcher has exited, since a process still
#     starting ignores both (inherited) until it installs its handler. Under SLURM (scancel,
#     requeue, preemption, srun's forwarding) every process of the step gets the signal anyway;
#     for SIGTERM, KillWait bounds the time they get.
#   - SIGINT (Ctrl-C in a terminal) reaches the training processes too (the foreground group): they
#     checkpoint at the next step; the agent handles it as well and stops them.
#
# Rendezvous. Every node but the first waits, before its launcher starts, until the first node
# (MASTER_ADDR:MASTER_PORT) answers, at most RDZV_TIMEOUT seconds (default 300), and otherwise ends
# with one line naming the address and port (train.distributed.wait_for_rendezvous); the launcher's
# own rendezvous gets the same timeout (--rdzv_conf timeout=...) instead of torch's 600 s.
set -euo pipefail
trap '' USR1
if [ "$NUM_PROCESSES" -le 1 ]; then
  exec "$PYTHON" "$@"   # one process (CPU or one GPU): no launcher needed
fi
RDZV_TIMEOUT="${RDZV_TIMEOUT:-300}"
if [ "${SLURM_NODEID:-0}" != 0 ]; then
  "$PYTHON" -c 'import sys
from train.config import ConfigError
from train.distributed import wait_for_rendezvous
try:
    wait_for_rendezvous(sys.argv[1], sys.argv[2], float(sys.argv[3]))
except ConfigError as err:
    sys.exit(f"[node {sys.argv[4]}] error: {err}")' "$MASTER_ADDR" "$MASTER_PORT" "$RDZV_TIMEOUT" "$(hostname)"
fi

trap '' TERM   # inherited by the launcher (and its children until their handler is installed)
PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT \
"$PYTHON" -m accelerate.commands.launch --multi_gpu \
  --num_machines "$NNODES" --num_processes "$NUM_PROCESSES" --machine_rank "${SLURM_NODEID:-0}" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --rdzv_conf "timeout=$RDZV_TIMEOUT" \
  --mixed_precision no --dynamo_backend no "$@" &
LAUNCHER=$!

training_processes() {   # the launcher's children that run the training script ($1) (procps' pgrep)
  pgrep -P "$LAUNCHER" -f -- "$1" || true
}
forward() {   # signal script; ends within half a second of the launcher
  local i
  while kill -0 "$LAUNCHER" 2>/dev/null; do
    for pid in $(training_processes "$2"); do kill -"$1" "$pid" 2>/dev/null || true; done
    for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$LAUNCHER" 2>/dev/null && sleep 0.5; done
  done
}
FORWARDER=""
on_signal() {   # signal script
  [ -n "$FORWARDER" ] && return 0
  echo "[node] SIG$1: passed on to the training processes (checkpoint at the next step, then exit)" >&2
  forward "$1" "$2" &
  FORWARDER=$!
}
trap 'on_signal TERM "$1"' TERM
trap 'on_signal USR1 "$1"' USR1

while :; do   # `wait` returns early (status > 128) when a trapped signal arrives
  rc=0; wait "$LAUNCHER" || rc=$?
  kill -0 "$LAUNCHER" 2>/dev/null || break
done
last=0; wait "$LAUNCHER" 2>/dev/null || last=$?   # ended during a trap: its own status (127: already had it)
if [ "$last" != 127 ]; then rc=$last; fi
if [ -n "$FORWARDER" ]; then wait "$FORWARDER" 2>/dev/null || true; fi
exit "$rc"
