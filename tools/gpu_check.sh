#!/usr/bin/env bash
# One SFT step and one GRPO step of a 7B-shaped model on one GPU, through the
# stages' own code (issue 15 item 6): random Qwen2.5-VL-7B-shaped checkpoint
# (init_model's tokenizer, 7B weights in bf16), SFT of the LM MLPs and GRPO
# (G = 5, 256 completion tokens) with gradient_checkpointing, each run as
# rank 0 of a world of 1 (the NCCL collective on CUDA, TCP on the CPU), then
# a timed generation. Records per phase: peak CUDA memory (nvidia-smi
# sampling: tch does not expose libtorch's allocator statistics, so this is
# the reserved memory plus the CUDA context, an upper bound of "allocated"),
# peak RSS, the stages' step times, decode ms per token, and SFT MFU.
#
#   tools/gpu_check.sh                        # CUDA, 7B shapes: needs an H200-class GPU
#       (one unsharded rank: bf16 weights 16.6 GB + MLP gradients 11.4 + AdamW
#       moments 45.6 + f32 masters 22.8 = 96 GB before activations for SFT,
#       ~113 GB for GRPO with the reference MLPs; docs/scaling.md)
#   tools/gpu_check.sh --device cpu --small   # the same script on a CPU, tiny model, ~2 min
#
# Options: --work DIR (default /tmp/gpu_check), --bin PATH (a prebuilt
# step_check example: GPU machines cannot reach crates.io, so build it where
# they can — `cargo build --release -p stages-train --example step_check
# --features nccl` against a CUDA libtorch, docs/libtorch.md — and carry it),
# --group N, --completion N, --steps N (per stage; the first is warm-up),
# --peak-tflops X (dense bf16 peak for MFU; default 989 = H100 SXM on CUDA,
# none on CPU). Results: DIR/results.jsonl (one line per phase) and a summary
# on stdout.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

device=cuda small=0 work=/tmp/gpu_check bin="" group=5 completion=256 steps=2 peak=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --small) small=1; shift ;;
    --work) work=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --group) group=$2; shift 2 ;;
    --completion) completion=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --peak-tflops) peak=$2; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "error: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;; esac
if [ "$device" = cuda ] && [ -z "$peak" ]; then peak=989; fi

if [ -z "$bin" ]; then
  # Build it here (dev profile at opt-level 2 for the CPU try-out; NCCL for CUDA).
  features=()
  [ "$device" = cuda ] && features=(--features nccl)
  echo "==> building the step_check example" >&2
  (cd "$repo" && CARGO_PROFILE_DEV_OPT_LEVEL=2 cargo build -q -p stages-train --example step_check "${features[@]}")
  bin=${CARGO_TARGET_DIR:-$repo/target}/debug/examples/step_check
fi
[ -x "$bin" ] || { echo "error: no step_check binary at $bin" >&2; exit 1; }
if [ "$device" = cuda ]; then
  command -v nvidia-smi >/dev/null || { echo "error: --device cuda needs nvidia-smi on PATH" >&2; exit 1; }
fi

mkdir -p "$work"
results=$work/results.jsonl
: > "$results"
args=(--work "$work" --device "$device" --group "$group" --completion "$completion" --steps "$steps")
[ "$small" = 1 ] && args+=(--small)
[ -n "$peak" ] && args+=(--peak-tflops "$peak")

# Highest memory.used of GPU 0 (MiB) while a phase runs, sampled every 0.2 s.
sampler_pid=""
start_sampling() {
  [ "$device" = cuda ] || return 0
  : > "$work/smi.txt"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 >> "$work/smi.txt" &
  sampler_pid=$!
}
stop_sampling() { # phase
  [ "$device" = cuda ] || return 0
  kill "$sampler_pid" 2>/dev/null || true
  wait "$sampler_pid" 2>/dev/null || true
  local peak_mib
  peak_mib=$(sort -n "$work/smi.txt" | tail -1)
  echo "{\"phase\": \"$1\", \"nvidia_smi_peak_mib\": ${peak_mib:-null}, \"nvidia_smi_idle_mib\": $idle_mib}" >> "$results"
}
idle_mib=null
if [ "$device" = cuda ]; then
  idle_mib=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
fi

run_phase() { # phase [extra args]
  local phase=$1; shift
  echo "==> $phase" >&2
  start_sampling
  local t0=$SECONDS
  "$bin" --phase "$phase" "${args[@]}" "$@" > "$work/$phase.out" 2> "$work/$phase.log" || {
    stop_sampling "$phase"
    echo "error: phase $phase failed; last lines of $work/$phase.log:" >&2
    tail -20 "$work/$phase.log" >&2
    exit 1
  }
  stop_sampling "$phase"
  echo "    $((SECONDS - t0)) s" >&2
}

run_phase init
run_phase sft --dist
run_phase grpo --dist
run_phase decode

# Summary from the JSON lines (grep/sed: the GPU machine may have no jq or Python).
field() { # phase key -> first number after "key": in the phase's line
  local v
  v=$(grep "\"phase\":\"$1\"" "$results" | head -1 | grep -o "\"$2\":[0-9.eE+-]*" | head -1 | cut -d: -f2)
  echo "${v:-n/a}"
}
smi() { grep "\"phase\": \"$1\"" "$results" | grep -o '"nvidia_smi_peak_mib": [0-9]*' | cut -d' ' -f2; }
{
  echo "gpu_check: device $device, $([ "$small" = 1 ] && echo small || echo 7B-shaped), G = $group, $completion completion tokens, $steps steps per stage"
  echo "parameters:              $(field init parameters)"
  for phase in sft grpo; do
    echo "$phase first step s:      $(field "$phase" first_step_s)"
    echo "$phase step s (median):   $(field "$phase" step_s_median)"
    echo "$phase peak RSS MiB:      $(field "$phase" peak_rss_mib)"
    [ "$device" = cuda ] && echo "$phase peak GPU MiB:      $(smi "$phase") (nvidia-smi; idle $idle_mib)"
  done
  echo "sft tokens/s:            $(field sft tokens_per_s_median)"
  echo "sft MFU:                 $(field sft mfu) (6·N·tokens/s over ${peak:-no} TFLOP/s)"
  echo "decode ms/token (G=$group): $(field decode decode_ms_per_token)"
  [ "$device" = cuda ] && echo "decode peak GPU MiB:     $(smi decode)"
  echo "results: $results"
} | tee "$work/summary.txt"
