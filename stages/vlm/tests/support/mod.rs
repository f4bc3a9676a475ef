//! What the parity tests of both architectures share: reading a fixture
//! written by `tools/qwen_parity.py` (checkpoint, expected tensors and
//! metadata) and the checks that are the same for Qwen2.5-VL and Qwen2-VL.
#![allow(dead_code)] // each test binary uses a part

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use stages_vlm::chat::{ChatTokenizer, Message};
use stages_vlm::generate::{GenerationConfig, generate};
use stages_vlm::processor::{ImageProcessor, open_image};
use stages_vlm::{Batch, Qwen25Vl};
use tch::{Device, Kind, Tensor};

/// One fixture directory under `tests/fixtures/`.
pub struct Fixture(pub PathBuf);

#[derive(serde::Deserialize)]
pub struct Meta {
    #[serde(default)]
    pub model_type: Option<String>,
    pub texts: Vec<String>,
    pub greedy_tokens: Vec<Vec<i64>>,
    pub max_new_tokens: usize,
    pub prompts: Vec<Prompt>,
}

#[derive(serde::Deserialize)]
pub struct Prompt {
    pub image: String,
    pub question: String,
}

impl Fixture {
    pub fn named(name: &str) -> Self {
        Self(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name))
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn checkpoint(&self) -> PathBuf {
        self.0.join("checkpoint")
    }

    pub fn expected(&self) -> HashMap<String, Tensor> {
        Tensor::read_safetensors(self.0.join("expected.safetensors")).unwrap().into_iter().collect()
    }

    pub fn meta(&self) -> Meta {
        serde_json::from_str(&std::fs::read_to_string(self.0.join("expected.json")).unwrap()).unwrap()
    }
}

pub fn grids(t: &Tensor) -> Vec<[i64; 3]> {
    let rows: Vec<Vec<i64>> = Vec::try_from(&t.to_kind(Kind::Int64)).unwrap();
    rows.iter().map(|r| [r[0], r[1], r[2]]).collect()
}

pub fn max_abs_diff_on_mask(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let m = mask.ne(0).unsqueeze(-1).expand_as(a);
    (a - b).abs().masked_select(&m).max().double_value(&[])
}

/// The model's logits on the fixture's own inputs (ids, mask, pixels, grids).
pub fn fixture_logits(model: &Qwen25Vl, exp: &HashMap<String, Tensor>) -> Tensor {
    let grid = grids(&exp["image_grid_thw"]);
    let batch = Batch {
        input_ids: &exp["input_ids"],
        attention_mask: &exp["attention_mask"],
        pixel_values: Some(&exp["pixel_values"]),
        image_grid_thw: &grid,
    };
    tch::no_grad(|| model.forward(&batch)).unwrap()
}

/// From raw images and questions to greedy tokens, every step compared with
/// transformers: processor, chat template, image-pad expansion, left-padded
/// tokenisation, greedy generation with the KV cache.
pub fn assert_greedy_generation_matches(fx: &Fixture, model: &Qwen25Vl, tok: &ChatTokenizer, proc: &ImageProcessor) {
    let exp = fx.expected();
    let meta = fx.meta();
    let images: Vec<_> = meta.prompts.iter().map(|p| open_image(&fx.file(&p.image)).unwrap()).collect();
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

    // As eval does: pixels in the model's dtype and on its device.
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
    let out = generate(model, Some(tok), &batch, &cfg).unwrap();
    let got: Vec<Vec<i64>> = out.iter().map(|c| c.token_ids.clone()).collect();
    assert_eq!(got, meta.greedy_tokens);
    assert!(out.iter().all(|c| c.logprobs.len() == c.token_ids.len() && c.logprobs.iter().all(|&l| l <= 0.0)));
}

/// Largest difference between a decode step with the KV cache after the
/// fixture's prefill and a full forward over the longer sequence (cache,
/// masks and mRoPE deltas together).
pub fn cached_decode_vs_full_forward(model: &Qwen25Vl, exp: &HashMap<String, Tensor>) -> f64 {
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
    (&step - full.select(1, -1)).abs().max().double_value(&[])
}

/// Backpropagate a scalar of the fixture's logits; exactly the `selected`
/// parameters get a gradient, and a non-zero one.
pub fn assert_gradients_reach_only(model: &Qwen25Vl, selected: &[String], exp: &HashMap<String, Tensor>) {
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
