//! Predicted memory of `sft` and `grpo` per rank, from the model config the
//! plan can read (`stages_vlm::memory` has the formulas), the params and the
//! executor's ranks: what `pipeline plan` prints and what admission and
//! Slurm ask for.
//!
//! Sequence lengths at plan time are bounds: image tokens from the data's
//! pixel bound (the `render` stage's resize bound reaches us as a plan fact)
//! within the processor's `max_pixels`, prompt text from the template's
//! characters, the completion budget. [`sft_prediction`] and
//! [`grpo_prediction`] take the lengths explicitly, so the memory probe
//! (`examples/memory_probe.rs`) evaluates the same model at the lengths it
//! measured.

use std::path::Path;

use regex::Regex;
use schemars::JsonSchema;
use serde::Serialize;
use stage_api::{DeviceRequest, MemoryEstimate, MemoryPool, MemoryPrediction, MemoryTerm, Phase, PlanOutput, PlanView};
use stages_task::prompt::{NO_THINK_TEMPLATE, PromptVariant, THINK_TEMPLATE};
use stages_vlm::memory::plan as vplan;
use stages_vlm::memory::{
    Levers, Loss, ParamTable, Pass, Precision, Shard, TrainSetup, TrainableSet, generation, image_tokens,
    no_grad_layer, prompt_text_tokens,
};

use crate::trainer::regex_union;

/// Token counts of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lengths {
    /// Prompt tokens: chat framing, text and image tokens.
    pub prompt: u64,
    /// Vision patches of the prompt's image (0 without one).
    pub patches: u64,
    /// SFT: target tokens; GRPO: the completion budget.
    pub completion: u64,
}

/// The ZeRO level and activation checkpointing of a training stage, read
/// from its params by name (`shard`, `gradient_checkpointing`) whichever
/// params type carries them: absent means `"none"` and `false`. The fix
/// hints name a setting only where the params accept it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Parallel {
    pub shard: Shard,
    pub checkpointing: bool,
    /// The params accept `shard`.
    pub has_shard: bool,
    /// The params accept `gradient_checkpointing`.
    pub has_checkpointing: bool,
}

impl Parallel {
    /// From a stage's params (their serialized form and schema).
    pub fn of_params<P: Serialize + JsonSchema>(params: &P) -> Result<Self, String> {
        let value = serde_json::to_value(params).map_err(|e| format!("params: {e}"))?;
        Self::from_json(&value, &stage_api::params::param_names::<P>())
    }

    /// From serialized params and the names the params type accepts.
    pub fn from_json(params: &serde_json::Value, names: &[String]) -> Result<Self, String> {
        use serde_json::Value;
        let shard = match params.get("shard") {
            None | Some(Value::Null) => Shard::None,
            Some(Value::String(v)) => match v.as_str() {
                "none" => Shard::None,
                "optimizer" => Shard::Optimizer,
                "gradients" => Shard::Gradients,
                other => return Err(format!("`shard` = {other:?}: expected \"none\", \"optimizer\" or \"gradients\"")),
            },
            Some(other) => return Err(format!("`shard` = {other}: expected a string")),
        };
        let checkpointing = match params.get("gradient_checkpointing") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(format!("`gradient_checkpointing` = {other}: expected true or false")),
        };
        let has = |n: &str| names.iter().any(|k| k == n);
        Ok(Self { shard, checkpointing, has_shard: has("shard"), has_checkpointing: has("gradient_checkpointing") })
    }
}

/// What an SFT prediction reads of the stage's params (`SftParams::memory_settings`).
#[derive(Debug, Clone, Copy)]
pub struct SftSettings<'a> {
    pub trainable: &'a [String],
    pub dtype: &'a str,
    /// Rows per forward/backward pass.
    pub batch_size: u64,
    /// Passes per optimizer step (a rank encodes a step's rows at once).
    pub grad_accum: u64,
    pub max_shard_mb: u64,
    pub prompt: PromptVariant,
    /// Target tokens per row (estimated at plan time).
    pub target_tokens: u64,
    pub parallel: Parallel,
}

/// What a GRPO prediction reads of the stage's params (`GrpoParams::memory_settings`).
#[derive(Debug, Clone, Copy)]
pub struct GrpoSettings<'a> {
    pub trainable: &'a [String],
    pub dtype: &'a str,
    pub prompts_per_step: u64,
    pub num_generations: u64,
    pub micro_batch_size: u64,
    pub max_completion_length: u64,
    /// β ≠ 0: a frozen reference copy of the trainable tensors.
    pub reference: bool,
    pub max_shard_mb: u64,
    pub prompt: PromptVariant,
    pub parallel: Parallel,
}

/// Where and how a prediction's stage runs.
#[derive(Debug, Clone, Copy)]
pub struct Where {
    pub ranks: u64,
    pub cuda: bool,
    /// Rows and bytes of the training split, when it is published.
    pub data: Option<stages_task::dataset::SplitSize>,
    /// ZeRO level of the optimizer state and gradients.
    pub shard: Shard,
    /// Activation checkpointing.
    pub checkpointing: bool,
}

/// The settings the fix hints may name: only those the params accept (and
/// only a higher ZeRO level than the one set).
fn levers_sft(par: &Parallel) -> Levers {
    Levers {
        micro_batch: Some("batch_size".into()),
        checkpointing: (par.has_checkpointing && !par.checkpointing).then(|| "gradient_checkpointing = true".into()),
        shard_optimizer: (par.has_shard && par.shard == Shard::None).then(|| "shard = \"optimizer\"".into()),
        shard_gradients: (par.has_shard && par.shard != Shard::Gradients).then(|| "shard = \"gradients\"".into()),
        trainable: Some("fewer `trainable` tensors".into()),
        generation_batch: None,
        generation_length: None,
    }
}

fn levers_grpo(par: &Parallel) -> Levers {
    Levers {
        micro_batch: Some("micro_batch_size".into()),
        generation_batch: Some("prompts_per_step (per rank) or num_generations".into()),
        generation_length: Some("max_completion_length".into()),
        ..levers_sft(par)
    }
}

fn trainable_set(table: &ParamTable, patterns: &[String]) -> Result<TrainableSet, String> {
    let union = regex_union(patterns)?;
    let re = Regex::new(&union).map_err(|e| e.to_string())?;
    Ok(table.select(&re))
}

/// Host memory besides the model: the process and its data.
fn host_pool(w: &Where, data_rows_extra: Option<(&str, u64, String)>, save: u64) -> (MemoryPool, Vec<String>) {
    let mut pool = MemoryPool::default();
    let mut notes = Vec::new();
    pool.resident.push(vplan::runtime_term(w.cuda));
    match &w.data {
        Some(d) => {
            pool.resident.push(MemoryTerm::new(
                "training split",
                d.bytes,
                format!("{} rows read whole (their Parquet bytes)", d.rows),
            ));
            if let Some((name, bytes, formula)) = data_rows_extra {
                pool.resident.push(MemoryTerm::new(name, bytes, formula));
            }
        }
        None => notes.push("the training split is not published yet: its rows (host memory) are not counted".into()),
    }
    pool.phases.push(Phase::new(
        "saving the model",
        vec![MemoryTerm::new("checkpoint shard", save, "one safetensors shard staged in host memory".to_string())],
    ));
    (pool, notes)
}

/// What the vlm arithmetic needs of a training stage: the model, its
/// trainable part and where/how it trains.
fn train_setup<'a>(
    model: &'a vplan::ModelFacts,
    table: &'a ParamTable,
    trainable: &'a TrainableSet,
    precision: Precision,
    w: &Where,
) -> TrainSetup<'a> {
    TrainSetup {
        config: &model.config,
        table,
        trainable,
        precision,
        cuda: w.cuda,
        ranks: w.ranks,
        shard: w.shard,
        checkpointing: w.checkpointing,
    }
}

/// The SFT prediction at given lengths.
pub fn sft_prediction(
    p: &SftSettings,
    model: &vplan::ModelFacts,
    precision: Precision,
    lengths: Lengths,
    w: &Where,
) -> Result<MemoryPrediction, String> {
    let table = ParamTable::of(&model.config);
    let trainable = trainable_set(&table, p.trainable)?;
    let setup = train_setup(model, &table, &trainable, precision, w);
    let levers = levers_sft(&Parallel { shard: w.shard, checkpointing: w.checkpointing, ..p.parallel });
    let pass = Pass { batch: p.batch_size, seq: lengths.prompt + lengths.completion, patches: lengths.patches };
    let device = MemoryPool {
        resident: setup.model_states(false, &levers),
        phases: vec![setup.training_pass(&pass, Loss::CrossEntropy, &levers), setup.optimizer_step()],
    };
    // A rank encodes its rows of one step when the step starts (pixel values
    // in f32) and drops them before the next.
    let encoded = w.data.map(|d| {
        let per = lengths.patches * model.patch_dim() * 4 + (lengths.prompt + lengths.completion) * 16;
        let rows = d.rows.min(p.batch_size * p.grad_accum.max(1));
        (
            "encoded examples (one step)",
            rows * per,
            format!(
                "{rows} rows (batch_size × grad_accum) × ({} patches × {} × 4 B + ids, labels)",
                lengths.patches,
                model.patch_dim()
            ),
        )
    });
    let save = vplan::save_shard_bytes(table.total() * precision.bytes(), p.max_shard_mb);
    let (host, mut notes) = host_pool(w, encoded, save);
    notes.insert(
        0,
        format!(
            "rows of {} tokens ({} prompt incl. image, {} target), {} per micro-batch, {} trainable of {} parameters",
            pass.seq,
            lengths.prompt,
            lengths.completion,
            p.batch_size,
            trainable.params,
            table.total()
        ),
    );
    Ok(predict(w.cuda, device, host, notes))
}

/// The GRPO prediction at given lengths.
pub fn grpo_prediction(
    p: &GrpoSettings,
    model: &vplan::ModelFacts,
    precision: Precision,
    lengths: Lengths,
    w: &Where,
) -> Result<MemoryPrediction, String> {
    let table = ParamTable::of(&model.config);
    let trainable = trainable_set(&table, p.trainable)?;
    let setup = train_setup(model, &table, &trainable, precision, w);
    let levers = levers_grpo(&Parallel { shard: w.shard, checkpointing: w.checkpointing, ..p.parallel });
    let (s, vocab) = (precision.bytes(), model.config.text.vocab_size.max(0) as u64);
    let prompts = p.prompts_per_step.div_ceil(w.ranks.max(1));
    let g = p.num_generations;
    let rows = prompts * g;
    let c = lengths.completion;
    let mb = p.micro_batch_size.min(rows).max(1);
    let pass = Pass { batch: mb, seq: lengths.prompt + c, patches: lengths.patches };
    let mut train = setup.training_pass(&pass, Loss::TokenLogps { completion: c }, &levers);
    // The round's micro-batches stay on the device while it trains: each
    // completion carries its prompt's pixel values.
    let round = rows * (lengths.patches * model.patch_dim() * s + (lengths.prompt + c) * 16 + c * 16);
    train.terms.push(MemoryTerm::new(
        "rollout tensors",
        round,
        format!("{rows} completions' inputs, masks, log-probs"),
    ));
    let reference = Phase::new(
        "reference log-probs",
        vec![MemoryTerm::new(
            "no-grad forward",
            no_grad_layer(&model.config, precision, mb, pass.seq)
                + mb * (c + 1) * vocab * s
                + 4 * mb * c * vocab * 4
                + round,
            format!("largest layer + log-probs over B {mb} × C {c} × V {vocab}"),
        )],
    );
    let rollout = generation(&model.config, precision, prompts, g, lengths.prompt, c, &levers);
    let device = MemoryPool {
        resident: setup.model_states(p.reference, &levers),
        phases: vec![rollout, reference, train, setup.optimizer_step()],
    };
    let save = vplan::save_shard_bytes(table.total() * precision.bytes(), p.max_shard_mb);
    let (host, mut notes) = host_pool(w, None, save);
    notes.insert(
        0,
        format!(
            "{prompts} prompts × G {g} per rank, prompt {} tokens incl. image, completion ≤ {c}, micro-batch {mb}, {} trainable of {} parameters",
            lengths.prompt,
            trainable.params,
            table.total()
        ),
    );
    Ok(predict(w.cuda, device, host, notes))
}

fn predict(cuda: bool, device: MemoryPool, host: MemoryPool, notes: Vec<String>) -> MemoryPrediction {
    if cuda {
        MemoryPrediction::on_gpu(device, host, notes)
    } else {
        let mut p = MemoryPrediction::on_cpu(device, host, notes);
        vplan::add_cpu_allocator_retention(&mut p);
        p
    }
}

fn template_chars(variant: PromptVariant) -> u64 {
    let t = match variant {
        PromptVariant::NoThink => NO_THINK_TEMPLATE,
        PromptVariant::Think | PromptVariant::CotForcing => THINK_TEMPLATE,
        PromptVariant::Dataset => "",
    };
    t.len() as u64
}

/// Plan-time lengths: the prompt's bound (see the module docs) and
/// `completion`, with a note saying where they come from.
pub fn plan_lengths(
    model: &vplan::ModelFacts,
    view: &PlanView,
    variant: PromptVariant,
    completion: u64,
) -> (Lengths, String) {
    let bound = view.inputs.facts("data").get(stage_api::plan::facts::MAX_IMAGE_PIXELS);
    let (tokens, patches) = match &model.config.vision {
        Some(_) => image_tokens(bound, model.max_pixels, model.patch_size, model.merge_size),
        None => (0, 0),
    };
    let text = prompt_text_tokens(template_chars(variant), vplan::QUESTION_CHARS);
    let image = if tokens > 0 { tokens + 2 } else { 0 };
    let source = match bound {
        Some(b) if model.config.vision.is_some() => format!("images ≤ {b} px (data bound) → {tokens} image tokens"),
        _ if model.config.vision.is_some() => {
            format!("images ≤ the processor's max_pixels {} → {tokens} image tokens", model.max_pixels)
        }
        _ => "no images".to_string(),
    };
    let note = format!("lengths are bounds: {source}; prompt text ≈ {text} tokens (estimated from characters)");
    (Lengths { prompt: text + image, patches, completion }, note)
}

pub fn plan_where(view: &PlanView, parallel: &Parallel) -> Where {
    let data = view.inputs.published("data").and_then(|d| stages_task::dataset::split_size(d).ok());
    Where {
        ranks: view.ranks as u64,
        cuda: view.device == DeviceRequest::Cuda,
        data,
        shard: parallel.shard,
        checkpointing: parallel.checkpointing,
    }
}

/// `StageKind::memory` of `sft`.
pub fn sft_memory(p: Result<SftSettings, String>, view: &PlanView) -> MemoryEstimate {
    let p = match p {
        Ok(p) => p,
        Err(reason) => return MemoryEstimate::Unknown { reason },
    };
    let p = &p;
    estimate(view, p.dtype, |model, precision| {
        let (lengths, note) = plan_lengths(model, view, p.prompt, p.target_tokens);
        let mut pred = sft_prediction(p, model, precision, lengths, &plan_where(view, &p.parallel))?;
        pred.notes.push(note);
        Ok(pred)
    })
}

/// `StageKind::memory` of `grpo`.
pub fn grpo_memory(p: Result<GrpoSettings, String>, view: &PlanView) -> MemoryEstimate {
    let p = match p {
        Ok(p) => p,
        Err(reason) => return MemoryEstimate::Unknown { reason },
    };
    let p = &p;
    estimate(view, p.dtype, |model, precision| {
        let (lengths, note) = plan_lengths(model, view, p.prompt, p.max_completion_length);
        let mut pred = grpo_prediction(p, model, precision, lengths, &plan_where(view, &p.parallel))?;
        pred.notes.push(note);
        Ok(pred)
    })
}

/// A trained checkpoint keeps its input's config, tokenizer, processor and
/// tensor shapes: the input model stands in for the output before it exists.
pub fn checkpoint_stand_in(view: &PlanView) -> PlanOutput {
    PlanOutput { stand_in: view.inputs.path("model").ok().map(Path::to_path_buf), facts: view.inputs.all_facts() }
}

fn estimate(
    view: &PlanView,
    dtype: &str,
    f: impl FnOnce(&vplan::ModelFacts, Precision) -> Result<MemoryPrediction, String>,
) -> MemoryEstimate {
    let dir: &Path = match view.inputs.path("model") {
        Ok(d) => d,
        Err(pending) => return MemoryEstimate::Unknown { reason: pending.to_string() },
    };
    let cuda = view.device == DeviceRequest::Cuda;
    let Some(precision) = Precision::from_dtype(dtype, cuda) else {
        return MemoryEstimate::Unknown { reason: format!("unknown dtype {dtype:?}") };
    };
    match vplan::ModelFacts::read(dir).and_then(|m| f(&m, precision)) {
        Ok(p) => MemoryEstimate::Predicted(p),
        Err(e) => MemoryEstimate::Unknown { reason: e },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::sft::SftParams;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parallel_settings_are_read_by_name_with_defaults_when_absent() {
        let both = names(&["shard", "gradient_checkpointing", "lr"]);
        let none = Parallel::from_json(&json!({"lr": 1e-5}), &both).unwrap();
        assert_eq!((none.shard, none.checkpointing), (Shard::None, false));
        assert!(none.has_shard && none.has_checkpointing);
        let set = Parallel::from_json(&json!({"shard": "gradients", "gradient_checkpointing": true}), &both).unwrap();
        assert_eq!((set.shard, set.checkpointing), (Shard::Gradients, true));
        let zero1 = Parallel::from_json(&json!({"shard": "optimizer"}), &both).unwrap();
        assert_eq!(zero1.shard, Shard::Optimizer);
        let err = Parallel::from_json(&json!({"shard": "zero3"}), &both).unwrap_err();
        assert!(err.contains("`shard`") && err.contains("\"optimizer\""), "{err}");
        let err = Parallel::from_json(&json!({"gradient_checkpointing": "yes"}), &both).unwrap_err();
        assert!(err.contains("`gradient_checkpointing`"), "{err}");
        // Params without the settings: nothing to name in a fix hint.
        let old = Parallel::from_json(&json!({}), &names(&["lr"])).unwrap();
        assert!(!old.has_shard && !old.has_checkpointing);
        // The real params type: its defaults are the unsharded, uncheckpointed run.
        let sft = Parallel::of_params(&SftParams::default()).unwrap();
        assert_eq!((sft.shard, sft.checkpointing), (Shard::None, false));
        let accepts = stage_api::params::param_names::<SftParams>();
        assert_eq!(sft.has_shard, accepts.iter().any(|n| n == "shard"));
    }

    fn settings<'a>(trainable: &'a [String], parallel: Parallel) -> SftSettings<'a> {
        SftSettings {
            trainable,
            dtype: "auto",
            batch_size: 4,
            grad_accum: 4,
            max_shard_mb: 2048,
            prompt: PromptVariant::NoThink,
            target_tokens: 8,
            parallel,
        }
    }

    fn term<'a>(pool: &'a MemoryPool, name: &str) -> Option<&'a MemoryTerm> {
        let phases = pool.phases.iter().flat_map(|p| p.terms.iter());
        pool.resident.iter().chain(phases).find(|t| t.name == name)
    }

    /// The 7B config on 4 ranks: the ZeRO level and checkpointing move the
    /// terms, and the fix hints name a setting only where the params have it.
    #[test]
    fn shard_and_checkpointing_move_the_terms_and_the_hints() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2_5_vl_7b");
        let model = vplan::ModelFacts::read(&dir).unwrap();
        let trainable = vec![r"^model\.language_model\.layers\.\d+\.mlp\.".to_string()];
        let len = Lengths { prompt: 600, patches: 2048, completion: 8 };
        let at = |shard, checkpointing| Where { ranks: 4, cuda: true, data: None, shard, checkpointing };
        let gpu = |par: Parallel, w: Where| {
            sft_prediction(&settings(&trainable, par), &model, Precision::Bf16, len, &w).unwrap().gpu.unwrap()
        };
        let with = Parallel { has_shard: true, has_checkpointing: true, ..Parallel::default() };
        let plain = gpu(with, at(Shard::None, false));
        let moments = term(&plain, "optimizer moments").unwrap();
        assert_eq!(moments.bytes, 5_703_204_864 * 8);
        assert_eq!(moments.fix.as_deref(), Some("shard = \"optimizer\""));
        let act = term(&plain, "activations").unwrap();
        assert_eq!(act.fix.as_deref(), Some("gradient_checkpointing = true"));
        // Without the params, the same terms point at what exists.
        let old = gpu(Parallel::default(), at(Shard::None, false));
        assert_eq!(old.peak_bytes(), plain.peak_bytes());
        assert_eq!(term(&old, "optimizer moments").unwrap().fix.as_deref(), Some("fewer `trainable` tensors"));
        assert_eq!(term(&old, "activations").unwrap().fix.as_deref(), Some("batch_size"));

        let zero1 = gpu(with, at(Shard::Optimizer, false));
        assert_eq!(term(&zero1, "optimizer moments").unwrap().bytes, 5_703_204_864 / 4 * 8);
        assert_eq!(term(&zero1, "gradients").unwrap().fix.as_deref(), Some("shard = \"gradients\""));
        assert!(zero1.peak_bytes() < plain.peak_bytes());
        let ckpt = gpu(with, at(Shard::Optimizer, true));
        assert!(term(&ckpt, "activations").unwrap().bytes < term(&zero1, "activations").unwrap().bytes / 4);
    }
}
