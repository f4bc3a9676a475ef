//! Parity with HF transformers 4.57 on fixtures from `tools/qwen_parity.py`
//! (tiny random Qwen2.5-VL: window attention, a full-attention block, tied
//! embeddings, two non-square images of different sizes, left padding).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use stages_vlm::{Batch, Qwen25Vl};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn expected() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixtures().join("expected.safetensors")).unwrap().into_iter().collect()
}

fn grids(t: &Tensor) -> Vec<[i64; 3]> {
    let rows: Vec<Vec<i64>> = Vec::try_from(&t.to_kind(Kind::Int64)).unwrap();
    rows.iter().map(|r| [r[0], r[1], r[2]]).collect()
}

fn max_abs_diff_on_mask(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let m = mask.ne(0).unsqueeze(-1).expand_as(a);
    (a - b).abs().masked_select(&m).max().double_value(&[])
}

#[test]
fn prefill_logits_match_transformers() {
    let exp = expected();
    let model = Qwen25Vl::load(&fixtures().join("checkpoint"), Kind::Float, Device::Cpu).unwrap();
    let grid = grids(&exp["image_grid_thw"]);
    let batch = Batch {
        input_ids: &exp["input_ids"],
        attention_mask: &exp["attention_mask"],
        pixel_values: Some(&exp["pixel_values"]),
        image_grid_thw: &grid,
    };
    let logits = tch::no_grad(|| model.forward(&batch)).unwrap();
    let diff = max_abs_diff_on_mask(&logits, &exp["logits"], &exp["attention_mask"]);
    let scale = exp["logits"].abs().max().double_value(&[]);
    eprintln!("logits max abs diff {diff:.3e} (max |logit| {scale:.2})");
    assert!(diff <= 1e-4, "logits differ from transformers by {diff}");
}

#[test]
fn image_processor_matches_transformers() {
    use stages_vlm::processor::{ImageProcessor, open_image};
    let exp = expected();
    let proc = ImageProcessor::from_file(&fixtures().join("checkpoint/preprocessor_config.json")).unwrap();
    let images: Vec<_> =
        ["image_a.png", "image_b.png"].iter().map(|f| open_image(&fixtures().join(f)).unwrap()).collect();
    let out = proc.process(&images).unwrap();
    assert_eq!(out.grid_thw, grids(&exp["image_grid_thw"]));
    let diff = (&out.pixel_values - &exp["pixel_values"]).abs().max().double_value(&[]);
    eprintln!("pixel_values max abs diff {diff:.3e}");
    assert!(diff <= 1e-6, "pixel_values differ by {diff}");
}

#[derive(serde::Deserialize)]
struct Meta {
    texts: Vec<String>,
    greedy_tokens: Vec<Vec<i64>>,
    max_new_tokens: usize,
    prompts: Vec<Prompt>,
}

#[derive(serde::Deserialize)]
struct Prompt {
    image: String,
    question: String,
}

fn meta() -> Meta {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

/// End to end from raw images and questions: processor, chat template,
/// tokenizer, left padding, then greedy generation with the KV cache.
#[test]
fn chat_template_tokens_and_greedy_generation_match_transformers() {
    use stages_vlm::chat::{ChatTokenizer, Message};
    use stages_vlm::generate::{GenerationConfig, generate};
    use stages_vlm::processor::{ImageProcessor, open_image};

    let exp = expected();
    let meta = meta();
    let dir = fixtures().join("checkpoint");
    let model = Qwen25Vl::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let tok = ChatTokenizer::load(&dir, &model.config.eos_token_id).unwrap();
    let proc = ImageProcessor::from_file(&dir.join("preprocessor_config.json")).unwrap();
    let images: Vec<_> = meta.prompts.iter().map(|p| open_image(&fixtures().join(&p.image)).unwrap()).collect();
    let vis = proc.process(&images).unwrap();
    let counts = vis.tokens_per_image(proc.merge_size);
    let mut texts = Vec::new();
    for (i, p) in meta.prompts.iter().enumerate() {
        let rendered = tok.render(&[Message::user_with_images(1, &p.question)], true).unwrap();
        texts.push(ChatTokenizer::expand_image_pads(&rendered, &counts[i..i + 1]).unwrap());
    }
    assert_eq!(texts, meta.texts);
    let enc = tok.encode_batch(&texts).unwrap();
    assert!(enc.input_ids.equal(&exp["input_ids"]), "input_ids differ from transformers");
    assert!(enc.attention_mask.equal(&exp["attention_mask"]));

    let batch = Batch {
        input_ids: &enc.input_ids,
        attention_mask: &enc.attention_mask,
        pixel_values: Some(&vis.pixel_values),
        image_grid_thw: &vis.grid_thw,
    };
    let cfg = GenerationConfig {
        max_new_tokens: meta.max_new_tokens,
        eos_token_ids: model.config.eos_token_id.clone(),
        stop_strings: vec![],
        ..Default::default()
    };
    let out = generate(&model, Some(&tok), &batch, &cfg).unwrap();
    let got: Vec<Vec<i64>> = out.iter().map(|c| c.token_ids.clone()).collect();
    assert_eq!(got, meta.greedy_tokens);
    assert!(out.iter().all(|c| c.logprobs.len() == c.token_ids.len() && c.logprobs.iter().all(|&l| l <= 0.0)));
}

/// Decoding with the KV cache gives the same logits as a full forward over
/// the longer sequence (checks cache, masks and mRoPE deltas together).
#[test]
fn cached_decode_matches_full_forward_and_groups_share_the_prefill() {
    use stages_vlm::generate::{GenerationConfig, generate};
    let exp = expected();
    let model = Qwen25Vl::load(&fixtures().join("checkpoint"), Kind::Float, Device::Cpu).unwrap();
    let grid = grids(&exp["image_grid_thw"]);
    let ids = &exp["input_ids"];
    let mask = &exp["attention_mask"];
    let batch =
        Batch { input_ids: ids, attention_mask: mask, pixel_values: Some(&exp["pixel_values"]), image_grid_thw: &grid };
    let next = Tensor::from_slice(&[7i64, 9]);
    let step = tch::no_grad(|| {
        let (_, mut state) = model.prefill(&batch, true).unwrap();
        model.decode_step(&next, &mut state)
    });
    let ids2 = Tensor::cat(&[ids, &next.view([2, 1])], 1);
    let mask2 = Tensor::cat(&[mask, &Tensor::ones([2, 1], (Kind::Int64, Device::Cpu))], 1);
    let batch2 = Batch {
        input_ids: &ids2,
        attention_mask: &mask2,
        pixel_values: Some(&exp["pixel_values"]),
        image_grid_thw: &grid,
    };
    let full = tch::no_grad(|| model.forward(&batch2)).unwrap();
    let last = full.select(1, -1);
    let diff = (&step - &last).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "cached decode differs from full forward by {diff}");

    // Sampling a group: 3 completions per prompt, reproducible by seed.
    let cfg = GenerationConfig {
        max_new_tokens: 5,
        temperature: 1.0,
        top_k: 50,
        seed: 11,
        num_return_sequences: 3,
        stop_strings: vec![],
        ..Default::default()
    };
    let a = generate(&model, None, &batch, &cfg).unwrap();
    let b = generate(&model, None, &batch, &cfg).unwrap();
    assert_eq!(a.len(), 6);
    assert_eq!(a.iter().map(|c| c.prompt).collect::<Vec<_>>(), vec![0, 0, 0, 1, 1, 1]);
    assert_eq!(a, b);
    assert!(a.iter().any(|c| c.token_ids != a[0].token_ids), "group members should differ when sampling");
}

/// The forward is usable for training: gradients reach exactly the
/// parameters selected by the default SFT regex (language-model MLPs).
#[test]
fn gradients_flow_to_selected_parameters_only() {
    use stages_vlm::checkpoint::DEFAULT_TRAINABLE;
    let exp = expected();
    let model = Qwen25Vl::load(&fixtures().join("checkpoint"), Kind::Float, Device::Cpu).unwrap();
    let selected = model.set_trainable(DEFAULT_TRAINABLE).unwrap();
    assert_eq!(selected.len(), 3 * 3, "3 layers x gate/up/down");
    assert!(selected.iter().all(|n| n.starts_with("model.language_model.layers.") && n.contains(".mlp.")));
    let grid = grids(&exp["image_grid_thw"]);
    let batch = Batch {
        input_ids: &exp["input_ids"],
        attention_mask: &exp["attention_mask"],
        pixel_values: Some(&exp["pixel_values"]),
        image_grid_thw: &grid,
    };
    let logits = model.forward(&batch).unwrap();
    logits.log_softmax(-1, Kind::Float).select(2, 5).sum(Kind::Float).backward();
    for (name, p) in &model.params {
        let has_grad = p.grad().defined();
        assert_eq!(has_grad, selected.contains(name), "{name}");
        if has_grad {
            assert!(p.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name} got a zero gradient");
        }
    }
}
