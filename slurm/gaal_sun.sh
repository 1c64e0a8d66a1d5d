#!/bin/bash
# GAAL on SUN Attribute (ResNet-50, 225x225 images + attributes): train/gaal.py --config train/configs/gaal_sun.yaml
#   sbatch slurm/gaal_sun.sh [--key value ...]        # from the repository root; flags go to train/gaal.py
#   DATA=/data/shards/sun_attribute RUN_NAME=gaal_sun_seed1 sbatch slurm/gaal_sun.sh --seed 1
# The #SBATCH lines are defaults: edit them here, or override them on the sbatch command line
# (sbatch --nodes=2 ...; --gpus-per-node=0 on a cluster without GPUs). The environment (DATA,
# RUN_DIR, ...), automatic --resume, signals and requeueing: slurm/launch.sh.
#SBATCH --job-name=gaal_sun
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
SCRIPT=gaal CONFIG=train/configs/gaal_sun.yaml DATASET=sun_attribute
. "${REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh" ||
  { echo "slurm/launch.sh not found: submit from the repository root or set REPO" >&2; exit 1; }
