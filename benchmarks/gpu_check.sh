#!/usr/bin/env bash
# The GPU check of a device session, one command, under 8 minutes on one H100:
#
#     bash benchmarks/gpu_check.sh             # on the GPU machine, from the repository root
#     bash benchmarks/gpu_check.sh --dry-run   # (or DRY_RUN=1) the same stages on CPU at tiny sizes (CI)
#
# Stages, each under its own time limit (timeout; rc 124 = the stage ran past it):
#   versions    python / torch / CUDA / cuDNN versions and the device          -> versions.txt
#   nvidia-smi  `nvidia-smi` (and its per-GPU query)                            -> nvidia-smi.txt
#   pytest      `pytest -m gpu` over the test files that hold gpu-marked tests (tests/test_gpu.py,
#               test_models.py, test_augment.py: found by grep, so a machine without the converters'
#               packages does not fail collecting the other files), in parallel with pytest-xdist
#               (-n $PYTEST_WORKERS, default 8) when it is installed      -> pytest.log, pytest-junit.xml
#   perf        `python benchmarks/perf.py --device cuda --shapes full --fast --profile_fast --steps 3
#               --repeats 3`: steps, GPU path (+ its torch.profiler tables), data path, scaling
#                                                                            -> perf.log, perf.md (tables)
#   compile     benchmarks/capture.py: GAAL official (DVM shape) and IGM official (CREMA-D shape) as one
#               torch.compile'd step (mode reduce-overhead: CUDA graphs) against eager: parameter
#               difference, graphs and breaks, compilation time, step times (its own stage: compiling
#               can take minutes, and a stage that runs past its limit loses only itself) -> compile.log
# Everything goes to one folder: $OUT if set, else runs/gpu_check_<UTC date-time>; summary.txt lists
# each stage's exit code and duration (`<stage> rc=<code> seconds=<s>`), and the script exits non-zero
# when a stage failed. The interpreter is $PYTHON, else `python`, else `python3`.
#
# Dry run: versions and nvidia-smi as above (nvidia-smi absent is recorded, not an error), pytest only
# collects the gpu tests (--collect-only: they need CUDA), perf.py runs on the CPU with
# `--device cpu --shapes cpu --steps 1 --repeats 1 --sections scaling` (its steps and data sections take
# minutes on a CPU even at one step, so the dry run exercises the entry point and the Markdown output
# through the scaling section only), and the compile stage is left out.
#
# Time limits (seconds; override with the environment): T_PYTEST=150, T_PERF=150, T_COMPILE=180,
# T_SMALL=25 (versions, nvidia-smi each): worst case 150 + 150 + 180 + 2 x 25 = 530 s. Measured on one
# H200 (2026-11-28, 16 cores): pytest 91-103 s with 8 workers, perf 102 s, compile 132 s, ~340 s in
# all (+ about 30 s to start the machine). PERF_ARGS
# replaces perf.py's arguments. perf.py writes its Markdown only at its end: if it runs past its limit,
# the tables it finished are in its log (it prints each section as it completes).
set -u
cd "$(dirname "$0")/.."

DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
    esac
done

OUT=${OUT:-runs/gpu_check_$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1   # a stage killed by its timeout still leaves everything it printed in its log
PY=${PYTHON:-$(command -v python || command -v python3)}
T_PYTEST=${T_PYTEST:-150}
T_PERF=${T_PERF:-150}
T_COMPILE=${T_COMPILE:-180}
T_SMALL=${T_SMALL:-25}
SUMMARY="$OUT/summary.txt"
{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) mode: $([ "$DRY_RUN" = 1 ] && echo dry-run || echo gpu)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
} > "$SUMMARY"
FAILED=0

# stage NAME LIMIT LOG COMMAND...: run COMMAND under `timeout LIMIT`, stdout+stderr to LOG, one summary line
stage() {
    local name=$1 limit=$2 log=$3; shift 3
    local start end rc
    start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    printf '%s rc=%d seconds=%.1f limit=%s cmd=%s\n' "$name" "$rc" "$(awk "BEGIN { print $end - $start }")" "$limit" "$(printf '%s' "$*" | tr '\n' ' ' | tr -s ' ' | cut -c1-200)" >> "$SUMMARY"
    echo "[gpu_check] $name: rc=$rc ($log)"
    return $rc
}

stage versions "$T_SMALL" "$OUT/versions.txt" "$PY" -c '
import platform, sys, torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
' || FAILED=1

if command -v nvidia-smi > /dev/null; then
    stage nvidia-smi "$T_SMALL" "$OUT/nvidia-smi.txt" bash -c 'nvidia-smi && nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu,temperature.gpu,clocks.sm,clocks.max.sm --format=csv' \
        || { [ "$DRY_RUN" = 1 ] || FAILED=1; }
else
    echo "nvidia-smi: not found on this machine" > "$OUT/nvidia-smi.txt"
    echo "nvidia-smi rc=127 seconds=0.0 limit=$T_SMALL cmd=nvidia-smi (not found)" >> "$SUMMARY"
    [ "$DRY_RUN" = 1 ] || FAILED=1
fi

# only the files that hold gpu-marked tests: collecting the others imports the converters' packages
mapfile -t GPU_TEST_FILES < <(grep -l "mark.gpu" tests/test_*.py)
if [ "$DRY_RUN" = 1 ]; then
    stage pytest "$T_PYTEST" "$OUT/pytest.log" "$PY" -m pytest -m gpu -q -p no:cacheprovider --collect-only \
        --junitxml="$OUT/pytest-junit.xml" "${GPU_TEST_FILES[@]}" || FAILED=1
    PERF_ARGS=${PERF_ARGS:---device cpu --shapes cpu --steps 1 --repeats 1 --sections scaling}
else
    XDIST=()
    "$PY" -c "import xdist" 2> /dev/null && XDIST=(-n "${PYTEST_WORKERS:-8}")
    stage pytest "$T_PYTEST" "$OUT/pytest.log" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs "${XDIST[@]}" \
        --junitxml="$OUT/pytest-junit.xml" "${GPU_TEST_FILES[@]}" || FAILED=1
    PERF_ARGS=${PERF_ARGS:---device cuda --shapes full --fast --profile_fast --steps 3 --repeats 3}
fi
# shellcheck disable=SC2086  # PERF_ARGS is a list of words
stage perf "$T_PERF" "$OUT/perf.log" "$PY" benchmarks/perf.py $PERF_ARGS --markdown "$OUT/perf.md" || FAILED=1
if [ "$DRY_RUN" != 1 ]; then
    # the whole step compiled (train/capture.py, `compile: step`) at the GPU path's shapes
    stage compile "$T_COMPILE" "$OUT/compile.log" bash -c "'$PY' benchmarks/capture.py --device cuda --methods gaal \
        --rows 'gaal official' --shape dvm && '$PY' benchmarks/capture.py --device cuda --methods igm \
        --rows 'igm official' --shape crema_d" || FAILED=1
fi

echo "failed: $FAILED" >> "$SUMMARY"
echo "[gpu_check] summary: $SUMMARY"
cat "$SUMMARY"
exit $FAILED
