#!/bin/bash
# GAAL on the embedded audio-visual benchmark (small: CPU is enough): train/gaal.py --config train/configs/gaal_av.yaml
# ---- what a cluster user edits here (or overrides: sbatch --partition=p --time=2:00:00 slurm/gaal_av.sh) ----
##SBATCH --partition=gpu
##SBATCH --account=my_account
#SBATCH --nodes=1 --gpus-per-node=0 --cpus-per-task=4
#SBATCH --time=02:00:00
# ---- the launcher protocol (slurm/train.sbatch explains it; keep) ----
#SBATCH --job-name=gaal_av --ntasks-per-node=1 --output=slurm/logs/%x-%j.out --open-mode=append
#SBATCH --signal=B:USR1@300 --requeue
DATA="${DATA:-}"   # the shards; empty: ${DATA_ROOT:-<repository>/data}/embedded_av
SCRIPT=gaal CONFIG=train/configs/gaal_av.yaml DATASET=embedded_av
# sbatch slurm/gaal_av.sh [--seed 1 ...] from the repository root: flags go to train/gaal.py; DATA, RUN_NAME,
# RUN_DIR, ... and automatic --resume, signals, requeueing: slurm/train.sbatch
. "${REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/train.sbatch" ||
  { echo "slurm/train.sbatch not found: submit from the repository root or set REPO" >&2; exit 1; }
