//! Activation memory and step time of one SFT-style training step, plain or
//! with activation checkpointing (docs/benchmarks.md, "Activation
//! checkpointing"): a random Qwen2.5-VL (`--layers` decoder layers of
//! `--hidden`, a vision tower of `--vision-blocks`), one sequence of
//! `--len` tokens of which `--image-tokens` are an image's, a loss on the
//! last `--target` tokens (SFT's masked cross-entropy).
//!
//! `--mode plain|checkpointed` runs one step in this process and prints the
//! peak RSS it added: VmHWM is reset (`/proc/self/clear_refs`) after the
//! model, the batch and one warm-up step, and the resident set before the
//! step is subtracted. `--mode time` alternates the two modes for
//! `--steps` steps each and prints every step's seconds.
//!
//! ```sh
//! CARGO_PROFILE_DEV_OPT_LEVEL=2 cargo build -p stages-vlm --example checkpointing_bench
//! for m in plain checkpointed; do nice target/debug/examples/checkpointing_bench --mode $m; done
//! ```

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, bail};
use stages_vlm::{Batch, LogitsSpan, Qwen25Vl, Qwen25VlConfig};
use tch::{Device, Kind, Reduction, Tensor};

const IMAGE: i64 = 8000;
const VISION_START: i64 = 8001;

struct Args {
    mode: String,
    layers: i64,
    hidden: i64,
    vision_blocks: i64,
    len: i64,
    image_tokens: i64,
    target: i64,
    trainable: String,
    threads: i32,
    steps: usize,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        mode: "plain".into(),
        layers: 8,
        hidden: 1024,
        vision_blocks: 8,
        len: 1024,
        image_tokens: 256,
        target: 64,
        trainable: r"^model\.language_model\.|^lm_head\.|^model\.visual\.blocks\.|^model\.visual\.merger\.".into(),
        threads: 0,
        steps: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let int = |v: &str| v.parse::<i64>().map_err(|e| anyhow::anyhow!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--mode" => a.mode = value,
            "--layers" => a.layers = int(&value)?,
            "--hidden" => a.hidden = int(&value)?,
            "--vision-blocks" => a.vision_blocks = int(&value)?,
            "--len" => a.len = int(&value)?,
            "--image-tokens" => a.image_tokens = int(&value)?,
            "--target" => a.target = int(&value)?,
            "--trainable" => a.trainable = value,
            "--threads" => a.threads = int(&value)? as i32,
            "--steps" => a.steps = int(&value)? as usize,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn status_kb(field: &str) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let line = s.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    let side = (a.image_tokens as f64).sqrt() as i64;
    if side * side != a.image_tokens || a.image_tokens + 8 + a.target > a.len {
        bail!("--image-tokens must be a square number that fits in --len with the target");
    }
    let (h, vh) = (a.hidden, a.hidden * 5 / 8);
    let raw = serde_json::json!({
        "model_type": "qwen2_5_vl", "vocab_size": 8192, "hidden_size": h, "intermediate_size": h * 11 / 4,
        "num_hidden_layers": a.layers, "num_attention_heads": h / 64, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "tie_word_embeddings": false, "image_token_id": IMAGE, "video_token_id": 8002,
        "vision_start_token_id": VISION_START, "vision_end_token_id": 8003, "eos_token_id": 1,
        "vision_config": {
            "depth": a.vision_blocks, "hidden_size": vh, "intermediate_size": vh * 8 / 3, "num_heads": vh / 64,
            "in_chans": 3, "out_hidden_size": h, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "window_size": 112, "fullatt_block_indexes": (0..a.vision_blocks).filter(|i| i % 4 == 3).collect::<Vec<_>>()
        }
    });
    let config = Qwen25VlConfig::from_value(raw, Path::new("bench config"))?;
    let model = Qwen25Vl::random(config, 1, Kind::Float, Device::Cpu)?;
    let trained = model.set_trainable(&a.trainable)?;
    // One row: text, the image, text, then the target.
    let text = a.len - a.image_tokens - 2;
    let mut ids: Vec<i64> = (0..text / 2).map(|i| 2 + (i * 37) % 7000).collect();
    ids.push(VISION_START);
    ids.extend(std::iter::repeat_n(IMAGE, a.image_tokens as usize));
    ids.push(8003);
    ids.extend((0..text - text / 2).map(|i| 2 + (i * 53) % 7000));
    let len = ids.len() as i64;
    let labels: Vec<i64> =
        ids.iter().enumerate().map(|(i, &t)| if i as i64 >= len - a.target { t } else { -100 }).collect();
    let input_ids = Tensor::from_slice(&ids).view([1, len]);
    let mask = Tensor::ones([1, len], (Kind::Int64, Device::Cpu));
    let labels = Tensor::from_slice(&labels).view([1, len]);
    let grid = [[1, 2 * side, 2 * side]];
    tch::manual_seed(0);
    let pixels = Tensor::randn([4 * a.image_tokens, 1176], (Kind::Float, Device::Cpu));
    let batch =
        Batch { input_ids: &input_ids, attention_mask: &mask, pixel_values: Some(&pixels), image_grid_thw: &grid };
    let step = |checkpointing: bool| -> anyhow::Result<f64> {
        model.forward_backward::<anyhow::Error>(&batch, LogitsSpan::All, checkpointing, |logits| {
            let vocab = logits.size()[2];
            let shifted = logits.narrow(1, 0, len - 1).reshape([-1, vocab]);
            let targets = labels.narrow(1, 1, len - 1).reshape([-1]);
            Ok(shifted.cross_entropy_loss::<Tensor>(&targets, None, Reduction::Mean, -100, 0.0))
        })
    };
    let zero_grads = || {
        for t in model.params.values() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    };
    let params: i64 = model.params.values().map(|t| t.numel() as i64).sum();
    let info = serde_json::json!({"layers": a.layers, "hidden": h, "vision_blocks": a.vision_blocks, "len": len,
        "image_tokens": a.image_tokens, "parameters": params, "trainable_tensors": trained.len(),
        "threads": tch::get_num_threads()});
    match a.mode.as_str() {
        "plain" | "checkpointed" => {
            let ckpt = a.mode == "checkpointed";
            // Warm-up: gradients allocated, allocator and thread pools settled.
            step(ckpt)?;
            zero_grads();
            let before = status_kb("VmRSS:")?;
            std::fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM")?;
            let t0 = Instant::now();
            let loss = step(ckpt)?;
            let secs = t0.elapsed().as_secs_f64();
            let peak = status_kb("VmHWM:")?;
            println!(
                "{}",
                serde_json::json!({"mode": a.mode, "info": info, "loss": loss, "step_s": secs,
                    "rss_before_mib": before / 1024.0, "peak_mib": peak / 1024.0,
                    "step_peak_above_baseline_mib": (peak - before) / 1024.0})
            );
        }
        "time" => {
            step(false)?;
            step(true)?;
            for i in 0..a.steps {
                for ckpt in [false, true] {
                    zero_grads();
                    let t0 = Instant::now();
                    step(ckpt)?;
                    let secs = t0.elapsed().as_secs_f64();
                    println!("{}", serde_json::json!({"step": i, "checkpointed": ckpt, "step_s": secs}));
                }
            }
        }
        other => bail!("--mode: plain, checkpointed or time, got {other:?}"),
    }
    Ok(())
}
