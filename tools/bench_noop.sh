#!/usr/bin/env bash
# No-op rerun benchmark: generate FILES random (non-sparse) files totalling
# SIZE under DIR/data, a recipe with one `files` stage per 10-file shard,
# run it once (imports and hashes everything), then time the rerun that has
# nothing to do (stat cache: no file is re-read).
#
#   tools/bench_noop.sh --size 10G --files 100 --dir /tmp/medreason-bench [--bin target/release/pipeline]
#
# Prints the first-run and no-op times and the no-op peak RSS. Re-running the
# script reuses the generated data when the sizes match.
set -euo pipefail
size=10G files=100 dir=${TMPDIR:-/tmp}/medreason-bench
bin=$(cd "$(dirname "$0")/.." && pwd)/target/debug/pipeline
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --files) files=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$bin" ] || { echo "no pipeline binary at $bin (cargo build --bin pipeline, or pass --bin)" >&2; exit 1; }
bytes=$(numfmt --from=iec "$size")
per=$(( bytes / files ))
mkdir -p "$dir/data"
echo "generating $files files of $(numfmt --to=iec "$per") in $dir/data" >&2
for ((i = 0; i < files; i++)); do
  shard=$(printf 'shard_%02d' $(( i / 10 )))
  f=$(printf '%s/data/%s/file_%04d.bin' "$dir" "$shard" "$i")
  mkdir -p "$(dirname "$f")"
  if [ "$(stat -c %s "$f" 2>/dev/null || echo -1)" != "$per" ]; then
    head -c "$per" /dev/urandom > "$f"
  fi
done
{
  echo '[recipe]'
  echo 'name = "bench_noop"'
  for s in "$dir"/data/shard_*; do
    name=$(basename "$s")
    printf '\n[stage.%s]\nkind = "files"\npath = "data/%s"\n' "$name" "$name"
  done
} > "$dir/bench_noop.toml"
sync
run() { "$bin" -q run "$dir/bench_noop.toml" --cache-dir "$dir/cache" --workspace "$dir"; }
t0=$(date +%s.%N); run; t1=$(date +%s.%N)
echo "first run: $(echo "$t1 - $t0" | bc) s" >&2
# The first rerun after outputs were written re-verifies them once: files
# modified within the stat cache's racy window of being hashed are not
# trusted (see cache/src/stat_cache.rs). Steady state is the second rerun.
/usr/bin/time -f "no-op rerun (first): %e s wall, %M KiB max RSS" "$bin" -q run "$dir/bench_noop.toml" --cache-dir "$dir/cache" --workspace "$dir"
/usr/bin/time -f "no-op rerun (steady): %e s wall, %M KiB max RSS" "$bin" -q run "$dir/bench_noop.toml" --cache-dir "$dir/cache" --workspace "$dir"
/usr/bin/time -f "no-op plan:  %e s wall, %M KiB max RSS" "$bin" -q plan "$dir/bench_noop.toml" --cache-dir "$dir/cache" > /dev/null
