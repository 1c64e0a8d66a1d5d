#!/usr/bin/env bash
# Fresh machine -> the test suite (CPU). Extra arguments go to pytest (e.g. -k shards, -m gpu).
#   bash scripts/test.sh                 # everything (CI)
#   bash scripts/test.sh --quick         # the fast tier: every test not marked slow (each method's step maths
#                                        # and released-step parity, config and data refusals, one tiny
#                                        # end-to-end run), a few minutes on 2 cores
#   bash scripts/test.sh --unit          # the unit tier: tests that run in the pytest process alone
#   bash scripts/test.sh --integration   # the integration tier: tests that start another program or process
#                                        # group (scripts, launchers, shell scripts, SLURM, spawned ranks)
# The tiers are pytest markers that tests/conftest.py sets from each test's source (pytest.ini); --quick
# combines with either (--quick --unit: the unit tests not marked slow).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
selection=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) selection+=("not slow") ;;
    --unit) selection+=("unit") ;;
    --integration) selection+=("integration") ;;
    *) break ;;
  esac
  shift
done
if [[ " ${selection[*]-} " == *" unit "* && " ${selection[*]-} " == *" integration "* ]]; then
  echo "error: scripts/test.sh: --unit and --integration select disjoint tiers; give one (neither: both)" >&2
  exit 2
fi
if [ ${#selection[@]} -gt 0 ]; then
  set -- -m "$(printf '%s and ' "${selection[@]}")not gpu" "$@"
fi
python -m pytest -q "$@"
