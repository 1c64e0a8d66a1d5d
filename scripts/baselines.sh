#!/usr/bin/env bash
# Joint and unimodal baselines on the three embedded flavours, then the README's baseline table.
# Usage: bash scripts/baselines.sh [OUT=runs/baselines] [extra training flags...]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out="${1:-runs/baselines}"; shift || true
for flavour in imgtab av seq3; do
  for script in joint unimodal; do
    dir="$out/${script}_${flavour}"
    if [ -e "$dir/.done" ]; then echo "[baselines] $dir done, skipping"; continue; fi
    python "train/$script.py" --config "train/configs/${script}_${flavour}.yaml" --out_dir "$dir" \
      --progress false "$@"
    touch "$dir/.done"
  done
done
python scripts/summarize.py "$out"
