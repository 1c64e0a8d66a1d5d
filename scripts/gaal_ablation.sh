#!/usr/bin/env bash
# GAAL ablation on the embedded image+tabular benchmark, 3 seeds, plus the joint baseline, then the
# README table (mean ± std over seeds of test accuracy). Resumable: finished runs are skipped.
# Usage: bash scripts/gaal_ablation.sh [OUT=runs/gaal_ablation] [PARALLEL=2]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out="${1:-runs/gaal_ablation}"; parallel="${2:-2}"
mkdir -p "$out"
jobs="$out/jobs.txt"; : > "$jobs"
for seed in 0 1 2; do
  echo "joint_s$seed train/joint.py --config train/configs/joint_imgtab.yaml" >> "$jobs"
  echo "official_s$seed train/gaal.py --variant official" >> "$jobs"
  echo "no_surgery_s$seed train/gaal.py --variant official --surgery false" >> "$jobs"
  echo "full_guidance_s$seed train/gaal.py --variant official --guidance full" >> "$jobs"
  echo "paper_s$seed train/gaal.py --variant paper" >> "$jobs"
done
run_one() {
  name="$1"; shift; script="$1"; shift
  dir="$OUT/$name"; seed="${name##*_s}"
  [ -e "$dir/.done" ] && { echo "[ablation] $name done"; return 0; }
  rm -rf "$dir"
  OMP_NUM_THREADS=$(( $(nproc) / PARALLEL > 0 ? $(nproc) / PARALLEL : 1 )) \
    python "$script" "$@" --seed "$seed" --out_dir "$dir" --progress false > "$dir.log" 2>&1 \
    && touch "$dir/.done" && echo "[ablation] $name finished"
}
export -f run_one; export OUT="$out" PARALLEL="$parallel"
xargs -P "$parallel" -L 1 bash -c 'run_one "$@"' _ < "$jobs"
python scripts/summarize.py --ablation "$out"
