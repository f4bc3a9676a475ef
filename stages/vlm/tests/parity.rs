//! Parity with HF transformers 4.57 on fixtures from `tools/qwen_parity.py`
//! (tiny random Qwen2.5-VL: window attention, a full-attention block, tied
//! embeddings, two non-square images of different sizes, left padding).

mod support;

use stages_vlm::Qwen25Vl;
use support::{
    Fixture, assert_gradients_reach_only, assert_greedy_generation_matches, cached_decode_vs_full_forward,
    fixture_logits, grids, max_abs_diff_on_mask,
};
use tch::{Device, Kind};

fn fixture() -> Fixture {
    Fixture::named("parity")
}

#[test]
fn prefill_logits_match_transformers() {
    let exp = fixture().expected();
    let model = Qwen25Vl::load(&fixture().checkpoint(), Kind::Float, Device::Cpu).unwrap();
    let logits = fixture_logits(&model, &exp);
    let diff = max_abs_diff_on_mask(&logits, &exp["logits"], &exp["attention_mask"]);
    let scale = exp["logits"].abs().max().double_value(&[]);
    eprintln!("logits max abs diff {diff:.3e} (max |logit| {scale:.2})");
    assert!(diff <= 1e-4, "logits differ from transformers by {diff}");
}

#[test]
fn image_processor_matches_transformers() {
    use stages_vlm::processor::{ImageProcessor, open_image};
    let exp = fixture().expected();
    let proc = ImageProcessor::from_file(&fixture().checkpoint().join("preprocessor_config.json")).unwrap();
    let images: Vec<_> =
        ["image_a.png", "image_b.png"].iter().map(|f| open_image(&fixture().file(f)).unwrap()).collect();
    let out = proc.process(&images).unwrap();
    assert_eq!(out.grid_thw, grids(&exp["image_grid_thw"]));
    let diff = (&out.pixel_values - &exp["pixel_values"]).abs().max().double_value(&[]);
    eprintln!("pixel_values max abs diff {diff:.3e}");
    assert!(diff <= 1e-6, "pixel_values differ by {diff}");
}

/// End to end from raw images and questions: processor, chat template,
/// tokenizer, left padding, then greedy generation with the KV cache.
#[test]
fn chat_template_tokens_and_greedy_generation_match_transformers() {
    use stages_vlm::chat::ChatTokenizer;
    use stages_vlm::processor::ImageProcessor;

    let dir = fixture().checkpoint();
    let model = Qwen25Vl::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let tok = ChatTokenizer::load(&dir, &model.config.eos_token_id).unwrap();
    let proc = ImageProcessor::from_file(&dir.join("preprocessor_config.json")).unwrap();
    assert_greedy_generation_matches(&fixture(), &model, &tok, &proc);
}

/// Decoding with the KV cache gives the same logits as a full forward over
/// the longer sequence (checks cache, masks and mRoPE deltas together).
#[test]
fn cached_decode_matches_full_forward_and_groups_share_the_prefill() {
    use stages_vlm::generate::{GenerationConfig, generate};
    let exp = fixture().expected();
    let model = Qwen25Vl::load(&fixture().checkpoint(), Kind::Float, Device::Cpu).unwrap();
    let diff = cached_decode_vs_full_forward(&model, &exp);
    assert!(diff < 1e-4, "cached decode differs from full forward by {diff}");

    let grid = grids(&exp["image_grid_thw"]);
    let batch = stages_vlm::Batch {
        input_ids: &exp["input_ids"],
        attention_mask: &exp["attention_mask"],
        pixel_values: Some(&exp["pixel_values"]),
        image_grid_thw: &grid,
    };
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
    let exp = fixture().expected();
    let model = Qwen25Vl::load(&fixture().checkpoint(), Kind::Float, Device::Cpu).unwrap();
    let selected = model.set_trainable(DEFAULT_TRAINABLE).unwrap();
    assert_eq!(selected.len(), 3 * 3, "3 layers x gate/up/down");
    assert!(selected.iter().all(|n| n.starts_with("model.language_model.layers.") && n.contains(".mlp.")));
    assert_gradients_reach_only(&model, &selected, &exp);
}
