#!/bin/bash
# CGGM on CMU-MOSI (regression): train/cggm.py --config train/configs/cggm_mosi.yaml
#   sbatch slurm/cggm_mosi.sh [--key value ...]        # from the repository root; flags go to train/cggm.py
#   DATA=/data/shards/mosi RUN_NAME=cggm_mosi_seed1 sbatch slurm/cggm_mosi.sh --seed 1
# The #SBATCH lines are defaults: edit them here, or override them on the sbatch command line
# (sbatch --nodes=2 ...; --gpus-per-node=0 on a cluster without GPUs). The environment (DATA,
# RUN_DIR, ...), automatic --resume, signals and requeueing: slurm/launch.sh.
#SBATCH --job-name=cggm_mosi
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
SCRIPT=cggm CONFIG=train/configs/cggm_mosi.yaml DATASET=mosi
. "${REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh" ||
  { echo "slurm/launch.sh not found: submit from the repository root or set REPO" >&2; exit 1; }
