//! The per-rank memory table of docs/scaling.md ("Memory per rank"):
//! `recipes/full.toml`'s sft, grpo and eval on Qwen2.5-VL-7B (the committed
//! `tests/fixtures/qwen2_5_vl_7b` config) over 8 ranks, for each ZeRO level
//! and with/without activation checkpointing, against 96, 80 and 141 GiB GPUs.
//!
//!     cargo run --example memory_table
//!
//! The stages' own plan-time lengths are used (image tokens from `render`'s
//! pixel bound, prompt text from characters); `shard` and
//! `gradient_checkpointing` are set here directly for every row (the
//! recipe's own values, once the params exist, are what `plan` uses).

use std::collections::BTreeMap;
use std::path::Path;

use pipeline_engine::recipe::load_recipe;
use stage_api::memory::gib;
use stage_api::plan::facts;
use stage_api::{DeviceRequest, InputSource, MemoryEstimate, PlanFacts, PlanInput, PlanInputs, PlanView};
use stages_eval::eval::EvalParams;
use stages_train::grpo::GrpoParams;
use stages_train::memory::{Where, grpo_prediction, plan_lengths, sft_prediction};
use stages_train::sft::SftParams;
use stages_vlm::memory::plan::ModelFacts;
use stages_vlm::memory::{Precision, Shard};

// The binary's list of kinds (full.toml uses most of them).
#[path = "../src/registry.rs"]
mod registry;
use registry::registry;

fn params<T: serde::de::DeserializeOwned>(recipe: &pipeline_engine::recipe::Recipe, id: &str) -> anyhow::Result<T> {
    let decl = recipe.stage(id).ok_or_else(|| anyhow::anyhow!("full.toml has no stage `{id}`"))?;
    Ok(serde_json::from_value(decl.stage.canonical_params())?)
}

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixture = root.join("tests/fixtures/qwen2_5_vl_7b");
    let recipe = load_recipe(&root.join("recipes/full.toml"), &[], &registry())?;
    let sft: SftParams = params(&recipe, "sft")?;
    let grpo: GrpoParams = params(&recipe, "grpo")?;
    let eval: EvalParams = params(&recipe, "eval")?;
    let render: serde_json::Value = recipe.stage("render").map(|d| d.stage.canonical_params()).unwrap_or_default();
    let bound = render.get("max_pixels").and_then(serde_json::Value::as_u64);

    let model = ModelFacts::read(&fixture).map_err(anyhow::Error::msg)?;
    let mut data_facts = PlanFacts::default();
    if let Some(b) = bound {
        data_facts.set(facts::MAX_IMAGE_PIXELS, b);
    }
    let inputs = PlanInputs::new(BTreeMap::from([
        (
            "model".to_string(),
            vec![PlanInput {
                stage: "base_model".into(),
                source: InputSource::StandIn(fixture.clone()),
                facts: PlanFacts::default(),
            }],
        ),
        (
            "data".to_string(),
            vec![PlanInput { stage: "export".into(), source: InputSource::Pending, facts: data_facts }],
        ),
    ]));
    let ranks = 8;
    let view = PlanView { inputs: &inputs, ranks, device: DeviceRequest::Cuda, recipe_dir: root };
    let gpus = [("H20", 96.0f64), ("H100", 80.0), ("H200", 141.0)];
    let fits = |bytes: u64| -> String {
        gpus.iter()
            .map(|(_, gb)| {
                let share = bytes as f64 / (gb * (1u64 << 30) as f64);
                if share <= 0.9 {
                    "fits".to_string()
                } else if share <= 1.0 {
                    "tight".to_string()
                } else {
                    "**no**".to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!(
        "| stage | shard | checkpointing | GPU peak per rank | peak during | biggest terms | H20 96 | H100 80 | H200 141 |"
    );
    println!("| --- | --- | --- | ---: | --- | --- | --- | --- | --- |");
    let shards = [(Shard::None, "none"), (Shard::Optimizer, "optimizer"), (Shard::Gradients, "gradients")];
    for (stage, is_sft) in [("sft", true), ("grpo", false)] {
        for &(shard, shard_name) in &shards {
            for checkpointing in [false, true] {
                let w = Where { ranks: ranks as u64, cuda: true, data: None, shard, checkpointing };
                let pred = if is_sft {
                    let settings = sft.memory_settings().map_err(anyhow::Error::msg)?;
                    let (len, _) = plan_lengths(&model, &view, sft.prompt, settings.target_tokens);
                    sft_prediction(&settings, &model, Precision::Bf16, len, &w)
                } else {
                    let (len, _) = plan_lengths(&model, &view, grpo.prompt, grpo.max_completion_length as u64);
                    grpo_prediction(
                        &grpo.memory_settings().map_err(anyhow::Error::msg)?,
                        &model,
                        Precision::Bf16,
                        len,
                        &w,
                    )
                }
                .map_err(anyhow::Error::msg)?;
                let Some(pool) = pred.gpu.as_ref() else { anyhow::bail!("a CUDA prediction has a GPU pool") };
                let peak = pool.peak_bytes();
                let mut terms: Vec<_> =
                    pool.resident.iter().chain(pool.peak_phase().map(|p| p.terms.as_slice()).unwrap_or(&[])).collect();
                terms.sort_by_key(|t| std::cmp::Reverse(t.bytes));
                let top: Vec<String> = terms.iter().take(3).map(|t| format!("{} {}", t.name, gib(t.bytes))).collect();
                println!(
                    "| {stage} | {shard_name} | {} | {} | {} | {} | {} |",
                    if checkpointing { "on" } else { "off" },
                    gib(peak),
                    pool.peak_phase().map(|p| p.name.as_str()).unwrap_or("-"),
                    top.join(", "),
                    fits(peak)
                );
            }
        }
    }
    let est = stages_eval::memory::eval_memory(&eval.memory_settings(), &PlanView { ranks: 1, ..view.clone() });
    if let MemoryEstimate::Predicted(p) = est {
        let pool = p.gpu.as_ref().ok_or_else(|| anyhow::anyhow!("eval on CUDA has a GPU pool"))?;
        let peak = pool.peak_bytes();
        println!(
            "| eval (batch {}) | - | - | {} | {} | weights {} | {} |",
            eval.batch_size,
            gib(peak),
            pool.peak_phase().map(|p| p.name.as_str()).unwrap_or("-"),
            gib(pool.resident_bytes()),
            fits(peak)
        );
    }
    Ok(())
}
