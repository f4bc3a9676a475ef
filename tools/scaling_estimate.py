#!/usr/bin/env python3
"""The arithmetic of docs/scaling.md ("What the full recipe costs"): parameter
counts of Qwen2.5-VL-7B, FLOPs per SFT item and per GRPO step, GPU-hours on
8 GPUs, and the memory one data-parallel rank holds. Standard library only;
every input is printed with where it comes from.

    python3 tools/scaling_estimate.py                 # the tables of docs/scaling.md
    python3 tools/scaling_estimate.py --text-tokens 150 --completion-tokens 128 --mfu 0.3
"""

import argparse
import math

# Qwen2.5-VL-7B-Instruct config.json (the shapes tools/qwen_parity.py make-7b builds).
LM = dict(d=3584, ff=18944, layers=28, heads=28, kv_heads=4, vocab=152064)
VIS = dict(d=1280, ff=3420, depth=32, heads=16, patch=14, tpatch=2, merge=2, window=112, full_blocks=4, out=3584)

# GPUs: bf16 dense peak (TFLOP/s), memory bandwidth (TB/s), memory (GB), source.
GPUS = {
    "H20": (148.0, 4.0, 96, "vendor datasheet; the paper's GPU"),
    "H100 SXM": (989.0, 3.35, 80, "vendor datasheet"),
    # An H200 lent to this project measured 788 TFLOP/s (8192^3 bf16 matmul) and 4.3 TB/s (copy).
    "H200": (989.0, 4.8, 141, "vendor datasheet"),
}

# Measured on the lent H100 (docs/benchmarks.md, "Qwen2.5-VL on tch"): one 7B
# decoder layer + one window-attention vision block + an 8192-token lm_head,
# 384-token prompt (324 image tokens), bf16, batch 1.
MEASURED_LAYER_PREFILL_S = 4.55e-3
MEASURED_LAYER_TOKENS_PER_S = 314.0


def lm_params():
    d, ff, kv = LM["d"], LM["ff"], LM["kv_heads"] * (LM["d"] // LM["heads"])
    attn = d * d + d + 2 * (d * kv + kv) + d * d  # q (bias), k, v (bias), o
    mlp = 3 * d * ff  # gate, up, down; no bias
    layer = attn + mlp + 2 * d  # two RMSNorms
    return dict(attn=attn, mlp=mlp, layer=layer, layers=LM["layers"] * layer,
                mlp_all=LM["layers"] * mlp, embed=LM["vocab"] * d, head=LM["vocab"] * d, final_norm=d)


def vis_params():
    d, ff = VIS["d"], VIS["ff"]
    patch_embed = 3 * VIS["tpatch"] * VIS["patch"] ** 2 * d  # Conv3d, no bias
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * (d * ff + ff) + (ff * d + d)
    m = d * VIS["merge"] ** 2
    merger = d + (m * m + m) + (m * VIS["out"] + VIS["out"])
    return dict(patch_embed=patch_embed, block=block, blocks=VIS["depth"] * block, merger=merger)


def vision_fwd_flops(side):
    """Forward FLOPs of one side x side image (already smart_resized)."""
    v = vis_params()
    patches = (side // VIS["patch"]) ** 2
    merged = patches // VIS["merge"] ** 2
    linear = 2 * (v["patch_embed"] + v["blocks"]) * patches + 2 * v["merger"] * merged
    win = (VIS["window"] // VIS["patch"]) ** 2
    attn = (VIS["depth"] - VIS["full_blocks"]) * 4 * patches * win * VIS["d"]
    attn += VIS["full_blocks"] * 4 * patches * patches * VIS["d"]
    return linear + attn, patches, merged


def lm_attn_flops(t_ctx_sum):
    """QK^T and AV over the sum of context lengths of all query positions."""
    return LM["layers"] * 4 * LM["d"] * t_ctx_sum


def lm_fwd_flops(t, logits_at):
    p = lm_params()
    return 2 * p["layers"] * t + lm_attn_flops(t * (t + 1) / 2) + 2 * p["head"] * logits_at


def lm_train_flops(t):
    """Forward + backward of one sequence with only the LM MLPs trainable:
    activation gradients through every layer and the (frozen) lm_head, weight
    gradients for the MLPs only; logits at every position (as sft.rs)."""
    p = lm_params()
    fwd = lm_fwd_flops(t, t)
    act_grad = 2 * p["layers"] * t + 2 * lm_attn_flops(t * (t + 1) / 2) + 2 * p["head"] * t
    weight_grad = 2 * p["mlp_all"] * t
    return fwd + act_grad + weight_grad


def fmt(x, unit=""):
    for s, f in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= f:
            return f"{x / f:.3g} {s}{unit}"
    return f"{x:.3g} {unit}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-side", type=int, default=504, help="smart_resize of a 512x512 slice (render tests)")
    ap.add_argument("--text-tokens", type=int, default=170, help="prompt + chat-template text tokens (assumed: 509-char think prompt ~ 140 + template ~ 30)")
    ap.add_argument("--target-tokens", type=int, default=7, help="SFT assistant tokens (`answer` target + <|im_end|>)")
    ap.add_argument("--train-items", type=int, default=68581, help="paper: CT-RATE-VQA train items")
    ap.add_argument("--test-items", type=int, default=15507, help="paper: CT-RATE-VQA test items")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--grpo-steps", type=int, default=1500)
    ap.add_argument("--prompts-per-step", type=int, default=8, help="grpo default (CHOSEN, paper silent)")
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--completion-tokens", type=int, default=256, help="mean completion length (budget 256)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--mfu", type=float, nargs="+", default=[0.25, 0.40], help="assumed model FLOP utilisation")
    ap.add_argument("--eval-batch", type=int, default=16, help="full.toml eval batch_size")
    ap.add_argument("--decode-ms", type=float, help="measured ms per decode step of the full model on one rank "
                    "(replaces the bracket below the bandwidth floor)")
    ap.add_argument("--sft-global-batch", type=int, default=32, help="items per optimizer step (assumed: 8 x 4)")
    ap.add_argument("--link-gbs", type=float, default=450.0, help="per-direction GPU link GB/s (NVLink 4 is 450)")
    a = ap.parse_args()

    lp, vp = lm_params(), vis_params()
    total = lp["layers"] + lp["embed"] + lp["head"] + lp["final_norm"] + vp["patch_embed"] + vp["blocks"] + vp["merger"]
    print("## Parameters")
    print("| part | parameters |\n| --- | ---: |")
    for name, n in [("LM decoder layers (28)", lp["layers"]), ("  of which MLPs (trainable)", lp["mlp_all"]),
                    ("  of which attention + norms", lp["layers"] - lp["mlp_all"]),
                    ("embed_tokens", lp["embed"]), ("lm_head (untied)", lp["head"]),
                    ("vision blocks (32) + patch embed", vp["blocks"] + vp["patch_embed"]),
                    ("vision merger", vp["merger"]), ("**total**", total)]:
        print(f"| {name} | {n:,} |")
    print(f"\nbf16 checkpoint: {total * 2 / 2**20:,.0f} MiB; trainable share {lp['mlp_all'] / total:.1%}")

    vis, patches, merged = vision_fwd_flops(a.image_side)
    t_prompt = merged + a.text_tokens
    t_sft = t_prompt + a.target_tokens
    sft_item = vis + lm_train_flops(t_sft)
    six_nt = 6 * total * t_sft
    print("\n## SFT, one item")
    print(f"image {a.image_side}px: {patches} patches -> {merged} visual tokens; sequence {t_sft} tokens "
          f"({merged} image + {a.text_tokens} text + {a.target_tokens} target)")
    print("| term | FLOPs |\n| --- | ---: |")
    print(f"| vision forward (frozen, no backward) | {fmt(vis)} |")
    print(f"| LM forward (logits at every position) | {fmt(lm_fwd_flops(t_sft, t_sft))} |")
    print(f"| LM backward, activation grads (all layers + lm_head) | "
          f"{fmt(2 * lp['layers'] * t_sft + 2 * lm_attn_flops(t_sft * (t_sft + 1) / 2) + 2 * lp['head'] * t_sft)} |")
    print(f"| LM backward, weight grads (MLPs only) | {fmt(2 * lp['mlp_all'] * t_sft)} |")
    print(f"| **total per item** | **{fmt(sft_item)}** ({fmt(sft_item / t_sft)} per token) |")
    print(f"| 6·N·T for comparison (N = all {total / 1e9:.2f}B, T = {t_sft}) | {fmt(six_nt)} |")
    sft_total = sft_item * a.train_items * a.epochs
    print(f"\nSFT total: {a.train_items:,} items x {a.epochs} epochs x {fmt(sft_item)} = {sft_total:.3g} FLOPs "
          f"({a.train_items * a.epochs * t_sft / 1e6:.1f}M tokens)")

    # GRPO step
    P, G, C = a.prompts_per_step, a.generations, a.completion_tokens
    t_seq = t_prompt + C
    prefill = P * (vis + 2 * lp["layers"] * t_prompt + lm_attn_flops(t_prompt * (t_prompt + 1) / 2) + 2 * lp["head"])
    decode = P * G * (C * (2 * lp["layers"] + 2 * lp["head"]) + lm_attn_flops(C * t_prompt + C * (C + 1) / 2))
    ref = P * G * (vis + lm_fwd_flops(t_seq, t_seq))
    policy = P * G * (vis + lm_train_flops(t_seq))
    step = prefill + decode + ref + policy
    print(f"\n## GRPO, one step ({P} prompts x {G} completions x {C} tokens; prompt {t_prompt} tokens)")
    print("| term | FLOPs |\n| --- | ---: |")
    for name, f in [("rollout: vision + prefill, once per prompt", prefill),
                    ("rollout: decode (2·N per token + attention over the context)", decode),
                    ("reference forward (β > 0), every sequence", ref),
                    ("policy forward + backward (MLPs trainable)", policy), ("**total per step**", step)]:
        print(f"| {name} | {fmt(f)} |")
    grpo_total = step * a.grpo_steps
    print(f"\nGRPO total: {a.grpo_steps} steps x {fmt(step)} = {grpo_total:.3g} FLOPs "
          f"({P * G * a.grpo_steps:,} completions, {P * a.grpo_steps:,} prompts = "
          f"{P * a.grpo_steps / a.train_items:.2f} epochs of the train split)")

    # Decode time per token for one GPU's share of a step's completions.
    weights_bytes = total * 2
    seqs_per_gpu = math.ceil(P * G / a.gpus)
    kv_bytes = seqs_per_gpu * t_seq * LM["layers"] * 2 * LM["kv_heads"] * (LM["d"] // LM["heads"]) * 2
    layer_meas = 1 / MEASURED_LAYER_TOKENS_PER_S
    layer_floor_h100 = lp["layer"] * 2 / (GPUS["H100 SXM"][1] * 1e12)
    dec_fixed = layer_meas + (LM["layers"] - 1) * layer_floor_h100
    dec_per_layer = LM["layers"] * layer_meas
    if a.decode_ms is not None:
        dec_fixed = dec_per_layer = a.decode_ms / 1000
    print(f"\n## Decode time per token (one rank: {seqs_per_gpu} sequences, batch decode)")
    print(f"measured, H100, one 7B layer + head: {1000 * layer_meas:.2f} ms/token; all of it per token -> "
          f"{1000 * dec_fixed:.1f} ms for 28 layers; all of it per layer -> {1000 * dec_per_layer:.0f} ms")

    # Utilisation implied by the measured single-layer prefill: one decoder
    # layer over 384 tokens, one window-attention vision block + patch embed
    # over 1296 patches, the merger over 324 tokens, logits at the last position.
    win = (VIS["window"] // VIS["patch"]) ** 2
    meas_flops = (2 * lp["layer"] * 384 + lm_attn_flops(384 * 385 / 2) / LM["layers"]
                  + 2 * (vp["patch_embed"] + vp["block"]) * 1296 + 4 * 1296 * win * VIS["d"]
                  + 2 * vp["merger"] * 324 + 2 * LM["d"] * 8192)
    meas_rate = meas_flops / MEASURED_LAYER_PREFILL_S
    print(f"measured 7B-layer prefill: {fmt(meas_flops)} in {1000 * MEASURED_LAYER_PREFILL_S} ms = "
          f"{fmt(meas_rate, 'FLOP/s')} = {meas_rate / (GPUS['H100 SXM'][0] * 1e12):.1%} of H100 peak")

    print(f"\n## On {a.gpus} GPUs")
    print("| GPU | MFU | SFT GPU-h | SFT wall | SFT tokens/s/GPU | GRPO train part s/step | "
          "decode s/step (floor .. measured-bracket) | GRPO GPU-h | GRPO wall |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |")
    meas_mfu = meas_rate / (GPUS["H100 SXM"][0] * 1e12)
    for gpu, (peak_t, bw, _mem, _src) in GPUS.items():
        # The measured rate is an H100's (one layer, batch 1): a floor for that chip only.
        mfus = ([meas_mfu] if gpu == "H100 SXM" else []) + a.mfu
        floor = (weights_bytes + kv_bytes) / (bw * 1e12)
        dec_lo = C * floor
        dec_hi = C * max(dec_per_layer, floor)
        dec_mid = C * max(dec_fixed, floor)
        for mfu in mfus:
            rate = peak_t * 1e12 * mfu
            sft_gpu_s = sft_total / rate
            train_s = (step - decode) / (rate * a.gpus)
            g_lo = (train_s + dec_lo) * a.grpo_steps
            g_hi = (train_s + dec_hi) * a.grpo_steps
            g_mid = (train_s + dec_mid) * a.grpo_steps
            print(f"| {gpu} | {mfu:.0%} | {sft_gpu_s / 3600:.1f} | {sft_gpu_s / a.gpus / 3600:.2f} h | "
                  f"{rate / (sft_item / t_sft):,.0f} | {train_s:.2f} | {dec_lo:.1f} .. {dec_mid:.1f} .. {dec_hi:.1f} | "
                  f"{g_lo * a.gpus / 3600:.0f} .. {g_mid * a.gpus / 3600:.0f} .. {g_hi * a.gpus / 3600:.0f} | "
                  f"{g_lo / 3600:.1f} .. {g_mid / 3600:.1f} .. {g_hi / 3600:.1f} h |")

    # Data parallel: every optimizer step all-reduces the MLP gradients (bf16).
    grad = lp["mlp_all"] * 2
    ring = 2 * (a.gpus - 1) / a.gpus * grad / (a.link_gbs * 1e9)
    sft_steps = math.ceil(a.train_items * a.epochs / a.sft_global_batch)
    print(f"\ngradient all-reduce: {grad / 1e9:.1f} GB of bf16 MLP gradients, ring over {a.gpus} GPUs at "
          f"{a.link_gbs:.0f} GB/s: {1000 * ring:.0f} ms per optimizer step; SFT {sft_steps:,} steps "
          f"(global batch {a.sft_global_batch}) -> {sft_steps * ring / 60:.1f} min, GRPO {a.grpo_steps} steps -> "
          f"{a.grpo_steps * ring / 60:.1f} min")

    # Evaluation: greedy, up to 256 tokens, decode-bound.
    batches = math.ceil(a.test_items / (a.eval_batch * a.gpus))
    print(f"\n## One eval of the test split ({a.test_items:,} items, batch {a.eval_batch} per GPU, <= 256 tokens)")
    for gpu, (_p, bw, _m, _s) in GPUS.items():
        floor = weights_bytes / (bw * 1e12)
        lo, mid, hi = (batches * 256 * x / 3600 for x in (floor, max(dec_fixed, floor), max(dec_per_layer, floor)))
        print(f"- {gpu}: {batches} rounds x 256 tokens: {lo:.2f} .. {mid:.2f} .. {hi:.2f} h wall on {a.gpus} GPUs")

    # Memory of one data-parallel rank (a full replica, optimizer not sharded).
    gb = 1e9
    rows = [("weights, bf16", total * 2), ("MLP gradients, bf16", lp["mlp_all"] * 2),
            ("AdamW moments, f32 (optim.rs)", lp["mlp_all"] * 8)]
    base = sum(b for _, b in rows)
    print("\n## Memory of one data-parallel rank (no sharding), GB")
    for name, b in rows:
        print(f"- {name}: {b / gb:.1f}")
    print(f"- sum: {base / gb:.1f}; + GRPO reference model, bf16: {(base + total * 2) / gb:.1f}; "
          f"+ f32 master copy of the MLPs: {lp['mlp_all'] * 4 / gb:.1f} more")
    print(f"- moments sharded over {a.gpus} ranks (ZeRO-1): {(base - lp['mlp_all'] * 8 * (1 - 1 / a.gpus)) / gb:.1f}")
    logits = t_sft * LM["vocab"] * 4
    print(f"- f32 logits of one SFT item (every position): {logits / gb:.2f}")


if __name__ == "__main__":
    main()
