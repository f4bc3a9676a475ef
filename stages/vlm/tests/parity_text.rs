//! Parity of a plain Qwen2 causal-LM checkpoint (text only, the judge's
//! `model` backend) with HF transformers 4.57 `Qwen2ForCausalLM`, on fixtures
//! from `tools/qwen_parity.py generate-text` (tiny random model, untied
//! lm_head, Qwen2.5-Instruct-style chat template, two left-padded prompts).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use stages_vlm::chat::{ChatTokenizer, Message};
use stages_vlm::generate::{GenerationConfig, generate};
use stages_vlm::{Batch, Qwen25Vl};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity_text")
}

fn expected() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixtures().join("expected.safetensors")).unwrap().into_iter().collect()
}

#[derive(serde::Deserialize)]
struct Meta {
    chats: Vec<Vec<Message>>,
    texts: Vec<String>,
    greedy_tokens: Vec<Vec<i64>>,
    max_new_tokens: usize,
}

fn meta() -> Meta {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn text_batch<'a>(ids: &'a Tensor, mask: &'a Tensor) -> Batch<'a> {
    Batch { input_ids: ids, attention_mask: mask, pixel_values: None, image_grid_thw: &[] }
}

/// Chat template, tokenizer and left padding, then prefill logits and greedy
/// generation with the KV cache, all against transformers.
#[test]
fn qwen2_text_checkpoint_matches_transformers() {
    let exp = expected();
    let meta = meta();
    let dir = fixtures().join("checkpoint");
    let model = Qwen25Vl::load(&dir, Kind::Float, Device::Cpu).unwrap();
    assert!(model.config.is_text_only() && model.visual.is_none());
    assert!(!model.config.text.tie_word_embeddings, "the fixture checks the untied lm_head");
    let tok = ChatTokenizer::load(&dir, &model.config.eos_token_id).unwrap();
    let texts: Vec<String> = meta.chats.iter().map(|c| tok.render(c, true).unwrap()).collect();
    assert_eq!(texts, meta.texts, "chat template renders like transformers");
    let enc = tok.encode_batch(&texts).unwrap();
    assert!(enc.input_ids.equal(&exp["input_ids"]), "input_ids differ from transformers");
    assert!(enc.attention_mask.equal(&exp["attention_mask"]));

    let batch = text_batch(&enc.input_ids, &enc.attention_mask);
    let logits = tch::no_grad(|| model.forward(&batch)).unwrap();
    let m = exp["attention_mask"].ne(0).unsqueeze(-1).expand_as(&logits);
    let diff = (&logits - &exp["logits"]).abs().masked_select(&m).max().double_value(&[]);
    let scale = exp["logits"].abs().max().double_value(&[]);
    eprintln!("text logits max abs diff {diff:.3e} (max |logit| {scale:.2})");
    assert!(diff <= 1e-4, "logits differ from transformers by {diff}");

    let cfg = GenerationConfig {
        max_new_tokens: meta.max_new_tokens,
        eos_token_ids: model.config.eos_token_id.clone(),
        stop_strings: vec![],
        ..Default::default()
    };
    let out = generate(&model, Some(&tok), &batch, &cfg).unwrap();
    let got: Vec<Vec<i64>> = out.iter().map(|c| c.token_ids.clone()).collect();
    assert_eq!(got, meta.greedy_tokens);
}

/// A decode step with the KV cache equals a full forward over the longer,
/// left-padded sequence (text positions continue from the real tokens).
#[test]
fn qwen2_text_cached_decode_matches_full_forward() {
    let exp = expected();
    let model = Qwen25Vl::load(&fixtures().join("checkpoint"), Kind::Float, Device::Cpu).unwrap();
    let (ids, mask) = (&exp["input_ids"], &exp["attention_mask"]);
    let next = Tensor::from_slice(&[7i64, 9]);
    let step = tch::no_grad(|| {
        let (_, mut state) = model.prefill(&text_batch(ids, mask), true).unwrap();
        model.decode_step(&next, &mut state)
    });
    let ids2 = Tensor::cat(&[ids, &next.view([2, 1])], 1);
    let mask2 = Tensor::cat(&[mask, &Tensor::ones([2, 1], (Kind::Int64, Device::Cpu))], 1);
    let full = tch::no_grad(|| model.forward(&text_batch(&ids2, &mask2))).unwrap();
    let diff = (full.select(1, -1) - step).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "cached decode differs from the full forward by {diff}");
}
