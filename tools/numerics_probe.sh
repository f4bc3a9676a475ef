#!/usr/bin/env bash
# Which libtorch kernel selections change CPU training results, and which
# settings make them bit-reproducible (docs/numerics.md has the findings).
#
#   tools/numerics_probe.sh [--section ops|sft|long|cost|repeat|accuracy|all] [--steps N]
#                           [--long-steps N] [--repeats N] [--threads "1 2"] [--work DIR]
#
# Needs the debug builds of this checkout (release: PIPELINE=target/release/pipeline):
#   cargo build --bin pipeline && cargo build --example numerics_env
# plus jq, taskset and sha256sum. Run it on an otherwise idle machine for
# timings; everything else is bit comparisons and does not care about load.
#
# Sections (default: all; each prints a Markdown table and keeps its raw
# results under $WORK):
#   ops     one process per knob: the op families of an SFT step (ATen sum,
#           softmax, log-softmax, SiLU, RMS norm, dim-0 sum; MKL sgemm; oneDNN
#           GELU) hashed bit for bit; whether a variable set by the process
#           itself (std::env::set_var before libtorch computes) acts like one
#           exported by the shell, and whether a late one is ignored.
#   sft     a short SFT of recipes/ci.toml (sft.max_steps=--steps) per knob:
#           hash of model.safetensors and of the loss/grad-norm curve.
#   long    a longer SFT (--long-steps, default 200; 0 = all 804 steps of ci)
#           at each thread count, fast vs reproducible settings: does a
#           thread-count dependence that leaves 8 steps' weights alone
#           change the trained model?
#   cost    the short SFT's step throughput: fast, each pin alone, reproducible
#           (and its MKL_CBWR=COMPATIBLE variant);
#           interleaved, --repeats times per thread count.
#   accuracy (not in `all`: 3-20 min per setting) the whole SFT of
#           recipes/mini.toml and its eval_sft per kernel selection and
#           thread count (ACC_RUNS="fast:1 fast:2 repro:1 ..."): how far
#           numerics alone move the held-out accuracy that issue 17 compares.
#   repeat  same settings twice: sft and grpo outputs (every file but
#           provenance.json; metrics.jsonl without its timing fields); then
#           grpo at each thread count, fast vs reproducible.
#
# Every run uses `--set recipe.numerics=$MODE` (default MODE=fast): the
# tables measure what each exported variable does by itself, which the
# reproducible mode would override. MODE=reproducible (with
# `--set recipe.numerics_threads=N` where needed) checks the mode itself.
#
# Thread counts are set the way a host sets them: the stage gets every core
# the process may use, so `taskset -c 0-(N-1)` gives an N-thread stage.
# "reproducible" below means the settings docs/numerics.md recommends:
#   ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2,STRICT MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
# (the thread count is the second half of it, see the `sft` and `long` tables).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PIPELINE=${PIPELINE:-$repo/target/debug/pipeline}
PROBE=${PROBE:-$repo/target/debug/examples/numerics_env}
RECIPE=${RECIPE:-$repo/recipes/ci.toml}
WORK=${WORK:-/tmp/numerics_probe}
MODE=${MODE:-fast}
SECTION=all
STEPS=8
LONG_STEPS=200
REPEATS=3
THREADS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --section) SECTION=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --long-steps) LONG_STEPS=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
cores=$(nproc)
[ -n "$THREADS" ] || THREADS=$([ "$cores" -ge 2 ] && echo "1 2" || echo "1")
for t in $THREADS; do
  [ "$t" -le "$cores" ] || { echo "--threads: $t is more than the $cores cores this process may use" >&2; exit 2; }
done
for tool in jq taskset sha256sum; do
  command -v $tool >/dev/null || { echo "error: '$tool' is required" >&2; exit 1; }
done
REPRO=(ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2,STRICT MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2)
# The variant for non-Intel CPUs, where MKL ignores MKL_CBWR=AVX2 (its guide:
# "the AUTO branch is used instead"): SSE2 code path, thread count must be fixed.
REPRO_COMPAT=(ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX2)
# Variables that select kernels; cleared for every run so the caller's
# environment does not leak into the baseline.
KNOBS=(ATEN_CPU_CAPABILITY MKL_CBWR MKL_ENABLE_INSTRUCTIONS MKL_NUM_THREADS OMP_NUM_THREADS
  ONEDNN_MAX_CPU_ISA DNNL_MAX_CPU_ISA ONEDNN_CPU_ISA_HINTS MKL_VERBOSE ONEDNN_VERBOSE)
mkdir -p "$WORK"
short() { cut -c1-10; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

host_line() {
  local model flags
  model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512_vnni|amx_tile|amx_bf16)$' | tr '\n' ' ')
  echo "host: $model; $cores cores usable; flags: $flags; load $(load)"
}

# ---------------------------------------------------------------------------
# ops: one process per setting, every op family hashed
# ---------------------------------------------------------------------------
OPS=(sum matmul softmax log_softmax silu gelu rmsnorm sum_dim0)
clean_env() { env $(printf -- '-u %s ' "${KNOBS[@]}") "$@"; }
probe() { # probe [ENV=VAL...] -- [probe args...]: "round op hash" lines; $WRAP prefixes the probe
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  clean_env "${envs[@]}" ${WRAP:-} "$PROBE" "$@"
}
ops_row() { # ops_row LABEL ROUND [ENV...] -- [args]
  local label=$1 round=$2; shift 2
  local out; out=$(probe "$@" | awk -v r="$round" '$1 == r { print $2, $3 }')
  local cells=""
  for op in "${OPS[@]}"; do
    local h b
    h=$(awk -v o="$op" '$1 == o { print $2 }' <<<"$out")
    b=$(awk -v o="$op" '$1 == o { print $2 }' "$WORK/ops.base")
    if [ "$h" = "$b" ]; then cells+=" = |"; else cells+=" **${h:0:6}** |"; fi
  done
  echo "| $label |$cells"
}
section_ops() {
  [ -x "$PROBE" ] || { echo "error: $PROBE missing: cargo build --example numerics_env" >&2; exit 1; }
  echo "### ops: output bits per op family (= : same as the first row)"
  echo
  host_line
  echo
  probe -- | awk '$1 == "first" { print $2, $3 }' >"$WORK/ops.base"
  local header="| setting |" rule="|---|"
  for op in "${OPS[@]}"; do header+=" $op |"; rule+="---|"; done
  echo "$header"; echo "$rule"
  echo "| none ($cores threads: libtorch's default) | (reference) |"
  for t in 1 3 4; do ops_row "intra-op threads $t" first -- --threads $t; done
  WRAP="taskset -c 0" ops_row "$cores threads on 1 core (taskset -c 0)" first -- --threads "$cores"
  for v in default avx2 avx512; do ops_row "ATEN_CPU_CAPABILITY=$v" first ATEN_CPU_CAPABILITY=$v --; done
  for v in COMPATIBLE AVX2 AVX2,STRICT AVX512 AUTO AVX512_E4; do ops_row "MKL_CBWR=$v" first MKL_CBWR=$v --; done
  ops_row "MKL_ENABLE_INSTRUCTIONS=AVX2" first MKL_ENABLE_INSTRUCTIONS=AVX2 --
  for v in AVX2 AVX512_CORE; do ops_row "ONEDNN_MAX_CPU_ISA=$v" first ONEDNN_MAX_CPU_ISA=$v --; done
  ops_row "DNNL_MAX_CPU_ISA=AVX2 (old name)" first DNNL_MAX_CPU_ISA=AVX2 --
  local late=(); for kv in "${REPRO[@]}"; do late+=(--set-late "$kv"); done
  ops_row "reproducible set in-process after a first op (2nd round)" second -- "${late[@]}"
  echo
  echo "### ops: reproducible settings across thread counts and the caller's environment"
  echo
  echo "$header"; echo "$rule"
  probe "${REPRO[@]}" -- | awk '$1 == "first" { print $2, $3 }' >"$WORK/ops.base"
  echo "| reproducible, exported by the shell, 2 threads | (reference) |"
  for t in 1 3 4; do ops_row "reproducible, exported, threads $t" first "${REPRO[@]}" -- --threads $t; done
  local sets=(); for kv in "${REPRO[@]}"; do sets+=(--set "$kv"); done
  ops_row "reproducible, set in-process (set_var)" first -- "${sets[@]}"
  ops_row "set in-process after tch::Cuda::device_count + set_num_threads" first -- --touch-first "${sets[@]}"
  local other=(ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE MKL_ENABLE_INSTRUCTIONS=AVX512 ONEDNN_MAX_CPU_ISA=AVX512_CORE)
  ops_row "set in-process over exported ${other[*]}" first "${other[@]}" -- "${sets[@]}"
  ops_row "ONEDNN_MAX_CPU_ISA=AVX2 over an exported DNNL_MAX_CPU_ISA=AVX512_CORE" first "${REPRO[@]}" DNNL_MAX_CPU_ISA=AVX512_CORE --
  ops_row "MKL_CBWR=AVX2,STRICT without pinning MKL_ENABLE_INSTRUCTIONS (user has AVX512)" first "${REPRO[@]}" MKL_ENABLE_INSTRUCTIONS=AVX512 --
  echo
  echo "MKL's own account (MKL_VERBOSE=1, CNR = the code path it ran):"
  for v in "" AVX2,STRICT AVX512_E4 COMPATIBLE; do
    local cnr
    cnr=$(clean_env MKL_VERBOSE=1 ${v:+MKL_CBWR=$v} "$PROBE" | grep -o 'CNR:[A-Z0-9_,]*' | sort -u | tr '\n' ' ')
    echo "- MKL_CBWR=${v:-<unset>}: $cnr"
  done
  echo
}

# ---------------------------------------------------------------------------
# SFT runs: one cache, `--force sft` per configuration
# ---------------------------------------------------------------------------
CACHE=$WORK/cache
WS=$WORK/ws
RECIPE_NAME=$(sed -n 's/^name *= *"\([^"]*\)".*/\1/p' "$RECIPE" | head -1)
run_stage() { # run_stage STAGE THREADS NAME [ENV...] [-- extra pipeline args]
  local stage=$1 threads=$2 name=$3; shift 3
  local envs=() extra=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ $# -gt 0 ] && { shift; extra=("$@"); }
  mkdir -p "$WORK/runs"
  # CPU seconds of the whole process (user + system), for the cost table.
  local timer=()
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -f "%U %S" -o "$WORK/runs/$name.cpu")
  ( cd "$WORK" && clean_env "${envs[@]}" ${timer[@]+"${timer[@]}"} \
      taskset -c "0-$((threads - 1))" nice -n 10 "$PIPELINE" run "$RECIPE" --cache-dir "$CACHE" --workspace "$WS" \
      --set "recipe.numerics=$MODE" --until "$stage" --force "$stage" -q ${extra[@]+"${extra[@]}"} ) >"$WORK/runs/$name.log" 2>&1 \
    || { echo "error: run $name failed, see $WORK/runs/$name.log" >&2; tail -5 "$WORK/runs/$name.log" >&2; exit 1; }
  local d=$WS/outputs/$RECIPE_NAME/$stage
  rm -rf "$WORK/runs/$name.out"; mkdir -p "$WORK/runs/$name.out"
  cp -rL "$d"/. "$WORK/runs/$name.out/"
  local got; got=$(jq .threads "$d/provenance.json")
  [ "$got" = "$threads" ] || { echo "error: $name ran with $got threads, expected $threads" >&2; exit 1; }
}
sft_row() { # sft_row NAME THREADS [ENV...]  -> table row, keeps hashes in $WORK/runs/NAME.hash
  local name=$1 threads=$2; shift 2
  run_stage sft "$threads" "$name" "$@" -- --set "sft.max_steps=$STEPS"
  local o=$WORK/runs/$name.out
  local w c l
  w=$(sha256sum <"$o/model.safetensors" | short)
  c=$(jq -c '[.step, .loss, .grad_norm]' "$o/metrics.jsonl" | sha256sum | short)
  l=$(jq -c '[.step, .loss]' "$o/metrics.jsonl" | sha256sum | short)
  echo "$w $c $l" >"$WORK/runs/$name.hash"
  echo "| $name | $threads | ${*:-(none)} | $w | $l | $c |"
}
section_sft() {
  echo "### sft: $STEPS SFT steps of $(basename "$RECIPE"), one process per setting"
  echo
  host_line
  echo
  echo "| run | threads | environment | weights | loss curve | loss + grad-norm curve |"
  echo "|---|---|---|---|---|---|"
  local first=${THREADS%% *} last=${THREADS##* }
  sft_row fast "$last"
  sft_row fast-again "$last"
  for t in $THREADS; do [ "$t" = "$last" ] || sft_row "fast-t$t" "$t"; done
  for v in default avx2 avx512; do sft_row "aten-$v" "$last" ATEN_CPU_CAPABILITY=$v; done
  for v in COMPATIBLE AVX2 AVX2,STRICT AVX512 AUTO; do sft_row "cbwr-${v/,/-}" "$last" MKL_CBWR=$v; done
  sft_row mkl-instr-avx2 "$last" MKL_ENABLE_INSTRUCTIONS=AVX2
  sft_row onednn-avx2 "$last" ONEDNN_MAX_CPU_ISA=AVX2
  sft_row omp1-mkl1 "$last" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  for t in $THREADS; do sft_row "repro-t$t" "$t" "${REPRO[@]}"; done
  sft_row "repro-t$last-again" "$last" "${REPRO[@]}"
  sft_row "repro-t$last+aten-default" "$last" "${REPRO[@]/ATEN_CPU_CAPABILITY=avx2/ATEN_CPU_CAPABILITY=default}"
  for t in $THREADS; do sft_row "repro-compat-t$t" "$t" "${REPRO_COMPAT[@]}"; done
  sft_row "repro-t$first-cbwr-AVX2-nonstrict" "$first" ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
  [ "$first" = "$last" ] || sft_row "repro-t$last-cbwr-AVX2-nonstrict" "$last" ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
  echo
  echo "Agreement (groups of runs whose weights and loss + grad-norm curve are bit-identical):"
  for f in "$WORK"/runs/*.hash; do echo "$(cut -d' ' -f1,2 "$f") $(basename "$f" .hash)"; done | sort \
    | awk '{ k = $1 " " $2; g[k] = g[k] (g[k] ? ", " : "") $3 } END { for (k in g) print "- " g[k] }' | sort
  echo
}

# ---------------------------------------------------------------------------
# long: the whole ci SFT per thread count, fast vs reproducible
# ---------------------------------------------------------------------------
section_long() {
  local limit=()
  [ "$LONG_STEPS" -gt 0 ] && limit=(-- --set "sft.max_steps=$LONG_STEPS")
  echo "### long: $([ "$LONG_STEPS" -gt 0 ] && echo "$LONG_STEPS steps of" || echo "the whole") SFT of $(basename "$RECIPE")"
  echo
  host_line
  echo
  echo "| run | threads | weights | loss curve | loss + grad-norm curve | steps |"
  echo "|---|---|---|---|---|---|"
  for mode in fast repro; do
    for t in $THREADS; do
      local envs=(); [ $mode = repro ] && envs=("${REPRO[@]}")
      run_stage sft "$t" "long-$mode-t$t" ${envs[@]+"${envs[@]}"} ${limit[@]+"${limit[@]}"}
      local o=$WORK/runs/long-$mode-t$t.out
      echo "| long-$mode | $t | $(sha256sum <"$o/model.safetensors" | short) | $(jq -c '[.step, .loss]' "$o/metrics.jsonl" | sha256sum | short) | $(jq -c '[.step, .loss, .grad_norm]' "$o/metrics.jsonl" | sha256sum | short) | $(jq .optimizer_steps "$o/trainable.json") |"
    done
  done
  echo
}

# ---------------------------------------------------------------------------
# cost: step throughput, fast vs reproducible, interleaved
# ---------------------------------------------------------------------------
median_tps() { jq -s '[.[1:][].tokens_per_s] | sort | .[length / 2 | floor] | floor' "$1"; }
cpu_s() { [ -f "$1" ] && awk '{ printf "%.2f", $1 + $2 }' "$1" || echo NA; }
section_cost() {
  echo "### cost: SFT steps 2..$STEPS, runs interleaved"
  echo
  echo "Each cell: median tokens/s of the steps (wall clock; higher is faster) /"
  echo "CPU ms per step (process CPU time minus that of a 1-step run, over $((STEPS - 1)) steps;"
  echo "at 1 thread this is the compute cost whatever else the machine runs)."
  echo
  host_line
  echo
  echo "| repeat | threads | fast | ATen avx2 only | MKL AVX2,STRICT only | reproducible | reproducible, MKL COMPATIBLE | reproducible / fast (tokens/s; CPU) | load (1/5/15 min) |"
  echo "|---|---|---|---|---|---|---|---|---|"
  local configs=(fast aten cbwr repro compat)
  for r in $(seq 1 "$REPEATS"); do
    for t in $THREADS; do
      run_stage sft "$t" "cost-setup-$r-t$t" -- --set "sft.max_steps=1"
      local setup; setup=$(cpu_s "$WORK/runs/cost-setup-$r-t$t.cpu")
      local row="" f="" p="" fc="" pc=""
      for c in "${configs[@]}"; do
        local envs=()
        case $c in
          aten) envs=(ATEN_CPU_CAPABILITY=avx2) ;;
          cbwr) envs=(MKL_CBWR=AVX2,STRICT MKL_ENABLE_INSTRUCTIONS=AVX2) ;;
          repro) envs=("${REPRO[@]}") ;;
          compat) envs=("${REPRO_COMPAT[@]}") ;;
        esac
        run_stage sft "$t" "cost-$c-$r-t$t" ${envs[@]+"${envs[@]}"} -- --set "sft.max_steps=$STEPS"
        local v ms
        v=$(median_tps "$WORK/runs/cost-$c-$r-t$t.out/metrics.jsonl")
        ms=$(awk -v a="$(cpu_s "$WORK/runs/cost-$c-$r-t$t.cpu")" -v b="$setup" -v n="$((STEPS - 1))" \
          'BEGIN { if (a == "NA" || b == "NA") print "NA"; else printf "%.0f", 1000 * (a - b) / n }')
        row+=" $v / $ms |"
        [ $c = fast ] && { f=$v; fc=$ms; }
        [ $c = repro ] && { p=$v; pc=$ms; }
      done
      echo "| $r | $t |$row $(awk -v a="$p" -v b="$f" -v c="$pc" -v d="$fc" 'BEGIN { printf "%.2f; %s", a / b, (c == "NA" ? "NA" : sprintf("%.2f", c / d)) }') | $(load) |"
    done
  done
  echo
}

# ---------------------------------------------------------------------------
# repeat: same settings, same machine, twice
# ---------------------------------------------------------------------------
# Every output file but provenance.json (timestamps, durations by design);
# metrics.jsonl without its timing fields (tokens_per_s, step_time_s).
output_digest() {
  local d=$1
  for f in $(cd "$d" && ls | grep -v '^provenance.json$'); do
    if [ "$f" = metrics.jsonl ]; then
      echo "$f $(jq -c 'del(.tokens_per_s, .step_time_s)' "$d/$f" | sha256sum | short)"
    else
      echo "$f $(sha256sum <"$d/$f" | short)"
    fi
  done
}
section_repeat() {
  echo "### repeat: the same run twice (every output file but provenance.json; metrics without timings)"
  echo
  host_line
  echo
  echo "| stage | threads | environment | run 1 = run 2 | files that differ |"
  echo "|---|---|---|---|---|"
  local last=${THREADS##* }
  # GRPO needs a policy that sometimes earns a reward: the whole ci SFT, run once and cached.
  ( cd "$WORK" && clean_env nice -n 10 "$PIPELINE" run "$RECIPE" --cache-dir "$CACHE" --workspace "$WS" --set "recipe.numerics=$MODE" --until sft -q ) >"$WORK/runs/repeat-base.log" 2>&1
  for stage in sft grpo; do
    for mode in fast repro; do
      local envs=() extra=()
      [ $mode = repro ] && envs=("${REPRO[@]}")
      [ $stage = sft ] && extra=(--set "sft.max_steps=$STEPS")
      for i in 1 2; do run_stage $stage "$last" "repeat-$stage-$mode-$i" "${envs[@]}" -- "${extra[@]}"; done
      local diff
      diff=$(diff <(output_digest "$WORK/runs/repeat-$stage-$mode-1.out") <(output_digest "$WORK/runs/repeat-$stage-$mode-2.out") | awk '/^[<>]/ { print $2 }' | sort -u | tr '\n' ' ')
      echo "| $stage | $last | ${envs[*]:-(none)} | $([ -z "$diff" ] && echo yes || echo **no**) | ${diff:--} |"
    done
  done
  echo
  echo "GRPO across thread counts (same SFT input; weights, and metrics without timings):"
  echo
  echo "| mode | threads | weights | metrics |"
  echo "|---|---|---|---|"
  for mode in fast repro; do
    for t in $THREADS; do
      local envs=()
      [ $mode = repro ] && envs=("${REPRO[@]}")
      run_stage grpo "$t" "grpo-$mode-t$t" ${envs[@]+"${envs[@]}"}
      local o=$WORK/runs/grpo-$mode-t$t.out
      echo "| $mode | $t | $(sha256sum <"$o/model.safetensors" | short) | $(jq -c 'del(.step_time_s)' "$o/metrics.jsonl" | sha256sum | short) |"
    done
  done
  echo
}

# ---------------------------------------------------------------------------
# accuracy: what the knobs do to the mini recipe's held-out SFT accuracy
# ---------------------------------------------------------------------------
section_accuracy() {
  RECIPE=${ACC_RECIPE:-$repo/recipes/mini.toml}
  RECIPE_NAME=$(sed -n 's/^name *= *"\([^"]*\)".*/\1/p' "$RECIPE" | head -1)
  echo "### accuracy: whole SFT of $(basename "$RECIPE") + eval_sft, per setting"
  echo
  host_line
  echo
  echo "| run | threads | environment | SFT weights | held-out accuracy [95 % CI] | correct / n | sft wall s |"
  echo "|---|---|---|---|---|---|---|"
  # SETTING:THREADS; the thread counts are capped at the cores this process may use.
  local runs=(${ACC_RUNS:-fast:1 fast:2 repro:1 repro:2 aten-avx2:1 aten-default:1 cbwr-AVX2:1 onednn-avx2:1})
  for item in "${runs[@]}"; do
    local name=${item%%:*} t=${item##*:}
    [ "$t" -le "$cores" ] || continue
    local envs=()
    case $name in
      fast) ;;
      aten-avx2) envs=(ATEN_CPU_CAPABILITY=avx2) ;;
      aten-default) envs=(ATEN_CPU_CAPABILITY=default) ;;
      cbwr-AVX2) envs=(MKL_CBWR=AVX2) ;;
      onednn-avx2) envs=(ONEDNN_MAX_CPU_ISA=AVX2) ;;
      repro) envs=("${REPRO[@]}") ;;
      *) echo "ACC_RUNS: unknown setting $name" >&2; exit 2 ;;
    esac
    run_stage eval_sft "$t" "acc-$name-t$t" ${envs[@]+"${envs[@]}"} -- --force-downstream sft
    local m=$WORK/runs/acc-$name-t$t.out/metrics.json sft=$WS/outputs/$RECIPE_NAME/sft
    echo "| $name | $t | ${envs[*]:-(none)} | $(sha256sum <"$sft/model.safetensors" | short) | $(jq -r '.accuracy | "\(.value * 10000 | round / 100) % [\(.lo * 10000 | round / 100), \(.hi * 10000 | round / 100)]"' "$m") | $(jq -r '.accuracy | "\(.k) / \(.n)"' "$m") | $(jq '.duration_s | floor' "$sft/provenance.json") |"
  done
  echo
}

[ -x "$PIPELINE" ] || { echo "error: $PIPELINE missing: cargo build --bin pipeline" >&2; exit 1; }
case $SECTION in
  ops) section_ops ;;
  sft) section_sft ;;
  long) section_long ;;
  cost) section_cost ;;
  repeat) section_repeat ;;
  accuracy) section_accuracy ;;
  all) section_ops; section_sft; section_long; section_cost; section_repeat ;;
  *) echo "--section: expected ops, sft, long, cost, repeat, accuracy or all" >&2; exit 2 ;;
esac
