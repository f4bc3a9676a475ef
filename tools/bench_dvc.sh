#!/usr/bin/env bash
# DVC baseline for the no-op benchmark: time `dvc status` over the data that
# tools/bench_noop.sh generated (run that first, same --dir), after `dvc add`.
#
#   tools/bench_dvc.sh --dir /tmp/medreason-bench
#
# dvc is pip-installed into a venv under ~/.cache/medreason-pipeline/ (never
# inside the repository).
set -euo pipefail
dir=${TMPDIR:-/tmp}/medreason-bench
while [ $# -gt 0 ]; do
  case $1 in
    --dir) dir=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -d "$dir/data" ] || { echo "no data in $dir/data: run tools/bench_noop.sh first" >&2; exit 1; }
venv=$HOME/.cache/medreason-pipeline/dvc-venv
if [ ! -x "$venv/bin/dvc" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q dvc
fi
dvc=$venv/bin/dvc
# The data directory itself is the DVC project; hardlinks into DVC's cache
# avoid a second copy of the data.
cd "$dir/data"
if [ ! -d .dvc ]; then
  "$dvc" init --no-scm -q
  "$dvc" config cache.type hardlink
fi
"$dvc" version | head -1 >&2
t0=$(date +%s.%N)
"$dvc" add -q shard_*
t1=$(date +%s.%N)
echo "dvc add: $(echo "$t1 - $t0" | bc) s" >&2
/usr/bin/time -f "dvc status: %e s wall, %M KiB max RSS" "$dvc" status -q || true
/usr/bin/time -f "dvc status (again): %e s wall, %M KiB max RSS" "$dvc" status -q || true
