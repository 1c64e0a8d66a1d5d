#!/usr/bin/env bash
# Fresh machine -> the test suite (CPU). Extra arguments go to pytest (e.g. -k shards, -m gpu).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q "$@"
