#!/usr/bin/env bash
# Per-volume cost of the data stages on realistic-size phantoms, for the cost
# table of docs/scaling.md ("What the full recipe costs").
#
# Generates CASES `bench` phantoms at the real corpus' median size (512×512
# in-plane, 332 axial slices) once, then REPEATS times forces each group of
# data stages (index; lesion_slices; render; vqa + split + parquet_export) in
# its own process on ONE core (`taskset -c $CORE`: the engine then sees one
# core, so every stage runs single-threaded). Prints per group the stages'
# wall time (summary.json) and the process' CPU time (user + sys, less the
# CPU of a fully cached run, i.e. start-up), per volume and per item, and
# volumes/hour/core from the CPU time, with the load average before every
# repeat: the development machine is shared, so wall time is inflated by
# other processes and CPU time is the per-core figure to read.
#
# Usage: tools/bench_data_stages.sh
# Environment:
#   PIPELINE   pipeline binary (default: the release build in $CARGO_TARGET_DIR)
#   CACHE, WS  --cache-dir / --workspace (default /tmp/exp/scaling-cache, /tmp/exp/scaling-ws)
#   CASES      phantom volumes (default 6); SLICES axial slices each (default 332)
#   REPEATS    forced reruns of the data stages (default 2)
#   CORE       the core to pin to (default 1)
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
B=${PIPELINE:-$CARGO_TARGET_DIR/release/pipeline}
CACHE=${CACHE:-/tmp/exp/scaling-cache}
WS=${WS:-/tmp/exp/scaling-ws}
CASES=${CASES:-6}
SLICES=${SLICES:-332}
REPEATS=${REPEATS:-2}
CORE=${CORE:-1}
[ -x "$B" ] || { echo "error: no pipeline binary at $B (cargo build --release --bin pipeline, or set PIPELINE)" >&2; exit 1; }

mkdir -p "$WS"
R=$WS/data-bench.toml
# The data half of recipes/full.toml with a phantom in place of the real root.
cat >"$R" <<EOF
[recipe]
name = "data-bench"
seed = 5

[stage.volumes]
kind = "phantom"
preset = "bench"
cases = $CASES
slices = $SLICES

[stage.index]
kind = "rexgct_index"
dataset = "volumes"

[stage.slices]
kind = "lesion_slices"
index = "index"
dataset = "volumes"
box_min_area = 1300
max_slices = 20
cap_scope = "case_class"

[stage.render]
kind = "render"
slices = "slices"
index = "index"
dataset = "volumes"

[stage.vqa]
kind = "vqa"
items = "render"
index = "index"

[stage.split]
kind = "split"
items = "vqa"

[stage.export]
kind = "parquet_export"
split = ["split"]
images = "render"
EOF

load() { cut -d' ' -f1-3 /proc/loadavg; }
run() { taskset -c "$CORE" "$B" run "$R" --cache-dir "$CACHE" --workspace "$WS" -q "$@"; }
latest_summary() { ls -d "$WS"/runs/*-data-bench | sort | tail -1; }

step "phantoms: $CASES cases of 512x512x$SLICES (load $(load))"
run --until volumes
S=$(latest_summary)/summary.json
python3 - "$S" <<'EOF'
import json, sys
for s in json.load(open(sys.argv[1]))["stages"]:
    if s["id"] == "volumes":
        print(f"volumes: {s['status']} {s['duration_s'] or 0:.1f} s")
EOF

# One group of stages forced on one core; prints "wall_s cpu_s" of the whole
# process (cpu = user + sys) and the run's summary.json.
timed() {
  local t
  t=$(mktemp)
  /usr/bin/time -f "%e %U %S" -o "$t" taskset -c "$CORE" "$B" run "$R" --cache-dir "$CACHE" --workspace "$WS" -q "$@"
  awk '{printf "%s %.2f", $1, $2 + $3}' "$t"
  rm -f "$t"
  echo " $(latest_summary)/summary.json"
}

for rep in $(seq "$REPEATS"); do
  l=$(load)
  step "data stages, repeat $rep, 1 core (load before: $l)"
  # A fully cached run: the process' own start-up (libtorch load, planning).
  base=$(timed --until export)
  res=()
  for g in "index:--until index --force index" "slices:--until slices --force slices" \
           "render:--until render --force render" "vqa+split+export:--until export --force-downstream vqa"; do
    # shellcheck disable=SC2086 # the group's flags are split on purpose
    res+=("${g%%:*} $(timed ${g#*:})")
  done
  python3 - "$WS/outputs/data-bench" "$CASES" "$l" "$base" "${res[@]}" <<'EOF'
import json, os, sys
out, cases, load, base = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
base_cpu = float(base.split()[1])
with open(os.path.join(out, "render", "items.jsonl")) as f:
    items = sum(1 for line in f if line.strip())
print(f"load {load}; {cases} volumes, {items} items ({items / cases:.1f} per volume); "
      f"start-up of a cached run {base_cpu:.2f} s CPU, subtracted")
print(f"{'stage':<16} {'wall s':>7} {'CPU s':>7} {'CPU s/vol':>9} {'CPU ms/item':>11} {'vol/h/core':>10}")
tw = tc = 0.0
for arg in sys.argv[5:]:
    name, _wall, cpu, summary = arg.split()
    ran = [s for s in json.load(open(summary))["stages"] if s["status"] == "ran"]
    if not ran:
        sys.exit(f"error: nothing ran for {name} ({summary})")
    wall = sum(s["duration_s"] for s in ran)
    cpu = max(float(cpu) - base_cpu, 1e-9)
    tw, tc = tw + wall, tc + cpu
    print(f"{name:<16} {wall:7.2f} {cpu:7.2f} {cpu / cases:9.3f} {1000 * cpu / items:11.1f} {3600 * cases / cpu:10.0f}")
print(f"{'all':<16} {tw:7.2f} {tc:7.2f} {tc / cases:9.3f} {1000 * tc / items:11.1f} {3600 * cases / tc:10.0f}")
EOF
done
