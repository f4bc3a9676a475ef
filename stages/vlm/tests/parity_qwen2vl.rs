//! Parity of a Qwen2-VL checkpoint (`model_type = "qwen2_vl"`, the
//! architecture of MedVLM-R1 and Med-R1) with HF transformers 4.57.6
//! `Qwen2VLForConditionalGeneration`, on fixtures from
//! `tools/qwen_parity.py generate-qwen2vl` (tiny random model: LayerNorm +
//! QuickGELU vision blocks, full attention, LayerNorm merger, untied
//! lm_head; two non-square images of different sizes, left padding).
//! Same checks and tolerances as the Qwen2.5-VL parity (`parity.rs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use stages_vlm::chat::{ChatTokenizer, Message};
use stages_vlm::checkpoint::normalize_name;
use stages_vlm::generate::{GenerationConfig, generate};
use stages_vlm::processor::open_image;
use stages_vlm::{Batch, ModelType, Pretrained, Qwen25Vl, VisionTower};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity_qwen2vl")
}

fn checkpoint() -> PathBuf {
    fixtures().join("checkpoint")
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

#[derive(serde::Deserialize)]
struct Meta {
    model_type: String,
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

fn fixture_logits(model: &Qwen25Vl, exp: &HashMap<String, Tensor>) -> Tensor {
    let grid = grids(&exp["image_grid_thw"]);
    let batch = Batch {
        input_ids: &exp["input_ids"],
        attention_mask: &exp["attention_mask"],
        pixel_values: Some(&exp["pixel_values"]),
        image_grid_thw: &grid,
    };
    tch::no_grad(|| model.forward(&batch)).unwrap()
}

#[test]
fn qwen2vl_prefill_logits_match_transformers() {
    let exp = expected();
    assert_eq!(meta().model_type, "qwen2_vl");
    let model = Qwen25Vl::load(&checkpoint(), Kind::Float, Device::Cpu).unwrap();
    assert_eq!(model.config.model_type, ModelType::Qwen2Vl);
    assert!(matches!(model.visual, Some(VisionTower::Qwen2Vl(_))), "a Qwen2-VL tower");
    assert!(!model.config.text.tie_word_embeddings, "the fixture checks the untied lm_head");
    let logits = fixture_logits(&model, &exp);
    let diff = max_abs_diff_on_mask(&logits, &exp["logits"], &exp["attention_mask"]);
    let scale = exp["logits"].abs().max().double_value(&[]);
    eprintln!("qwen2_vl logits max abs diff {diff:.3e} (max |logit| {scale:.2})");
    assert!(diff <= 1e-4, "logits differ from transformers by {diff}");
}

#[test]
fn qwen2vl_image_processor_matches_transformers() {
    let exp = expected();
    let p = Pretrained::load(&checkpoint(), Kind::Float, Device::Cpu).unwrap();
    let images: Vec<_> =
        ["image_a.png", "image_b.png"].iter().map(|f| open_image(&fixtures().join(f)).unwrap()).collect();
    let out = p.processor.process(&images).unwrap();
    assert_eq!(out.grid_thw, grids(&exp["image_grid_thw"]));
    let diff = (&out.pixel_values - &exp["pixel_values"]).abs().max().double_value(&[]);
    eprintln!("qwen2_vl pixel_values max abs diff {diff:.3e}");
    assert!(diff <= 1e-6, "pixel_values differ by {diff}");
}

/// What eval (and the judge's local backend, SFT and GRPO) do with a
/// checkpoint: `Pretrained::load`, render the chat with an image, process the
/// image, expand the pads, tokenise with left padding, cast pixels to the
/// model's dtype, then greedy generation with the KV cache. Every step is
/// compared with transformers.
#[test]
fn qwen2vl_eval_style_generation_through_pretrained_matches_transformers() {
    let exp = expected();
    let meta = meta();
    let Pretrained { model, tokenizer, processor } = Pretrained::load(&checkpoint(), Kind::Float, Device::Cpu).unwrap();
    let images: Vec<_> = meta.prompts.iter().map(|p| open_image(&fixtures().join(&p.image)).unwrap()).collect();
    let vis = processor.process(&images).unwrap();
    let counts = vis.tokens_per_image(processor.merge_size);
    let mut texts = Vec::new();
    for (i, p) in meta.prompts.iter().enumerate() {
        let rendered = tokenizer.render(&[Message::user_with_images(1, &p.question)], true).unwrap();
        texts.push(ChatTokenizer::expand_image_pads(&rendered, &counts[i..i + 1]).unwrap());
    }
    assert_eq!(texts, meta.texts);
    let enc = tokenizer.encode_batch(&texts).unwrap();
    assert!(enc.input_ids.equal(&exp["input_ids"]), "input_ids differ from transformers");
    assert!(enc.attention_mask.equal(&exp["attention_mask"]));

    let pixel_values = vis.pixel_values.to_device(model.device).to_kind(model.kind);
    let batch = Batch {
        input_ids: &enc.input_ids,
        attention_mask: &enc.attention_mask,
        pixel_values: Some(&pixel_values),
        image_grid_thw: &vis.grid_thw,
    };
    let cfg = GenerationConfig {
        max_new_tokens: meta.max_new_tokens,
        eos_token_ids: model.config.eos_token_id.clone(),
        stop_strings: vec![],
        ..Default::default()
    };
    let out = generate(&model, Some(&tokenizer), &batch, &cfg).unwrap();
    let got: Vec<Vec<i64>> = out.iter().map(|c| c.token_ids.clone()).collect();
    assert_eq!(got, meta.greedy_tokens);
    assert!(out.iter().all(|c| c.logprobs.len() == c.token_ids.len() && c.logprobs.iter().all(|&l| l <= 0.0)));
}

/// A decode step with the KV cache equals a full forward over the longer
/// sequence (cache, masks and Qwen2-VL's mRoPE deltas together).
#[test]
fn qwen2vl_cached_decode_matches_full_forward() {
    let exp = expected();
    let model = Qwen25Vl::load(&checkpoint(), Kind::Float, Device::Cpu).unwrap();
    let grid = grids(&exp["image_grid_thw"]);
    let (ids, mask, pv) = (&exp["input_ids"], &exp["attention_mask"], &exp["pixel_values"]);
    let batch = Batch { input_ids: ids, attention_mask: mask, pixel_values: Some(pv), image_grid_thw: &grid };
    let next = Tensor::from_slice(&[7i64, 9]);
    let step = tch::no_grad(|| {
        let (_, mut state) = model.prefill(&batch, true).unwrap();
        model.decode_step(&next, &mut state)
    });
    let ids2 = Tensor::cat(&[ids, &next.view([2, 1])], 1);
    let mask2 = Tensor::cat(&[mask, &Tensor::ones([2, 1], (Kind::Int64, Device::Cpu))], 1);
    let batch2 = Batch { input_ids: &ids2, attention_mask: &mask2, pixel_values: Some(pv), image_grid_thw: &grid };
    let full = tch::no_grad(|| model.forward(&batch2)).unwrap();
    let diff = (&step - full.select(1, -1)).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "cached decode differs from the full forward by {diff}");
}

/// A Rust-saved Qwen2-VL checkpoint keeps HF's names and config and loads
/// back to the same logits. (That transformers loads it too is checked with
/// `tools/qwen_parity.py check-rust-checkpoint`, which needs Python; CI
/// has none, see stages/vlm/README.md.)
#[test]
fn qwen2vl_rust_saved_checkpoint_round_trips_with_hf_names() {
    let exp = expected();
    let model = Qwen25Vl::load(&checkpoint(), Kind::Float, Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path(), Kind::Float, 0).unwrap();
    // Names and config as transformers 4.57 writes them.
    let hf = |dir: &Path| -> Vec<String> {
        let index: serde_json::Value = match std::fs::read_to_string(dir.join("model.safetensors.index.json")) {
            Ok(text) => serde_json::from_str(&text).unwrap(),
            Err(_) => {
                let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
                let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                let names: serde_json::Map<_, _> =
                    st.names().into_iter().map(|n| (n.to_string(), serde_json::Value::Null)).collect();
                serde_json::json!({ "weight_map": names })
            }
        };
        let mut names: Vec<String> = index["weight_map"].as_object().unwrap().keys().cloned().collect();
        names.sort();
        names
    };
    // transformers 4.57 saves the legacy names (`model.layers.*`, `visual.*`)
    // and loads both layouts; ours are its module paths (`model.language_model.*`,
    // `model.visual.*`), the same names after its load-time renaming.
    let (ours, theirs) = (hf(dir.path()), hf(&checkpoint()));
    let mut theirs: Vec<String> = theirs.iter().map(|n| normalize_name(n)).collect();
    theirs.sort();
    assert_eq!(ours, theirs, "saved parameter names differ from transformers'");
    assert!(ours.contains(&"model.visual.blocks.0.mlp.fc1.weight".to_string()));
    assert!(ours.contains(&"model.visual.merger.ln_q.bias".to_string()));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen2_vl");
    assert_eq!(config["vision_config"]["embed_dim"], 32);

    for f in ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"] {
        std::fs::copy(checkpoint().join(f), dir.path().join(f)).unwrap();
    }
    let reloaded = Pretrained::load(dir.path(), Kind::Float, Device::Cpu).unwrap().model;
    let (a, b) = (fixture_logits(&model, &exp), fixture_logits(&reloaded, &exp));
    assert!(a.equal(&b), "reloaded Rust-saved checkpoint gives different logits");
}

/// Training runs through the Qwen2-VL tower: gradients reach exactly the
/// selected parameters (its LayerNorm/QuickGELU blocks and merger included).
#[test]
fn qwen2vl_gradients_flow_to_selected_vision_parameters_only() {
    let exp = expected();
    let model = Qwen25Vl::load(&checkpoint(), Kind::Float, Device::Cpu).unwrap();
    let selected = model.set_trainable(r"^model\.visual\.(blocks\.0\.(norm1|mlp\.fc1)|merger\.ln_q)\.").unwrap();
    assert_eq!(selected.len(), 6, "{selected:?}");
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

/// A checkpoint of any other architecture is refused by name, listing the
/// supported ones (before any weight is read).
#[test]
fn other_architectures_are_a_clear_error_naming_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "config.json"] {
        std::fs::copy(checkpoint().join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for other in ["llava", "qwen3_vl", "qwen2_vl_text"] {
        raw["model_type"] = other.into();
        std::fs::write(&path, raw.to_string()).unwrap();
        let e = match Pretrained::load(dir.path(), Kind::Float, Device::Cpu) {
            Ok(_) => panic!("{other} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(&path.display().to_string()) && e.contains("`model_type`"), "{e}");
        assert!(e.contains(&format!("{other:?}")), "names the model_type: {e}");
        assert!(e.contains(r#"supported: "qwen2_5_vl", "qwen2", "qwen2_vl""#), "names the supported ones: {e}");
    }
}
