#!/usr/bin/env bash
# Packaging and lint checks for CI: `ruff check`, then build the wheel, install it into a fresh venv in
# a temporary folder and train a packaged config by bare name from outside the repository.
# Usage: scripts/check_package.sh [PYTHON]   (default .venv/bin/python, which must hold the dependencies
# and ruff; RUFF=path/to/ruff overrides the latter)
# Quiet when everything passes (one line per check); shows the log of a failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${1:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
LOG=$TMP/log

step() {  # step NAME COMMAND...: run quietly, print the log if it fails
  local name=$1; shift
  if "$@" >"$LOG" 2>&1; then
    echo "$name: ok"
  else
    echo "$name: FAILED"; cat "$LOG"; exit 1
  fi
}

if [ -n "${RUFF:-}" ]; then step "ruff check" "$RUFF" check "$REPO"; else step "ruff check" "$PY" -m ruff check "$REPO"; fi

# The wheel, into a fresh venv. Its dependencies are not installed again: the venv reads them from the
# site-packages of $PY through a .pth line (a plain path, so the editable install there stays inactive).
# Built from a copy of what the wheel needs, so that no build/ or *.egg-info is left in the repository.
mkdir -p "$TMP/project"
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/src" "$TMP/project/"
find "$TMP/project" -name __pycache__ -prune -exec rm -rf {} +
step "wheel build" "$PY" -m pip wheel --no-deps -q -w "$TMP/dist" "$TMP/project"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
BASE_PY=$("$PY" -c "import sys; print(sys._base_executable)")
step "wheel install" bash -c "
  '$BASE_PY' -m venv --without-pip '$TMP/venv' &&
  VSITE=\$('$TMP/venv/bin/python' -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])') &&
  echo '$SITE' > \"\$VSITE/_itmatch_ci_deps.pth\" &&
  '$PY' -m pip --python '$TMP/venv/bin/python' install -q --no-deps --no-index '$TMP'/dist/itmatch-*.whl"

# From a folder outside the repository: the package (configs included) must come from the wheel.
mkdir -p "$TMP/elsewhere"
cd "$TMP/elsewhere"
step "wheel is what runs" "$TMP/venv/bin/python" -c "
import itmatch, itmatch.config as c, sys
assert itmatch.__file__.startswith('$TMP/venv'), itmatch.__file__
assert 'vse_scenes' in c.packaged_config_names() and len(c.packaged_config_names()) >= 19
"
step "train a packaged config by name" env ITMATCH_CACHE="$TMP/cache" OMP_NUM_THREADS=2 \
  "$TMP/venv/bin/itmatch" train --config vse_scenes --set data.root=scenes:tiny --set train.max_steps=2 \
  --set train.epochs=1 --out "$TMP/run"
test -f "$TMP/run/best/config.json"
