#!/bin/bash
# CGGM on the embedded three-sequence benchmark (small: CPU is enough): train/cggm.py --config train/configs/cggm_seq3.yaml
#   sbatch slurm/cggm_seq3.sh [--key value ...]        # from the repository root; flags go to train/cggm.py
#   DATA=/data/shards/embedded_seq3 RUN_NAME=cggm_seq3_seed1 sbatch slurm/cggm_seq3.sh --seed 1
# The #SBATCH lines are defaults: edit them here, or override them on the sbatch command line
# (sbatch --nodes=2 ...; --gpus-per-node=0 on a cluster without GPUs). The environment (DATA,
# RUN_DIR, ...), automatic --resume, signals and requeueing: slurm/launch.sh.
#SBATCH --job-name=cggm_seq3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=0
#SBATCH --cpus-per-task=4
#SBATCH --time=02:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
SCRIPT=cggm CONFIG=train/configs/cggm_seq3.yaml DATASET=embedded_seq3
. "${REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh" ||
  { echo "slurm/launch.sh not found: submit from the repository root or set REPO" >&2; exit 1; }
