#!/bin/bash
# GAAL on CelebA (ResNet-50, 225x225 images + attributes): train/gaal.py --config train/configs/gaal_celeba.yaml
# ---- what a cluster user edits here (or overrides: sbatch --partition=p --time=2:00:00 slurm/gaal_celeba.sh) ----
##SBATCH --partition=gpu
##SBATCH --account=my_account
#SBATCH --nodes=1 --gpus-per-node=4 --cpus-per-task=32
#SBATCH --time=24:00:00
# ---- the launcher protocol (slurm/train.sbatch explains it; keep) ----
#SBATCH --job-name=gaal_celeba --ntasks-per-node=1 --output=slurm/logs/%x-%j.out --open-mode=append
#SBATCH --signal=B:USR1@300 --requeue
DATA="${DATA:-}"   # the shards; empty: ${DATA_ROOT:-<repository>/data}/celeba
SCRIPT=gaal CONFIG=train/configs/gaal_celeba.yaml DATASET=celeba
# sbatch slurm/gaal_celeba.sh [--seed 1 ...] from the repository root: flags go to train/gaal.py; DATA, RUN_NAME,
# RUN_DIR, ... and automatic --resume, signals, requeueing: slurm/train.sbatch
. "${REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/train.sbatch" ||
  { echo "slurm/train.sbatch not found: submit from the repository root or set REPO" >&2; exit 1; }
