# Sourced by the other scripts (or run: `bash scripts/env.sh`): create .venv (or $VENV), install
# the exact pins of requirements.txt into it, then this checkout as an editable package
# (`pip install --no-deps -e .`, pyproject.toml: `import train, models, methods, data_prep,
# benchmarks` from anywhere, `python train/x.py` without PYTHONPATH). Each is redone only when
# requirements.txt / pyproject.toml change, or when the venv's editable install points at another
# checkout.
# Ends with the venv active in the calling script, the working directory at the repository root,
# and one line telling the user how to activate it in their own shell.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
caller_venv="${VIRTUAL_ENV:-}"
caller_pwd="$PWD"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
activate="$VENV/bin/activate"
# shellcheck disable=SC1090
. "$activate"
stamp="$VENV/.requirements.sha256"
want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[env] installing requirements.txt (torch takes ~2 minutes)"
  python -m pip install --quiet -r "$ROOT/requirements.txt"
  echo "$want" > "$stamp"
fi
# this checkout, editable: after the pins (--no-deps: pyproject.toml repeats them, nothing else comes in)
pkg_stamp="$VENV/.editable.sha256"
pkg_want="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $ROOT"
installed_from() {   # where `import train` resolves outside any working directory (-I: no cwd, no PYTHONPATH)
  python -I -c 'import importlib.util as u; s = u.find_spec("train"); print(s.origin if s else "")' 2>/dev/null || true
}
if [ "$(cat "$pkg_stamp" 2>/dev/null || true)" != "$pkg_want" ] || [ "$(installed_from)" != "$ROOT/train/__init__.py" ]; then
  echo "[env] installing this checkout editable ($ROOT)"
  python -m pip install --quiet --no-deps -e "$ROOT"
  echo "$pkg_want" > "$pkg_stamp"
fi
# has_checkpoint DIR: DIR, or a run below it (unimodal.py: one run per modality), holds a checkpoint
# --resume can continue from (train.checkpoint.has_checkpoint). Exported: xargs' `bash -c` sees it.
has_checkpoint() {
  python -c 'import sys; from pathlib import Path; from train.checkpoint import has_checkpoint as has
d = Path(sys.argv[1]); sys.exit(not d.is_dir() or not any(has(r) for r in [d, *d.iterdir()]))' "$1"
}
export -f has_checkpoint
cd "$ROOT"
if [ -z "$caller_venv" ] || [ "$(cd "$caller_venv" 2>/dev/null && pwd -P)" != "$(cd "$VENV" && pwd -P)" ]; then   # not active in the caller
  if [ "$caller_pwd" = "$ROOT" ] && [ "$VENV" = "$ROOT/.venv" ]; then activate=".venv/bin/activate"; else activate="$VENV/bin/activate"; fi
  echo "[env] accelerate, tensorboard and pytest on your PATH: . $activate"
fi
