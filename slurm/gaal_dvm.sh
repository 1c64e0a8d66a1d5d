#!/bin/bash
# GAAL on DVM-CAR (ResNet-50, 128x128 images + table): train/gaal.py --config train/configs/gaal_dvm.yaml
#   sbatch slurm/gaal_dvm.sh [--key value ...]        # from the repository root; flags go to train/gaal.py
#   DATA=/data/shards/dvm RUN_NAME=gaal_dvm_seed1 sbatch slurm/gaal_dvm.sh --seed 1
# The #SBATCH lines are defaults: edit them here, or override them on the sbatch command line
# (sbatch --nodes=2 ...; --gpus-per-node=0 on a cluster without GPUs). The environment (DATA,
# RUN_DIR, ...), automatic --resume, signals and requeueing: slurm/launch.sh.
#SBATCH --job-name=gaal_dvm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
SCRIPT=gaal CONFIG=train/configs/gaal_dvm.yaml DATASET=dvm
. "${REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh" ||
  { echo "slurm/launch.sh not found: submit from the repository root or set REPO" >&2; exit 1; }
