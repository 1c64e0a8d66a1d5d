# Shared body of the sbatch scripts slurm/<script>_<dataset>.sh, sourced by them after they set
#   SCRIPT   train/<SCRIPT>.py (gaal, igm, joint, unimodal)
#   CONFIG   train/configs/<name>.yaml
#   DATASET  the shard directory's name under DATA_ROOT (dvm, embedded_imgtab, ...)
# Their own arguments ("$@") are passed to the training script as overrides (--seed 1 --lr 3e-4).
#
# Environment (all optional; relative paths are taken from the directory sbatch was called in):
#   REPO       repository root                      default: the submit directory (submit from the root)
#   PYTHON     python with the requirements         default: $VIRTUAL_ENV/bin/python, else REPO/.venv/bin/python, else python3
#   DATA_ROOT  where the converters wrote shards    default: REPO/data
#   DATA       the shard directory                  default: DATA_ROOT/DATASET   (e.g. DATA=data/embedded_imgtab)
#   RUN_ROOT   where run directories go             default: REPO/runs
#   RUN_NAME   the run directory's name             default: the config's name (gaal_dvm)
#   RUN_DIR    the run directory (--out_dir)        default: RUN_ROOT/RUN_NAME
#   GPUS_PER_NODE   processes per node on GPUs      default: the GPUs SLURM gave the job (SLURM_GPUS_ON_NODE)
#   NPROC_PER_NODE  processes per node              default: GPUS_PER_NODE, or 1 without GPUs
#   MASTER_PORT     rendezvous port on the first node   default: 20000 + job id % 20000
#   MAX_RESTARTS    stop self-requeueing after this many restarts   default: 50
#
# What happens:
#   - one `accelerate launch` per node (srun --ntasks-per-node=1, slurm/node.sh) with the node's
#     machine rank, the number of machines, and the first node of `scontrol show hostnames` as the
#     main process; --multi_gpu only when there is more than one process in all, otherwise the
#     script runs directly as one process (CPU or one GPU);
#   - `--resume` is added when RUN_DIR already holds checkpoints/latest: a requeued job, or a job
#     resubmitted after a failure, continues where the last checkpoint left it; a finished run
#     (result.json) is not started again; a run directory that another job of this cluster is
#     using is refused;
#   - time limit: `#SBATCH --signal=B:USR1@<s>` signals this shell <s> seconds before the limit; it
#     forwards SIGUSR1 to the training processes (through srun, repeated every 10 s until they have
#     exited, in case they were still starting), they checkpoint at the next step boundary and exit 0,
#     and this shell requeues the job (`scontrol requeue`), which restarts with --resume (SLURM
#     holds a requeued job for about two minutes before it may start again);
#   - `scontrol requeue`, preemption and `scancel` send SIGTERM to every process of the job: the
#     training processes checkpoint at the next step boundary and exit (SLURM's KillWait bounds the
#     time they get); on restart the job resumes from that checkpoint;
#   - a training failure (non-zero exit) ends the job with that exit code; it is not requeued.
# Outside SLURM (`bash slurm/gaal_imgtab.sh`) the same command runs here, one node.

set -uo pipefail
say() { echo "[slurm] $*"; }
die() { echo "[slurm] error: $*" >&2; exit 1; }
absolute() { case "$1" in /*) echo "$1" ;; *) echo "${SLURM_SUBMIT_DIR:-$PWD}/$1" ;; esac; }

REPO="$(absolute "${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}")"
[ -f "$REPO/train/$SCRIPT.py" ] || die "no train/$SCRIPT.py under REPO=$REPO: submit from the repository root or set REPO"
[ -f "$REPO/$CONFIG" ] || die "no config $CONFIG under $REPO"
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PYTHON="$VIRTUAL_ENV/bin/python"
  elif [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"
  else PYTHON=python3; fi
fi
DATA_ROOT="$(absolute "${DATA_ROOT:-$REPO/data}")"
DATA="$(absolute "${DATA:-$DATA_ROOT/$DATASET}")"
RUN_ROOT="$(absolute "${RUN_ROOT:-$REPO/runs}")"
RUN_NAME="${RUN_NAME:-$(basename "$CONFIG" .yaml)}"
RUN_DIR="$(absolute "${RUN_DIR:-$RUN_ROOT/$RUN_NAME}")"
for arg in "$@"; do
  case "$arg" in
    --out_dir|--out_dir=*|--out-dir|--out-dir=*) die "set RUN_DIR (or RUN_ROOT / RUN_NAME) instead of $arg" ;;
    --data|--data=*) die "set DATA (or DATA_ROOT) instead of $arg" ;;
    --config|--config=*) die "this script trains $CONFIG; use another slurm/*.sh or train/$SCRIPT.py directly" ;;
  esac
done
cd "$REPO" || die "cannot cd to $REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

JOB_ID="${SLURM_JOB_ID:-}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"

# finished, or in use by another job? ------------------------------------------------------------
finished() { [ -f "$RUN_DIR/result.json" ]; }   # (unimodal writes one per modality, below RUN_DIR: never "finished" here)
if finished; then
  say "$RUN_DIR already holds result.json: the run is finished, nothing to do (choose another RUN_DIR to train again)"
  exit 0
fi
mkdir -p "$RUN_DIR" || die "cannot create RUN_DIR=$RUN_DIR"
if [ -n "$JOB_ID" ] && [ -f "$RUN_DIR/.slurm_job" ]; then
  other="$(cat "$RUN_DIR/.slurm_job")"
  if [ "$other" != "$JOB_ID" ] && [ -n "$(squeue -h -j "$other" -o %T 2>/dev/null | grep -E 'RUNNING|COMPLETING|CONFIGURING|SUSPENDED')" ]; then
    die "job $other is training in $RUN_DIR; set another RUN_DIR (or RUN_NAME)"
  fi
fi
[ -n "$JOB_ID" ] && echo "$JOB_ID" > "$RUN_DIR/.slurm_job"

# resume when a checkpoint exists ----------------------------------------------------------------
RESUME=()
if [ -f "$RUN_DIR/checkpoints/latest" ] || compgen -G "$RUN_DIR/*/checkpoints/latest" >/dev/null; then
  RESUME=(--resume)   # (unimodal keeps one run per modality under RUN_DIR)
  for arg in "$@"; do [ "$arg" = --resume ] && RESUME=(); done
fi

# nodes and processes ----------------------------------------------------------------------------
NNODES="${SLURM_JOB_NUM_NODES:-1}"
if [ -n "$JOB_ID" ]; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  MASTER_PORT="${MASTER_PORT:-$((20000 + JOB_ID % 20000))}"
else
  MASTER_ADDR=127.0.0.1
  MASTER_PORT="${MASTER_PORT:-29500}"
fi
gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
[ -z "$gpus" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ] && gpus="${SLURM_GPUS_PER_NODE##*:}"    # "a100:4" -> 4
if [ -z "$gpus" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"; gpus="${#visible[@]}"
fi
gpus="${gpus:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"
NUM_PROCESSES=$(( NNODES * NPROC_PER_NODE ))
cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cpus / NPROC_PER_NODE > 0 ? cpus / NPROC_PER_NODE : 1 ))}"
export NNODES NPROC_PER_NODE NUM_PROCESSES MASTER_ADDR MASTER_PORT PYTHON

ARGS=(train/"$SCRIPT".py --config "$CONFIG" --data "$DATA" --out_dir "$RUN_DIR" "${RESUME[@]}" "$@")
LOG=""
[ -n "$JOB_ID" ] && LOG="$(scontrol show job "$JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')"
say "job ${JOB_ID:-<none>} restart $RESTARTS on $NNODES node(s) x $NPROC_PER_NODE process(es) (GPUs per node: $gpus), main $MASTER_ADDR:$MASTER_PORT"
say "$PYTHON ${ARGS[*]}"
{
  printf '%s job=%s restart=%s nodes=%s procs=%s log=%s\n' "$(date -Is)" "${JOB_ID:--}" "$RESTARTS" \
    "${SLURM_JOB_NODELIST:-$(hostname)}" "$NUM_PROCESSES" "${LOG:--}"
  printf ' %q' "$PYTHON" "${ARGS[@]}"; echo
} >> "$RUN_DIR/slurm_jobs.log"

if [ -z "$JOB_ID" ]; then   # not under SLURM: this machine is the one node
  SLURM_NODEID=0 exec bash "$REPO/slurm/node.sh" "${ARGS[@]}"
fi

# signals ----------------------------------------------------------------------------------------
STOP=""
SRUN_PID=""
forward_usr1() {   # until the training has exited: it may still be importing when the first one comes
  while kill -0 "$SRUN_PID" 2>/dev/null; do kill -USR1 "$SRUN_PID" 2>/dev/null; sleep 10; done
}
on_usr1() {
  say "SIGUSR1 (time limit near): the training checkpoints at the next step and exits; then requeue"
  STOP=USR1
  [ -n "$SRUN_PID" ] && forward_usr1 &
}
on_term() {
  say "SIGTERM (cancel, requeue or preemption): the training checkpoints at the next step and exits"
  STOP="${STOP:-TERM}"
}
trap on_usr1 USR1
trap on_term TERM

srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
  bash "$REPO/slurm/node.sh" "${ARGS[@]}" &
SRUN_PID=$!
[ "$STOP" = USR1 ] && forward_usr1 &
while :; do   # `wait` returns early (status > 128) when a trapped signal arrives
  wait "$SRUN_PID"; rc=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done
wait "$SRUN_PID" 2>/dev/null; last=$?   # srun ended during a trap: its own status (127: already had it)
[ "$last" != 127 ] && rc=$last

if [ "$rc" = 0 ] && finished; then
  say "finished: $RUN_DIR"
  exit 0
fi
if [ "$STOP" = USR1 ] && [ "$rc" = 0 ]; then
  if [ "$RESTARTS" -ge "${MAX_RESTARTS:-50}" ]; then
    say "checkpointed; not requeueing: already restarted $RESTARTS times (MAX_RESTARTS)"; exit 0
  fi
  say "checkpointed; requeueing job $JOB_ID (it resumes from $RUN_DIR/checkpoints)"
  scontrol requeue "$JOB_ID" || die "scontrol requeue failed: resubmit this script to resume"
  exit 0
fi
if [ "$STOP" = TERM ]; then
  say "stopped by SIGTERM (exit $rc); if the job was requeued it resumes from the last checkpoint"
  exit "$rc"
fi
[ "$rc" = 0 ] || say "training failed (exit $rc); not requeued. Fix it and resubmit: it resumes from the last checkpoint"
exit "$rc"
