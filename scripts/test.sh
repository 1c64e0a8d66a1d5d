#!/usr/bin/env bash
# Fresh machine -> the test suite (CPU). Extra arguments go to pytest (e.g. -k shards, -m gpu).
#   bash scripts/test.sh            # everything (CI)
#   bash scripts/test.sh --quick    # the fast tier: every test not marked slow (each method's step maths
#                                   # and released-step parity, config and data refusals, one tiny
#                                   # end-to-end run), a few minutes on 2 cores
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ "${1:-}" = --quick ]; then
  shift
  set -- -m "not slow and not gpu" "$@"
fi
python -m pytest -q "$@"
