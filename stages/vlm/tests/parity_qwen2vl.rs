//! Parity of a Qwen2-VL checkpoint (`model_type = "qwen2_vl"`, the
//! architecture of MedVLM-R1 and Med-R1) with HF transformers 4.57.6
//! `Qwen2VLForConditionalGeneration`, on fixtures from
//! `tools/qwen_parity.py generate-qwen2vl` (tiny random model: LayerNorm +
//! QuickGELU vision blocks, full attention, LayerNorm merger, untied
//! lm_head; two non-square images of different sizes, left padding).
//! Same checks and tolerances as the Qwen2.5-VL parity (`parity.rs`).

mod support;

use std::path::Path;

use stages_vlm::checkpoint::normalize_name;
use stages_vlm::processor::open_image;
use stages_vlm::{ModelType, Pretrained, Qwen25Vl, VisionTower};
use support::{
    Fixture, assert_gradients_reach_only, assert_greedy_generation_matches, cached_decode_vs_full_forward,
    fixture_logits, grids, max_abs_diff_on_mask,
};
use tch::{Device, Kind};

fn fixture() -> Fixture {
    Fixture::named("parity_qwen2vl")
}

fn checkpoint() -> std::path::PathBuf {
    fixture().checkpoint()
}

#[test]
fn qwen2vl_prefill_logits_match_transformers() {
    let exp = fixture().expected();
    assert_eq!(fixture().meta().model_type.as_deref(), Some("qwen2_vl"));
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
    let exp = fixture().expected();
    let p = Pretrained::load(&checkpoint(), Kind::Float, Device::Cpu).unwrap();
    let images: Vec<_> =
        ["image_a.png", "image_b.png"].iter().map(|f| open_image(&fixture().file(f)).unwrap()).collect();
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
    let Pretrained { model, tokenizer, processor } = Pretrained::load(&checkpoint(), Kind::Float, Device::Cpu).unwrap();
    assert_greedy_generation_matches(&fixture(), &model, &tokenizer, &processor);
}

/// A decode step with the KV cache equals a full forward over the longer
/// sequence (cache, masks and Qwen2-VL's mRoPE deltas together).
#[test]
fn qwen2vl_cached_decode_matches_full_forward() {
    let exp = fixture().expected();
    let model = Qwen25Vl::load(&checkpoint(), Kind::Float, Device::Cpu).unwrap();
    let diff = cached_decode_vs_full_forward(&model, &exp);
    assert!(diff < 1e-4, "cached decode differs from the full forward by {diff}");
}

/// A Rust-saved Qwen2-VL checkpoint keeps HF's names and config and loads
/// back to the same logits. (That transformers loads it too is checked with
/// `tools/qwen_parity.py check-rust-checkpoint`, which needs Python; CI
/// has none, see stages/vlm/README.md.)
#[test]
fn qwen2vl_rust_saved_checkpoint_round_trips_with_hf_names() {
    let exp = fixture().expected();
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
    let exp = fixture().expected();
    let model = Qwen25Vl::load(&checkpoint(), Kind::Float, Device::Cpu).unwrap();
    let selected = model.set_trainable(r"^model\.visual\.(blocks\.0\.(norm1|mlp\.fc1)|merger\.ln_q)\.").unwrap();
    assert_eq!(selected.len(), 6, "{selected:?}");
    assert_gradients_reach_only(&model, &selected, &exp);
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
