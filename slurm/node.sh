# Started once per node by slurm/launch.sh (srun --ntasks-per-node=1): this node's training
# processes. Arguments: train/<script>.py and its flags. Environment from launch.sh: PYTHON, NNODES,
# NPROC_PER_NODE, NUM_PROCESSES, MASTER_ADDR, MASTER_PORT; SLURM_NODEID is this node's machine rank.
#
# SIGUSR1 is ignored here and therefore in the launcher, which inherits the disposition: SLURM (and
# srun) deliver signals to every process of the step, and SIGUSR1 would kill a launcher that does
# not handle it; the training script installs its own handler (train/common.py Preemption) and
# checkpoints. SIGTERM is left to the launcher (torch's elastic agent passes it on and waits).
set -euo pipefail
trap '' USR1
if [ "$NUM_PROCESSES" -le 1 ]; then
  exec "$PYTHON" "$@"   # one process (CPU or one GPU): no launcher needed
fi
exec "$PYTHON" -m accelerate.commands.launch --multi_gpu \
  --num_machines "$NNODES" --num_processes "$NUM_PROCESSES" --machine_rank "${SLURM_NODEID:-0}" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  --mixed_precision no --dynamo_backend no "$@"
