//! Activation checkpointing (`gradient_checkpointing = true`) gives the
//! gradients of the plain forward/backward, for SFT's cross-entropy and for
//! GRPO's clipped objective with the KL term, on a tiny random Qwen2.5-VL
//! (3 decoder layers, 3 vision blocks, window and full attention) with two
//! images of different sizes in a left-padded batch; for the trainable sets
//! the recipes use (mini: LM + lm_head + vision blocks + merger; full: LM
//! MLPs) and for edge cases (one vision block only, so the gradient crosses
//! frozen decoder layers and the image scatter; tied embeddings trained at
//! both ends; a text-only batch); and with Qwen2-VL's vision tower.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use stage_api::{StageContext, StageKind};
use stages_train::grpo::GrpoParams;
use stages_train::policy_loss::{LossConfig, LossInputs, LossType, StepScale, policy_loss, token_logps};
use stages_train::sft::{IGNORE, SftParams, Target, masked_cross_entropy_sum};
use stages_train::{Grpo, Sft};
use stages_vlm::{Batch, LogitsSpan, Pretrained, Qwen25Vl, Qwen25VlConfig};
use tch::{Device, Kind, Tensor};

const IMAGE: i64 = 60;
const VISION_START: i64 = 61;
const VISION_END: i64 = 62;
const PAD: i64 = 0;
const VOCAB: i64 = 64;

/// The tiny model: Qwen2.5-VL, or with `Tower::Qwen2Vl` Qwen2-VL's vision
/// tower (LayerNorm + QuickGELU blocks, full attention).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tower {
    Qwen2_5Vl,
    Qwen2Vl,
}

fn config_with(tied: bool, tower: Tower) -> Qwen25VlConfig {
    let mut raw = serde_json::json!({
        "model_type": "qwen2_5_vl",
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "tie_word_embeddings": tied, "initializer_range": 0.2,
        "image_token_id": IMAGE, "video_token_id": 63, "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END, "eos_token_id": 1,
        "vision_config": {
            "depth": 3, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2, "in_chans": 3,
            "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "window_size": 56, "fullatt_block_indexes": [1]
        }
    });
    if tower == Tower::Qwen2Vl {
        raw["model_type"] = "qwen2_vl".into();
        raw["vision_config"] = serde_json::json!({
            "depth": 3, "embed_dim": 16, "hidden_size": 32, "mlp_ratio": 2, "num_heads": 2, "in_channels": 3,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2
        });
    }
    Qwen25VlConfig::from_value(raw, Path::new("test config")).unwrap()
}

/// Deterministic values in [-1.7, 1.7] of the given shape (not libtorch's
/// global generator: tests run in parallel threads and would race on it).
fn pseudo_random(shape: [i64; 2], phase: f64) -> Tensor {
    let n = shape[0] * shape[1];
    (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 2.399 + phase).sin().view(shape) * 1.7
}

/// A batch laid out as GRPO's micro-batches are: left-padded prompts (text,
/// an image, text), right-padded completions of `completion` tokens.
struct Inputs {
    ids: Tensor,
    mask: Tensor,
    pixel_values: Option<Tensor>,
    grids: Vec<[i64; 3]>,
    /// (batch, completion) ids and 1/0 loss mask.
    completion: Tensor,
    completion_mask: Tensor,
}

impl Inputs {
    fn batch(&self) -> Batch<'_> {
        Batch {
            input_ids: &self.ids,
            attention_mask: &self.mask,
            pixel_values: self.pixel_values.as_ref(),
            image_grid_thw: &self.grids,
        }
    }

    fn new(images: bool) -> Self {
        // Row 0: a 4x4-patch image (4 merged tokens); row 1: 4x8 (8 tokens), so
        // both the window (2x2 merged tokens) and the full-attention blocks see
        // several windows.
        let grids: Vec<[i64; 3]> = if images { vec![[1, 4, 4], [1, 4, 8]] } else { vec![] };
        let text = |n: i64, from: i64| (0..n).map(move |i| 2 + (from + 7 * i) % 50);
        let mut rows = Vec::new();
        let completions: [Vec<i64>; 2] = [text(5, 3).collect(), text(3, 11).collect()];
        for (r, g) in [0usize, 1].iter().zip([4i64, 8]) {
            let mut p: Vec<i64> = text(3 + *r as i64, 5).collect();
            if images {
                p.push(VISION_START);
                p.extend(std::iter::repeat_n(IMAGE, g as usize));
                p.push(VISION_END);
            }
            p.extend(text(4, 9 + *r as i64));
            rows.push(p);
        }
        let p_len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let c_len = completions.iter().map(Vec::len).max().unwrap_or(0);
        let (mut ids, mut mask, mut cids, mut cmask) = (vec![], vec![], vec![], vec![]);
        for (p, c) in rows.iter().zip(&completions) {
            let (lp, lc) = (p.len(), c.len());
            ids.extend(std::iter::repeat_n(PAD, p_len - lp).chain(p.iter().copied()).chain(c.iter().copied()));
            ids.extend(std::iter::repeat_n(PAD, c_len - lc));
            mask.extend(std::iter::repeat_n(0i64, p_len - lp).chain(std::iter::repeat_n(1, lp + lc)));
            mask.extend(std::iter::repeat_n(0i64, c_len - lc));
            cids.extend(c.iter().copied().chain(std::iter::repeat_n(PAD, c_len - lc)));
            cmask.extend((0..c_len).map(|t| f32::from(u8::from(t < lc))));
        }
        let (b, l) = (2, (p_len + c_len) as i64);
        let patches: i64 = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        Inputs {
            ids: Tensor::from_slice(&ids).view([b, l]),
            mask: Tensor::from_slice(&mask).view([b, l]),
            pixel_values: images.then(|| pseudo_random([patches, 3 * 2 * 14 * 14], 1.7)),
            grids,
            completion: Tensor::from_slice(&cids).view([b, c_len as i64]),
            completion_mask: Tensor::from_slice(&cmask).view([b, c_len as i64]),
        }
    }

    /// SFT labels: the completion tokens, IGNORE elsewhere.
    fn labels(&self) -> Tensor {
        let c = self.completion.size()[1];
        let l = self.ids.size()[1];
        let labels = Tensor::full([2, l], IGNORE, (Kind::Int64, Device::Cpu));
        let keep = self.completion_mask.to_kind(Kind::Bool);
        let completion = self.completion.where_self(&keep, &Tensor::from(IGNORE));
        labels.narrow(1, l - c, c).copy_(&completion);
        labels
    }
}

#[derive(Clone, Copy, Debug)]
enum Loss {
    Sft,
    Grpo(LossType),
}

/// Gradients of every trainable parameter after one forward/backward of
/// `loss` (None where a parameter got no gradient), and the loss.
fn gradients(
    tied: bool,
    tower: Tower,
    trainable: &str,
    inputs: &Inputs,
    loss: Loss,
    checkpointing: bool,
) -> (f64, BTreeMap<String, Option<Tensor>>) {
    let model = Qwen25Vl::random(config_with(tied, tower), 5, Kind::Float, Device::Cpu).unwrap();
    let names = model.set_trainable(trainable).unwrap();
    assert!(!names.is_empty(), "{trainable} selects nothing");
    let batch = inputs.batch();
    let c = inputs.completion.size()[1];
    let value = match loss {
        Loss::Sft => {
            let labels = inputs.labels();
            let tokens = inputs.completion_mask.sum(Kind::Float).double_value(&[]);
            model
                .forward_backward::<anyhow::Error>(&batch, LogitsSpan::All, checkpointing, |logits| {
                    Ok(masked_cross_entropy_sum(logits, &labels) / tokens)
                })
                .unwrap()
        }
        Loss::Grpo(loss_type) => {
            // Old and reference log-probs away from the current ones, so that
            // the clip binds on some tokens (both ways) and the KL is not 0.
            let (old_shift, ref_shift) = (pseudo_random([2, c], 0.9) * 0.6, pseudo_random([2, c], 2.3) * 0.5);
            let advantages = Tensor::from_slice(&[1.0f32, -0.7]);
            let cfg =
                LossConfig { loss_type, epsilon_low: 0.2, epsilon_high: 0.28, beta: 0.04, max_completion_length: 8 };
            let mask = &inputs.completion_mask;
            model
                .forward_backward::<anyhow::Error>(&batch, LogitsSpan::Last(c + 1), checkpointing, |logits| {
                    let logits = logits.narrow(1, 0, c);
                    let (logps, _entropy) = token_logps(&logits, &inputs.completion, 0.9, &[IMAGE, 63]);
                    let old = logps.detach() + &old_shift;
                    let reference = logps.detach() + &ref_shift;
                    let x = LossInputs {
                        logps: &logps,
                        old_logps: &old,
                        ref_logps: Some(&reference),
                        advantages: &advantages,
                        mask,
                    };
                    let (loss, stats) = policy_loss(&cfg, &x, &StepScale { sequences: 2, tokens: 20.0 });
                    assert!(stats.low_clipped + stats.high_clipped > 0.0, "the clip must bind somewhere");
                    Ok(loss)
                })
                .unwrap()
        }
    };
    let grads = model
        .params
        .iter()
        .map(|(n, t)| {
            let g = t.grad();
            (n.clone(), g.defined().then(|| g.copy()))
        })
        .collect();
    (value, grads)
}

/// Max |plain − checkpointed| over all gradients (and the largest gradient
/// entry, for scale); panics if a gradient exists on one side only.
fn compare(tied: bool, trainable: &str, images: bool, loss: Loss) -> (f64, f64) {
    compare_with(tied, Tower::Qwen2_5Vl, trainable, images, loss)
}

fn compare_with(tied: bool, tower: Tower, trainable: &str, images: bool, loss: Loss) -> (f64, f64) {
    // Both passes under one libtorch thread count (the stage test sets it).
    let _serial = support::serial();
    let inputs = Inputs::new(images);
    let (plain_loss, plain) = gradients(tied, tower, trainable, &inputs, loss, false);
    let (ckpt_loss, ckpt) = gradients(tied, tower, trainable, &inputs, loss, true);
    assert_eq!(plain_loss, ckpt_loss, "{trainable} {loss:?}: the loss differs");
    let (mut diff, mut scale) = (0.0f64, 0.0f64);
    let mut with_grad = 0;
    for (name, p) in &plain {
        match (p, &ckpt[name]) {
            (None, None) => {}
            (Some(p), Some(c)) => {
                with_grad += 1;
                diff = diff.max((p - c).abs().max().double_value(&[]));
                scale = scale.max(p.abs().max().double_value(&[]));
            }
            (p, c) => panic!("{name}: plain gradient {} vs checkpointed {}", p.is_some(), c.is_some()),
        }
    }
    assert!(with_grad > 0 && scale > 0.0, "{trainable}: no gradient at all");
    eprintln!(
        "{tower:?} {trainable:<70} images {images:<5} tied {tied:<5} {loss:?}: max |diff| {diff:.3e} (max |grad| {scale:.3e})"
    );
    assert!(diff <= 1e-6, "{trainable} {loss:?}: gradients differ by {diff}");
    (diff, scale)
}

const MINI: &str = r"^model\.language_model\.|^lm_head\.|^model\.visual\.blocks\.|^model\.visual\.merger\.";
const FULL: &str = r"^model\.language_model\.layers\.\d+\.mlp\.";
const ALL: &str = r".";
/// One vision block: the gradient crosses three frozen decoder layers, the
/// image scatter, the frozen merger and the frozen block after it.
const ONE_VISION_BLOCK: &str = r"^model\.visual\.blocks\.1\.";
const TIED_ENDS: &str = r"^model\.language_model\.embed_tokens\.|^model\.language_model\.layers\.1\.";

#[test]
fn sft_gradients_equal_the_plain_pass() {
    for (pattern, tied) in [(MINI, false), (FULL, false), (ALL, false), (ONE_VISION_BLOCK, false), (TIED_ENDS, true)] {
        compare(tied, pattern, true, Loss::Sft);
    }
    compare(false, MINI, false, Loss::Sft);
}

#[test]
fn grpo_gradients_equal_the_plain_pass() {
    for loss_type in [LossType::Grpo, LossType::Bnpo, LossType::DrGrpo, LossType::Dapo] {
        compare(false, MINI, true, Loss::Grpo(loss_type));
    }
    for (pattern, tied) in [(FULL, false), (ALL, false), (ONE_VISION_BLOCK, false), (TIED_ENDS, true)] {
        compare(tied, pattern, true, Loss::Grpo(LossType::Grpo));
    }
    compare(true, ALL, false, Loss::Grpo(LossType::Dapo));
}

#[test]
fn qwen2_vl_tower_gradients_equal_the_plain_pass() {
    for pattern in [MINI, ONE_VISION_BLOCK, ALL] {
        compare_with(false, Tower::Qwen2Vl, pattern, true, Loss::Sft);
        compare_with(false, Tower::Qwen2Vl, pattern, true, Loss::Grpo(LossType::Grpo));
    }
}

/// Max |a − b| over every parameter of two checkpoints.
fn weight_diff(a: &Path, b: &Path) -> f64 {
    let a = Pretrained::load(a, Kind::Float, Device::Cpu).unwrap().model;
    let b = Pretrained::load(b, Kind::Float, Device::Cpu).unwrap().model;
    a.params.iter().map(|(n, t)| (t - &b.params[n]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

/// metrics.jsonl (results only: no wall-clock columns).
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The stages' `gradient_checkpointing` switch: the same weights and metrics
/// after SFT steps (everything trainable, images in every batch) and after
/// GRPO steps (KL to a reference model, two updates per round so the clip
/// and the stored old log-probs take part).
#[test]
fn sft_and_grpo_stages_train_the_same_weights_with_checkpointing() {
    let _serial = support::serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let split = support::write_split(&root.join("train"), 8);
    // Taught the format (as the GRPO tests' fixture), so groups earn different rewards.
    let sft_model = support::tiny_sft_model(root, &split, 20);
    let init = root.join("init");
    let mut outs = Vec::new();
    for checkpointing in [false, true] {
        let tag = if checkpointing { "ckpt" } else { "plain" };
        let sft_out = root.join(format!("sft-{tag}"));
        let mut ctx = StageContext::builder("sft", &sft_out)
            .input("model", "tiny", None, &init)
            .input("data", "export", Some("train"), &split)
            .resume_dir(root.join(format!("sft-resume-{tag}")))
            .seed(5)
            .build()
            .unwrap();
        let params = SftParams {
            target: Target::ThinkAnswer,
            trainable: vec![".*".into()],
            lr: 1e-2,
            batch_size: 4,
            max_steps: Some(3),
            gradient_checkpointing: checkpointing,
            ..Default::default()
        };
        Sft::run(&params, &mut ctx).unwrap();
        let grpo_out = root.join(format!("grpo-{tag}"));
        let mut ctx = StageContext::builder("grpo", &grpo_out)
            .input("model", "sft", None, &sft_model)
            .input("data", "export", Some("train"), &split)
            .resume_dir(root.join(format!("grpo-resume-{tag}")))
            .seed(11)
            .build()
            .unwrap();
        let params = GrpoParams {
            steps: 4,
            num_iterations: 2,
            prompts_per_step: 4,
            num_generations: 4,
            max_completion_length: 24,
            micro_batch_size: 4,
            trainable: vec![".*".into()],
            lr: 1e-3,
            checkpoint_every: 0,
            gradient_checkpointing: checkpointing,
            ..Default::default()
        };
        Grpo::validate(&params).unwrap();
        Grpo::run(&params, &mut ctx).unwrap();
        outs.push((sft_out, grpo_out));
    }
    let [(sft_plain, grpo_plain), (sft_ckpt, grpo_ckpt)] = [outs[0].clone(), outs[1].clone()];
    let (sft_diff, grpo_diff) = (weight_diff(&sft_plain, &sft_ckpt), weight_diff(&grpo_plain, &grpo_ckpt));
    eprintln!("stage weights: sft max |diff| {sft_diff:.3e}, grpo max |diff| {grpo_diff:.3e}");
    assert!(sft_diff <= 1e-6 && grpo_diff <= 1e-6, "sft {sft_diff}, grpo {grpo_diff}");
    assert!(weight_diff(&sft_plain, &init) > 1e-3, "SFT must have trained");
    assert!(weight_diff(&grpo_plain, &sft_model) > 1e-5, "GRPO must have trained");
    assert_eq!(metrics(&sft_plain), metrics(&sft_ckpt));
    assert_eq!(metrics(&grpo_plain), metrics(&grpo_ckpt));
}
