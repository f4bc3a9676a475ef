# Shared setup for the README commands and CI (source it, don't run it).
# Everything reusable lives outside the clone, keyed so a stale cache is
# never used: $MEDREASON_CACHE (default ~/.cache/medreason-pipeline).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export MEDREASON_CACHE=${MEDREASON_CACHE:-$HOME/.cache/medreason-pipeline}
# One cargo target dir outside the clone: a fresh CI clone reuses the build.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$MEDREASON_CACHE/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
mkdir -p "$MEDREASON_CACHE"
# Build against libtorch by its resolved path, not the clone-relative
# `.libtorch` of .cargo/config.toml: torch-sys rebuilds (and with it every
# crate above it) whenever LIBTORCH changes, so clones and worktrees sharing
# the target dir must all name the same directory.
# A LIBTORCH the user exported (e.g. a CUDA build) wins.
user_libtorch=${MEDREASON_USER_LIBTORCH-${LIBTORCH:-}}
export MEDREASON_USER_LIBTORCH=$user_libtorch
if [ -e "$repo/.libtorch" ]; then
  export LIBTORCH
  LIBTORCH=$(readlink -f "$repo/.libtorch")
fi

step() { echo "==> $*" >&2; }

require_tools() {
  for t in cargo python3; do
    command -v "$t" >/dev/null || { echo "error: '$t' is required but not on PATH" >&2; exit 1; }
  done
}

setup_libtorch() {
  step "libtorch (PyPI torch wheel, CPU part)"
  LIBTORCH=$user_libtorch bash "$repo/tools/setup-libtorch.sh"
  export LIBTORCH
  LIBTORCH=$(readlink -f "$repo/.libtorch")
}

# Python venv for reference/loader scripts, keyed by the requirements file.
# Usage: venv_for tools/requirements-data.txt  -> prints the venv's python
venv_for() {
  local req="$repo/$1"
  local hash
  hash=$(sha256sum "$req" | cut -c1-16)
  local venv="$MEDREASON_CACHE/venv-$(basename "$req" .txt)-$hash"
  if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    step "python venv $(basename "$venv")" 
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
    touch "$venv/.complete"
  fi
  echo "$venv/bin/python"
}
