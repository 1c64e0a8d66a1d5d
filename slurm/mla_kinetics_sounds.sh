#!/bin/bash
# MLA on Kinetics-Sounds (audio-visual): train/mla.py --config train/configs/mla_kinetics_sounds.yaml
# ---- what a cluster user edits here (or overrides: sbatch --partition=p --time=2:00:00 slurm/mla_kinetics_sounds.sh) ----
##SBATCH --partition=gpu
##SBATCH --account=my_account
#SBATCH --nodes=1 --gpus-per-node=1 --cpus-per-task=8
#SBATCH --time=48:00:00
# ---- the launcher protocol (slurm/train.sbatch explains it; keep) ----
#SBATCH --job-name=mla_kinetics_sounds --ntasks-per-node=1 --output=slurm/logs/%x-%j.out --open-mode=append
#SBATCH --signal=B:USR1@300 --requeue
DATA="${DATA:-}"   # the shards; empty: ${DATA_ROOT:-<repository>/data}/kinetics_sounds
SCRIPT=mla CONFIG=train/configs/mla_kinetics_sounds.yaml DATASET=kinetics_sounds
# sbatch slurm/mla_kinetics_sounds.sh [--seed 1 ...] from the repository root: flags go to train/mla.py; DATA, RUN_NAME,
# RUN_DIR, ... and automatic --resume, signals, requeueing: slurm/train.sbatch
. "${REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/train.sbatch" ||
  { echo "slurm/train.sbatch not found: submit from the repository root or set REPO" >&2; exit 1; }
