//! Predicted memory of `eval` per process: the weights, generation (KV
//! cache of `batch_size` prompts of prompt + `max_new_tokens` tokens, the
//! prefill's largest layer, a step's logits) and the split read whole
//! (formulas in `stages_vlm::memory`).

use std::path::Path;

use stage_api::{DeviceRequest, MemoryEstimate, MemoryPool, MemoryPrediction, MemoryTerm, PlanView};
use stages_vlm::memory::plan::{ModelFacts, QUESTION_CHARS, add_cpu_allocator_retention, runtime_term};
use stages_vlm::memory::{Levers, ParamTable, Precision, generation, image_tokens, prompt_text_tokens};

/// What the prediction reads of `eval`'s params (`EvalParams::memory_settings`).
#[derive(Debug, Clone, Copy)]
pub struct EvalSettings<'a> {
    pub dtype: &'a str,
    /// Prompts per generate call (`batch_size`, at most `limit`).
    pub batch: u64,
    pub max_new_tokens: u64,
    /// Characters of the prompt template (and any assistant prefill).
    pub template_chars: u64,
}

/// `StageKind::memory` of `eval`.
pub fn eval_memory(p: &EvalSettings, view: &PlanView) -> MemoryEstimate {
    let dir: &Path = match view.inputs.path("model") {
        Ok(d) => d,
        Err(pending) => return MemoryEstimate::Unknown { reason: pending.to_string() },
    };
    let cuda = view.device == DeviceRequest::Cuda;
    let Some(precision) = Precision::from_dtype(p.dtype, cuda) else {
        return MemoryEstimate::Unknown { reason: format!("unknown dtype {:?}", p.dtype) };
    };
    let model = match ModelFacts::read(dir) {
        Ok(m) => m,
        Err(e) => return MemoryEstimate::Unknown { reason: e },
    };
    let bound = view.inputs.facts("data").get(stage_api::plan::facts::MAX_IMAGE_PIXELS);
    let (tokens, patches) = match &model.config.vision {
        Some(_) => image_tokens(bound, model.max_pixels, model.patch_size, model.merge_size),
        None => (0, 0),
    };
    let prompt = prompt_text_tokens(p.template_chars, QUESTION_CHARS) + if tokens > 0 { tokens + 2 } else { 0 };
    let rows = p.batch.max(1);
    let s = precision.bytes();
    let psi = ParamTable::of(&model.config).total();
    let levers = Levers {
        generation_batch: Some("batch_size".into()),
        generation_length: Some("max_new_tokens".into()),
        ..Default::default()
    };
    let mut rollout = generation(&model.config, precision, rows, 1, prompt, p.max_new_tokens, &levers);
    rollout.terms.push(
        MemoryTerm::new(
            "batch inputs",
            rows * patches * model.patch_dim() * (4 + s),
            format!("pixel values of {rows} images ({patches} patches, f32 and {})", precision.name()),
        )
        .with_fix("batch_size"),
    );
    let device = MemoryPool {
        resident: vec![MemoryTerm::new("weights", psi * s, format!("Ψ {psi} × {s} B ({})", precision.name()))],
        phases: vec![rollout],
    };
    let mut host = MemoryPool { resident: vec![runtime_term(cuda)], phases: vec![] };
    let mut notes = vec![format!(
        "{rows} prompts per batch of ≤ {prompt} tokens ({tokens} image tokens, images ≤ {} px) + {} new tokens",
        bound.unwrap_or(model.max_pixels).min(model.max_pixels),
        p.max_new_tokens
    )];
    match view.inputs.published("data").and_then(|d| stages_task::dataset::split_size(d).ok()) {
        Some(d) => host.resident.push(MemoryTerm::new(
            "evaluation split",
            d.bytes,
            format!("{} rows read whole (their Parquet bytes)", d.rows),
        )),
        None => notes.push("the split is not published yet: its rows (host memory) are not counted".into()),
    }
    MemoryEstimate::Predicted(if cuda {
        MemoryPrediction::on_gpu(device, host, notes)
    } else {
        let mut p = MemoryPrediction::on_cpu(device, host, notes);
        add_cpu_allocator_retention(&mut p);
        p
    })
}
