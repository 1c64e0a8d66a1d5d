#!/bin/bash
# IGM on Twitter2015 (image-text features): train/igm.py --config train/configs/igm_twitter2015.yaml
#   sbatch slurm/igm_twitter2015.sh [--key value ...]        # from the repository root; flags go to train/igm.py
#   DATA=/data/shards/twitter2015 RUN_NAME=igm_twitter2015_seed1 sbatch slurm/igm_twitter2015.sh --seed 1
# The #SBATCH lines are defaults: edit them here, or override them on the sbatch command line
# (sbatch --nodes=2 ...; --gpus-per-node=0 on a cluster without GPUs). The environment (DATA,
# RUN_DIR, ...), automatic --resume, signals and requeueing: slurm/launch.sh.
#SBATCH --job-name=igm_twitter2015
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
SCRIPT=igm CONFIG=train/configs/igm_twitter2015.yaml DATASET=twitter2015
. "${REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh" ||
  { echo "slurm/launch.sh not found: submit from the repository root or set REPO" >&2; exit 1; }
