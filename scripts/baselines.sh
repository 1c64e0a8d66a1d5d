#!/usr/bin/env bash
# Joint and unimodal baselines on the three embedded flavours, then the README's baseline table.
# Usage: bash scripts/baselines.sh [OUT=runs/baselines] [extra training flags...]
# Resumable: a finished run is skipped; a run stopped before its end (a kill or a preemption: the loop
# checkpoints and exits 0) continues from its checkpoint with --resume when the command is run again.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out="${1:-runs/baselines}"; shift || true
mkdir -p "$out/logs"   # the logs beside the runs would read as runs to summarize.py
for flavour in imgtab av seq3; do
  for script in joint unimodal; do
    dir="$out/${script}_${flavour}"
    if [ -e "$dir/.done" ]; then echo "[baselines] $dir done, skipping"; continue; fi
    log="$out/logs/${script}_${flavour}.log"; resume=(); has_checkpoint "$dir" && resume=(--resume true)
    python "train/$script.py" --config "train/configs/${script}_${flavour}.yaml" --out_dir "$dir" \
      --progress false "${resume[@]}" "$@" 2>&1 | tee "$log"
    if grep -q '^\[stop\] .*checkpoint written' "$log"; then
      echo "[baselines] $dir stopped before its end: run the same command again to continue it"; exit 0
    fi
    touch "$dir/.done"
  done
done
python scripts/summarize.py "$out"
