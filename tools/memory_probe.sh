#!/usr/bin/env bash
# Predicted vs measured peak memory of real `sft` and `grpo` runs on the CPU
# (docs/benchmarks.md, "Memory model"). Builds random checkpoints of three
# sizes, then runs stages/train/examples/memory_probe.rs for each case twice:
# with glibc's default malloc and with MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB
# (freed tensors go straight back to the OS, so RSS tracks live memory).
# One case at a time, niced; the largest needs ≈ 5 GiB.
#
#   tools/memory_probe.sh OUT_DIR [tiny|small|medium|small_q2vl ...]   -> OUT_DIR/probe.jsonl
#   PROBE_ARGS=ckpt=1 tools/memory_probe.sh OUT_DIR ...   every case with activation
#                                                           checkpointing (where the stages have it)
set -euo pipefail
out=${1:?usage: tools/memory_probe.sh OUT_DIR [sizes...]}
shift
sizes=${*:-tiny small medium}
repo=$(cd "$(dirname "$0")/.." && pwd)
probe=${PROBE:-$repo/target/debug/examples/memory_probe}
mkdir -p "$out"
log="$out/probe.jsonl"

shape() {
  case $1 in
    tiny) echo "hidden=128 inter=352 layers=4 heads=4 kv=1 vocab=4096 vdepth=2 vhidden=64 vinter=128 vheads=2" ;;
    small) echo "hidden=512 inter=1408 layers=8 heads=8 kv=2 vocab=16384 vdepth=4 vhidden=256 vinter=512 vheads=4" ;;
    medium) echo "hidden=1024 inter=2816 layers=16 heads=16 kv=4 vocab=32000 vdepth=8 vhidden=512 vinter=1024 vheads=8" ;;
    # Qwen2-VL (LayerNorm + fc1/QuickGELU/fc2 vision blocks, full attention) at the small shape.
    small_q2vl) echo "model_type=qwen2_vl hidden=512 inter=1408 layers=8 heads=8 kv=2 vocab=16384 vdepth=4 vhidden=256 vinter=512 vheads=4" ;;
  esac
}

# mode|run args (lengths: image side → patches; batch; GRPO prompts × gens, completion)
cases() {
  case $1 in
    tiny) printf '%s\n' "sft|batch=4 side=224" "sft|batch=4 side=224 trainable=." "grpo|prompts=2 gens=4 micro=4 completion=64 side=224" ;;
    small) printf '%s\n' "sft|batch=4 side=336" "sft|batch=2 side=336 trainable=." "grpo|prompts=2 gens=4 micro=4 completion=64 side=336" ;;
    medium) printf '%s\n' "sft|batch=2 side=336" "grpo|prompts=1 gens=4 micro=2 completion=48 side=336" ;;
    small_q2vl) printf '%s\n' "sft|batch=2 side=336 trainable=." "sft|batch=4 side=336" ;;
  esac
}

for size in $sizes; do
  ckpt="$out/$size"
  [ -f "$ckpt/config.json" ] || nice "$probe" make "$ckpt" $(shape "$size") >&2
  while IFS='|' read -r mode args; do
    for malloc in default fixed; do
      if [ "$malloc" = fixed ]; then envs=(MALLOC_MMAP_THRESHOLD_=65536); else envs=(); fi
      line=$(env "${envs[@]}" nice "$probe" "$mode" "$ckpt" $args ${PROBE_ARGS:-} | grep '^{"args"' | tail -1)
      echo "${line%\}}, \"size\": \"$size\", \"malloc\": \"$malloc\"}" | tee -a "$log"
    done
  done < <(cases "$size")
done
