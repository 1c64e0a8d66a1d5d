#!/usr/bin/env bash
# A method's ablation on the embedded benchmark, 3 seeds, then the README table (mean ± std over
# seeds of test accuracy), the evaluation of each finished run (train.evaluate: Shapley modality
# contributions, missing and noisy modalities -> <run>/evaluation.json) and the report with figures
# (scripts/report.py -> <OUT>/report/report.md, whose path is printed last). The runs are listed in
# scripts/ablations/<method>.jobs. Resumable: finished runs (and their evaluations) are skipped, and a
# run that was stopped (a kill, a preemption, the end of a session: the loop checkpoints on SIGTERM and
# exits 0 without result.json) continues from its checkpoint with --resume when the runner is started
# again; only a run that left no checkpoint starts over. A run counts as finished when it wrote result.json.
# Usage: bash scripts/ablation.sh <jobs> [OUT=runs/<jobs>_ablation] [PARALLEL=2]
#   <jobs>: gaal|igm|cggm|cggm_av|... (a file scripts/ablations/<jobs>.jobs), or the path of a .jobs file
#   env SEEDS="0 1 2 3 4" (default "0 1 2"): the seeds each row runs with
#   env ROWS="official no_surgery" (default: every row): run only these rows of the jobs file
#   env THREADS=1 (default: nproc / PARALLEL): OMP threads of each run
#   env REFERENCE=joint,ogm_ge (default joint): the report's paired differences, a table against each
# A second invocation with the same arguments while the first runs shares its queue: each run is
# claimed with a lock (flock on <OUT>/<run>.lock), so two invocations never run the same one; they
# evaluate one after the other (flock on <OUT>/.evaluate.lock).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
method="${1:?usage: bash scripts/ablation.sh gaal|igm|cggm|... [OUT] [PARALLEL]}"
spec="scripts/ablations/$method.jobs"
[[ "$method" == *.jobs && -f "$method" ]] && { spec="$method"; method="$(basename "$method" .jobs)"; }
[ -f "$spec" ] || { echo "no $spec (methods: $(ls scripts/ablations | sed 's/.jobs//' | tr '\n' ' '))" >&2; exit 2; }
out="${2:-runs/${method}_ablation}"; parallel="${3:-2}"
mkdir -p "$out"
jobs="$out/jobs.txt"; list="$(mktemp "$out/.jobs.XXXXXX")"
seeds="${SEEDS:-0 1 2}"; rows=" ${ROWS:-} "
for seed in $seeds; do
  grep -v '^\s*#' "$spec" | grep -v '^\s*$' | while read -r name rest; do
    [ "$rows" = "  " ] || [[ "$rows" == *" $name "* ]] || continue
    echo "${name}_s$seed $rest"
  done >> "$list"
done
[ -s "$list" ] || { rm -f "$list"; echo "no runs selected (ROWS='${ROWS:-}', SEEDS='$seeds')" >&2; exit 2; }
mv "$list" "$jobs"   # atomic: an invocation already reading the old list keeps it
run_one() {
  name="$1"; shift; script="$1"; shift
  dir="$OUT/$name"; seed="${name##*_s}"
  [ -e "$dir/.done" ] && { echo "[ablation] $name done"; return 0; }
  exec 9>"$dir.lock"
  flock -n 9 || { echo "[ablation] $name is running in another invocation"; return 0; }
  [ -e "$dir/.done" ] && { echo "[ablation] $name done"; return 0; }
  resume=()
  if has_checkpoint "$dir"; then
    resume=(--resume true); echo "[ablation] $name continues from its checkpoint"
  else
    rm -rf "$dir"; : > "$dir.log"   # nothing to continue from: start over
  fi
  OMP_NUM_THREADS=${THREADS:-$(( $(nproc) / PARALLEL > 0 ? $(nproc) / PARALLEL : 1 ))} \
    python "$script" "$@" --seed "$seed" --out_dir "$dir" --progress false "${resume[@]}" >> "$dir.log" 2>&1 \
    || { echo "[ablation] $name failed (exit $?): $dir.log" >&2; return 1; }
  if [ -e "$dir/result.json" ]; then
    touch "$dir/.done"; echo "[ablation] $name finished"
  else   # stopped (exit 0 after a stop checkpoint): a second invocation continues it
    echo "[ablation] $name stopped before the end: run the same command again to continue it"
  fi
}
export -f run_one; export OUT="$out" PARALLEL="$parallel"
xargs -P "$parallel" -L 1 bash -c 'run_one "$@"' _ < "$jobs"
python scripts/summarize.py --ablation "$out"
# two invocations sharing the queue evaluate one after the other: the second then finds the runs
# evaluated (train.evaluate skips a run whose evaluation.json matches its best.pt) and adds only
# the runs that finished since
exec 8>"$out/.evaluate.lock"; flock 8
finished=(); for dir in "$out"/*_s*/; do [ -e "$dir.done" ] && finished+=("${dir%/}"); done
[ ${#finished[@]} -gt 0 ] || { echo "no finished run under $out: no report" >&2; exit 2; }
python -m train.evaluate "${finished[@]}"
python scripts/report.py "$out" --out "$out/report" --reference "${REFERENCE:-joint}"   # prints "report: <OUT>/report/report.md"
