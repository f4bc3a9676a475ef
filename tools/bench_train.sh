#!/usr/bin/env bash
# Training benchmarks of docs/benchmarks.md ("Training: SFT and GRPO vs
# transformers/TRL"): our sft (and grpo, when the binary has that kind) next
# to tools/train_bench.py on the mini recipe's own checkpoint and Parquet
# split, each pair back to back, with the load average before every run
# (the development machine is shared).
#
# Usage: tools/bench_train.sh [sft|grpo|rss|all]...   (default: all)
# Environment:
#   PIPELINE   pipeline binary (default: the debug build in $CARGO_TARGET_DIR)
#   CACHE, WS  --cache-dir / --workspace (default /tmp/bench-cache, /tmp/bench-ws)
#   STEPS      SFT steps per run (default 40); GRPO_STEPS (default 6)
#   REPEATS    back-to-back pairs per setting (default 2)
#   THREADS    thread counts to measure (default "2 1"; 1 runs under `taskset -c 0`)
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
B=${PIPELINE:-$CARGO_TARGET_DIR/debug/pipeline}
CACHE=${CACHE:-/tmp/bench-cache}
WS=${WS:-/tmp/bench-ws}
STEPS=${STEPS:-40}
GRPO_STEPS=${GRPO_STEPS:-6}
REPEATS=${REPEATS:-2}
THREADS=${THREADS:-2 1}
PY=$(venv_for tools/requirements-bench.txt)
OUT=$WS/outputs/mini
[ -x "$B" ] || { echo "error: no pipeline binary at $B (cargo build --bin pipeline, or set PIPELINE)" >&2; exit 1; }

# train_bench.py's own log (transformers warnings, tracebacks) goes here.
ERR=$WS/train_bench.stderr
mkdir -p "$WS"
# One train_bench.py run; prints its RESULT line, or where its error is.
tb() {
  local line
  line=$("$@" 2>>"$ERR" | grep '^RESULT') || line="failed (see $ERR)"
  echo "$line"
}

run() { "$B" run recipes/mini.toml --cache-dir "$CACHE" --workspace "$WS" -q "$@"; }
load() { echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"; }
pin() { if [ "$1" = 1 ]; then echo "taskset -c 0"; fi; }
has_grpo() { "$B" kinds 2>/dev/null | grep -w grpo >/dev/null; }

# The larger model of the RSS check: frozen weights (vision tower,
# attention, embeddings) big enough that optimizer state for them would show.
MEM_MODEL=(
  --set tiny_model.hidden_size=512 --set tiny_model.intermediate_size=1536
  --set tiny_model.num_hidden_layers=4 --set tiny_model.num_attention_heads=8
  --set tiny_model.num_key_value_heads=2 --set 'tiny_model.mrope_section=[8,12,12]'
  --set tiny_model.vision_hidden_size=512 --set tiny_model.vision_intermediate_size=2048
  --set tiny_model.vision_depth=4 --set tiny_model.vision_num_heads=8
  --set 'tiny_model.fullatt_block_indexes=[3]'
)
MLP_RE='^model\.language_model\.layers\.\d+\.mlp\.'

bench_sft() {
  step "SFT: mini recipe's tiny model, all weights trainable, batch 8, $STEPS steps"
  run --until tiny_model
  for rep in $(seq "$REPEATS"); do
    for t in $THREADS; do
      echo "--- sft repeat $rep, $t thread(s)"
      load
      $(pin "$t") /usr/bin/time -f "ours peak RSS %M KiB (pipeline process)" "$B" run recipes/mini.toml \
        --cache-dir "$CACHE" --workspace "$WS" -q --until sft --set sft.max_steps="$STEPS" --force sft
      echo "ours: $("$PY" tools/train_bench.py metrics "$OUT/sft")"
      load
      echo "hf:   $(tb $(pin "$t") "$PY" tools/train_bench.py sft --model "$OUT/tiny_model" --data "$OUT/export/train" \
        --steps "$STEPS" --batch-size 8 --trainable all --threads "$t")"
    done
  done
}

bench_grpo() {
  step "GRPO: mini recipe's SFT checkpoint, 2 prompts x 5 completions, $GRPO_STEPS steps"
  run --until sft  # the full mini SFT (cached): the model both sides start from
  local model
  model=$(readlink -f "$OUT/sft")
  for rep in $(seq "$REPEATS"); do
    for t in $THREADS; do
      echo "--- grpo repeat $rep, $t thread(s)"
      if has_grpo; then
        load
        $(pin "$t") /usr/bin/time -f "ours peak RSS %M KiB (pipeline process)" "$B" run recipes/mini.toml \
          --cache-dir "$CACHE" --workspace "$WS" -q --until grpo --set grpo.steps="$GRPO_STEPS" \
          --set grpo.checkpoint_every=0 --force grpo
        echo "ours: $("$PY" tools/train_bench.py metrics "$OUT/grpo")"
      else
        echo "ours: not measured (this pipeline binary has no grpo stage kind)"
      fi
      load
      echo "trl:  $(tb $(pin "$t") "$PY" tools/train_bench.py grpo --model "$model" --data "$OUT/export/train" \
        --steps "$GRPO_STEPS" --threads "$t")"
    done
  done
}

bench_rss() {
  step "RSS: 5 SFT steps of a larger model, trainable = LM MLPs vs all"
  run --until tiny_model "${MEM_MODEL[@]}"
  local model
  model=$(readlink -f "$OUT/tiny_model")
  for which in mlp all; do
    local pattern=$MLP_RE
    [ "$which" = all ] && pattern='.*'
    load
    /usr/bin/time -f "ours $which: peak RSS %M KiB, %e s" "$B" run recipes/mini.toml --cache-dir "$CACHE" \
      --workspace "$WS" -q --until sft "${MEM_MODEL[@]}" --set sft.max_steps=5 \
      --set "sft.trainable=['$pattern']" --force sft
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("  trainable", d["parameters"], "of", d["total_parameters"])' \
      "$OUT/sft/trainable.json"
    load
    echo "hf $which: $(tb "$PY" tools/train_bench.py sft --model "$model" --data "$OUT/export/train" --steps 5 \
      --batch-size 8 --trainable "$which")"
  done
}

for what in "${@:-all}"; do
  case $what in
    sft) bench_sft ;;
    grpo) bench_grpo ;;
    rss) bench_rss ;;
    all) bench_sft; bench_grpo; bench_rss ;;
    *) echo "error: unknown benchmark '$what' (expected sft, grpo, rss or all)" >&2; exit 2 ;;
  esac
done
