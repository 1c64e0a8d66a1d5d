#!/bin/bash
# IGM on NVGesture (depth, rgb, optical flow): train/igm.py --config train/configs/igm_nvgesture.yaml
#   sbatch slurm/igm_nvgesture.sh [--key value ...]        # from the repository root; flags go to train/igm.py
#   DATA=/data/shards/nvgesture RUN_NAME=igm_nvgesture_seed1 sbatch slurm/igm_nvgesture.sh --seed 1
# The #SBATCH lines are defaults: edit them here, or override them on the sbatch command line
# (sbatch --nodes=2 ...; --gpus-per-node=0 on a cluster without GPUs). The environment (DATA,
# RUN_DIR, ...), automatic --resume, signals and requeueing: slurm/launch.sh.
#SBATCH --job-name=igm_nvgesture
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
SCRIPT=igm CONFIG=train/configs/igm_nvgesture.yaml DATASET=nvgesture
. "${REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh" ||
  { echo "slurm/launch.sh not found: submit from the repository root or set REPO" >&2; exit 1; }
