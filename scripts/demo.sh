#!/usr/bin/env bash
# Fresh machine -> a trained joint baseline on the embedded image+tabular benchmark (generated into
# data/ on first use) and its closing table.
# Extra arguments go to the training script (e.g. --epochs 5).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# accelerate launch sets OMP_NUM_THREADS=1 when it is unset; on a CPU machine use every core (and
# the same thread count as the README's figures, which depend on it in the last bits)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
out="runs/demo_joint_imgtab_$(date +%Y%m%d_%H%M%S)"
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train/joint.py --out_dir "$out" "$@"
