//! Supervised fine-tuning (`kind = "sft"`): the paper's first training stage.
//!
//! Each item becomes one chat turn: the user message holds the image and the
//! question (rebuilt for the chosen prompt variant), the assistant message the
//! target (`<answer> X </answer>`, optionally after a short `<think>` text).
//! The loss is the token cross-entropy on the assistant tokens only: prompt
//! and image tokens get label -100 (the Med-R1 lineage pitfall of unmasked
//! prompts is avoided). Only parameters matching `trainable` get gradients
//! and AdamW state (paper default: the language model's MLP layers).
//!
//! One optimizer step sees a global batch of `batch_size × grad_accum ×
//! ranks` items and minimises the mean token loss over all of its assistant
//! tokens (as HF Trainer with token-averaged accumulation): each micro-batch
//! contributes its summed token loss divided by the step's token count. With
//! several data-parallel ranks every rank takes a contiguous shard of the
//! global batch and the gradients are summed across ranks, so the step is the
//! single-process step up to float rounding.
//!
//! The loop (ranks, AdamW, resume, clipping, metrics, checkpoints, the
//! output) is [`trainer::run`]; this module supplies the examples and the
//! loss ([`SftSteps`]).

use anyhow::{Context as _, bail};
use rand::seq::SliceRandom as _;
use serde::{Deserialize, Serialize};
use stage_api::schemars::{self, JsonSchema};
use stage_api::{
    InputSpec, MemoryEstimate, OutputSpec, ParamError, PlanOutput, PlanView, Resources, StageContext, StageKind,
};
use stages_task::dataset::{VqaRow, read_split};
use stages_task::prompt::PromptVariant;
use stages_vlm::chat::ChatTokenizer;
use stages_vlm::device::DeviceChoice;
use stages_vlm::processor::ImageProcessor;
use stages_vlm::{Batch, LogitsSpan, Qwen25Vl};
use tch::{Kind, Reduction, Tensor};

use crate::dist::{self, Collective};
use crate::memory::{Parallel, SftSettings};
use crate::optim::{AdamWConfig, LrSchedule};
use crate::prompt::PromptEncoder;
use crate::trainer::{self, Algorithm as _, LoopSettings, Metrics, Position, Setup, ShardLevel, regex_union};

/// Label of tokens that carry no loss (prompt, image, padding).
pub const IGNORE: i64 = -100;

/// What the assistant turn is trained to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `<answer> X </answer>` only.
    Answer,
    /// `<think>{think_text}</think>\n<answer> X </answer>` (teaches the GRPO format).
    ThinkAnswer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SftParams {
    /// Passes over the training split (paper: 2).
    // The paper runs 2.
    #[schemars(range(min = 1, max = 10_000))]
    pub epochs: usize,
    /// Peak learning rate (paper: 1e-5).
    pub lr: f64,
    /// Fraction of the optimizer steps spent warming up linearly (paper: 0.1); cosine decay after.
    pub warmup_ratio: f64,
    /// AdamW betas.
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Items per forward pass (per rank).
    #[schemars(range(min = 1, max = 4096))]
    pub batch_size: usize,
    /// Forward passes per optimizer step (global batch = batch_size × this × ranks).
    #[schemars(range(min = 1, max = 4096))]
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    /// Regexes over HF parameter names; a parameter trains if any matches
    /// (paper: only the language model's MLP layers).
    pub trainable: Vec<String>,
    /// Assistant target: `answer` or `think_answer`.
    pub target: Target,
    /// Reasoning text of the `think_answer` target; `{class_name}` is replaced.
    pub think_text: String,
    /// Prompt variant of the user turn (`think`, `no_think` or `dataset`).
    pub prompt: PromptVariant,
    /// Stop after this many optimizer steps (quick looks); all epochs when absent.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_steps: Option<usize>,
    /// Log a metrics row every this many optimizer steps.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub log_every: usize,
    /// `cpu`, `auto` (CUDA when present) or `cuda`.
    pub device: DeviceChoice,
    /// `auto` (float32 on CPU, bfloat16 on CUDA), `float32`, `bfloat16`.
    pub dtype: String,
    /// Largest safetensors shard of the saved checkpoint, in MiB.
    // Up to 1 TiB per shard; bytes = MiB x 2^20 must not overflow.
    #[schemars(range(min = 1, max = 1_048_576))]
    pub max_shard_mb: u64,
    /// Save a resumable checkpoint (trainable weights, AdamW state, step) to
    /// the engine's resume directory every this many optimizer steps; a
    /// killed run continues from the newest (0 = never).
    #[schemars(range(max = 1_000_000))]
    pub checkpoint_every: usize,
    /// Activation checkpointing: keep only each decoder layer's and vision
    /// block's input during the forward pass and recompute the block in the
    /// backward pass. Much less activation memory for about one more forward
    /// pass per step; the gradients are the same.
    // Left out of the params JSON at its default, so cache keys do not move
    // (the gradients are the same either way; the schema still documents
    // the default).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schemars(extend("default" = false))]
    pub gradient_checkpointing: bool,
    /// Training state each data-parallel rank keeps: `none` (all of it, as
    /// DDP), `optimizer` (AdamW moments and f32 masters of its 1/N part of
    /// the flattened trainable parameters; ZeRO-1) or `gradients` (also
    /// the summed gradients of its part only, reduce-scattered after every
    /// micro-batch; ZeRO-2). See docs/scaling.md. The same training up to
    /// float summation order; in the cache key when not `none` (the last
    /// bits of the weights can differ).
    // Left out of the params JSON at its default, so the cache keys of
    // recipes written before it existed do not move (the schema still
    // documents the default).
    #[serde(skip_serializing_if = "ShardLevel::is_none")]
    #[schemars(extend("default" = "none"))]
    pub shard: ShardLevel,
}

impl Default for SftParams {
    fn default() -> Self {
        Self {
            epochs: 2,
            lr: 1e-5,
            warmup_ratio: 0.1,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: 1.0,
            trainable: vec![r"^model\.language_model\.layers\.\d+\.mlp\.".into()],
            target: Target::Answer,
            think_text: "The highlighted region and its magnified view show {class_name}.".into(),
            prompt: PromptVariant::Think,
            max_steps: None,
            log_every: 1,
            device: DeviceChoice::Cpu,
            dtype: "auto".into(),
            max_shard_mb: 2048,
            checkpoint_every: 0,
            gradient_checkpointing: false,
            shard: ShardLevel::None,
        }
    }
}

impl SftParams {
    /// What the memory prediction reads (`crate::memory`); the target's
    /// tokens estimated from its characters (3 per token).
    pub fn memory_settings(&self) -> Result<SftSettings<'_>, String> {
        let chars = match self.target {
            Target::Answer => "<answer> X </answer><|im_end|>".len(),
            // `{class_name}` becomes a class name of up to ~30 characters.
            Target::ThinkAnswer => self.think_text.len() + "<think></think>\n<answer> X </answer><|im_end|>".len() + 30,
        } as u64;
        Ok(SftSettings {
            trainable: &self.trainable,
            dtype: &self.dtype,
            batch_size: self.batch_size as u64,
            grad_accum: self.grad_accum as u64,
            max_shard_mb: self.max_shard_mb,
            prompt: self.prompt,
            target_tokens: chars.div_ceil(3),
            parallel: Parallel::of_params(self)?,
        })
    }
}

pub struct Sft;

impl StageKind for Sft {
    type Params = SftParams;
    const KIND: &'static str = "sft";
    // 2: the vision patch embedding trains when `trainable` matches it.
    // 3: the step loss is the mean over all its tokens (was: mean of micro-batch means).
    // 4: outputs hold results only: no tokens_per_s in metrics.jsonl, no
    // resumed_from_step in trainable.json (run facts go to provenance.json).
    // 5: the gradient norm is summed in a thread-count-independent order
    // (optim::squared_norm), so its last bits, and through clipping the
    // weights, changed.
    const VERSION: u32 = 5;
    const DISTRIBUTED: bool = true;
    const SUMMARY: &'static str =
        "Supervised fine-tuning of a Qwen2.5-VL checkpoint on a VQA split (loss on assistant tokens only)";

    fn inputs() -> &'static [InputSpec] {
        const I: &[InputSpec] = &[
            InputSpec::one("model", "HF Qwen2.5-VL or Qwen2-VL checkpoint directory (e.g. an init_model stage)"),
            InputSpec::one("data", "Parquet training split (e.g. `export.train`)"),
        ];
        I
    }

    fn outputs(_: &SftParams) -> Vec<OutputSpec> {
        Vec::new()
    }

    fn resources(p: &SftParams) -> Resources {
        // Until `memory` can read the model config (see `crate::memory`).
        Resources { cpu: 0, device: p.device.request(), memory_mb: 4096, libtorch: true }
    }

    fn memory(p: &SftParams, plan: &PlanView) -> MemoryEstimate {
        crate::memory::sft_memory(p.memory_settings(), plan)
    }

    fn plan_output(_: &SftParams, plan: &PlanView) -> PlanOutput {
        crate::memory::checkpoint_stand_in(plan)
    }

    fn validate(p: &SftParams) -> Result<(), ParamError> {
        if !(p.lr > 0.0 && p.lr.is_finite()) {
            return Err(ParamError::new(&["lr"], format!("must be a positive number, got {}", p.lr)));
        }
        if !(0.0..1.0).contains(&p.warmup_ratio) {
            return Err(ParamError::new(&["warmup_ratio"], "must be in [0, 1)"));
        }
        if p.trainable.is_empty() {
            return Err(ParamError::new(&["trainable"], "give at least one regex (nothing would train)"));
        }
        if let Err(e) = regex_union(&p.trainable) {
            return Err(ParamError::new(&["trainable"], e));
        }
        if p.prompt == PromptVariant::CotForcing {
            return Err(ParamError::new(&["prompt"], "cot_forcing is an evaluation variant; use think or no_think"));
        }
        Ok(())
    }

    fn run(p: &SftParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let model_dir = ctx.input("model")?.to_path_buf();
        let rows = read_split(ctx.input("data")?).context("reading the training split")?;
        if rows.is_empty() {
            bail!("the training split is empty");
        }
        let (mut comm, setup) = Setup::start(ctx, &model_dir, &p.dtype, &p.trainable)?;
        let encoder = Encoder { tokenizer: &setup.tokenizer, processor: &setup.processor, params: p };
        // Each step encodes only this rank's items (pixel values are ~6 MB
        // per 504x504 image in f32: the paper's 68,581 items encoded up
        // front would hold ~420 GB per rank). Up front: each row's loss-token
        // count (the step's normaliser needs the whole global batch's) and a
        // header check of every image, so a bad row fails now, not hours in.
        let target_tokens: Vec<usize> = rows
            .iter()
            .map(|r| {
                check_image(r)?;
                encoder.target_tokens(r)
            })
            .collect::<anyhow::Result<_>>()
            .context("building examples")?;
        let mut steps = SftSteps::new(p, &setup.model, encoder, rows, target_tokens, comm.as_ref(), ctx.seed());
        let total = steps.total_steps();
        let settings = LoopSettings {
            patterns: &p.trainable,
            optimizer: AdamWConfig { beta1: p.betas[0], beta2: p.betas[1], eps: p.eps, weight_decay: p.weight_decay },
            max_grad_norm: p.max_grad_norm,
            schedule: LrSchedule::cosine(p.lr, (p.warmup_ratio * total as f64).ceil() as usize, total),
            log_every: p.log_every,
            checkpoint_every: p.checkpoint_every,
            max_shard_mb: p.max_shard_mb,
            shard: p.shard,
        };
        trainer::run(ctx, &settings, &setup, comm.as_mut(), &mut steps)
    }
}

/// SFT as a [`trainer::Algorithm`]: each optimizer step takes the next
/// global batch of `batch_size × grad_accum × ranks` items of the epoch's
/// seeded order; this rank backpropagates its contiguous shard of it in
/// micro-batches of `batch_size`.
pub struct SftSteps<'a> {
    p: &'a SftParams,
    model: &'a Qwen25Vl,
    encoder: Encoder<'a>,
    rows: Vec<VqaRow>,
    /// Loss tokens of each row (what [`Example::target_tokens`] counts once encoded).
    target_tokens: Vec<usize>,
    rank: usize,
    world: usize,
    global_batch: usize,
    steps_per_epoch: usize,
    total: usize,
    seed: u64,
    /// The data order of one epoch (re-derived from the seed: a resumed run draws the same).
    order: Option<(usize, Vec<usize>)>,
    /// The prepared step: its epoch, this rank's micro-batches, its global
    /// loss-token count (the normaliser) and all its tokens (throughput).
    epoch: usize,
    micro: Vec<Vec<Example>>,
    step_tokens: usize,
    step_all_tokens: usize,
}

impl<'a> SftSteps<'a> {
    pub fn new(
        p: &'a SftParams,
        model: &'a Qwen25Vl,
        encoder: Encoder<'a>,
        rows: Vec<VqaRow>,
        target_tokens: Vec<usize>,
        comm: &dyn Collective,
        seed: u64,
    ) -> Self {
        let global_batch = p.batch_size * p.grad_accum * comm.world_size();
        let steps_per_epoch = rows.len().div_ceil(global_batch);
        let total = p.max_steps.unwrap_or(usize::MAX).min(steps_per_epoch * p.epochs).max(1);
        Self {
            p,
            model,
            encoder,
            rows,
            target_tokens,
            rank: comm.rank(),
            world: comm.world_size(),
            global_batch,
            steps_per_epoch,
            total,
            seed,
            order: None,
            epoch: 0,
            micro: Vec::new(),
            step_tokens: 0,
            step_all_tokens: 0,
        }
    }

    /// The seeded order of `epoch` (every rank draws the same).
    fn order(&mut self, epoch: usize, ctx: &StageContext) -> &[usize] {
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.rows.len()).collect();
            order.shuffle(&mut ctx.rng(&format!("sft/order/{epoch}")));
            self.order = Some((epoch, order));
        }
        self.order.as_ref().map_or(&[], |(_, o)| o.as_slice())
    }
}

impl trainer::Algorithm for SftSteps<'_> {
    fn phase(&self) -> &'static str {
        "sft steps"
    }

    fn total_steps(&self) -> usize {
        self.total
    }

    fn position(&self, done: usize) -> Position {
        // The order of every epoch is re-derived from the seed: the step
        // (and the global batch it used) is all a checkpoint needs.
        Position {
            data_cursor: done * self.global_batch,
            sampling_seed: stage_api::derive_seed(self.seed, "sft/order"),
        }
    }

    fn prepare(&mut self, step: usize, ctx: &StageContext, comm: &mut dyn Collective) -> anyhow::Result<()> {
        let (epoch, index) = (step / self.steps_per_epoch, step % self.steps_per_epoch);
        let (global_batch, batch_size, rank, world) = (self.global_batch, self.p.batch_size, self.rank, self.world);
        let group: Vec<usize> = self.order(epoch, ctx).chunks(global_batch).nth(index).unwrap_or_default().to_vec();
        self.epoch = epoch;
        self.step_tokens = group.iter().map(|&i| self.target_tokens[i]).sum();
        // The previous step's examples go before this step's are built.
        self.micro.clear();
        for chunk in group[dist::shard(group.len(), rank, world)].chunks(batch_size) {
            let batch = chunk
                .iter()
                .map(|&i| self.encoder.encode(&self.rows[i]))
                .collect::<anyhow::Result<Vec<_>>>()
                .context("building examples")?;
            self.micro.push(batch);
        }
        // All tokens of the global batch, for the throughput note only.
        let local: usize = self.micro.iter().flatten().map(|e| e.ids.len()).sum();
        self.step_all_tokens = dist::all_reduce_f64(comm, &[local as f64])?.first().map_or(0, |&t| t as usize);
        Ok(())
    }

    fn micro_batches(&self) -> usize {
        self.micro.len()
    }

    fn backward(&mut self, micro: usize) -> anyhow::Result<f64> {
        let batch: Vec<&Example> = self.micro[micro].iter().collect();
        backward_batch(self.model, &batch, self.step_tokens.max(1) as f64, self.p.gradient_checkpointing)
    }

    fn metrics(&mut self, _comm: &mut dyn Collective) -> anyhow::Result<Metrics> {
        let mut row = Metrics::new();
        row.insert("epoch".into(), self.epoch.into());
        Ok(row)
    }

    fn tokens(&self) -> Option<usize> {
        Some(self.step_all_tokens)
    }

    fn summary(&self) -> Metrics {
        let mut s = Metrics::new();
        s.insert("examples".into(), self.rows.len().into());
        s
    }
}

/// One tokenized training example.
pub struct Example {
    pub ids: Vec<i64>,
    /// Same length as `ids`; IGNORE except on the assistant tokens.
    pub labels: Vec<i64>,
    pub pixel_values: Option<Tensor>,
    pub grid: Vec<[i64; 3]>,
}

/// Turns a dataset row into prompt + target tokens with masked labels.
pub struct Encoder<'a> {
    pub tokenizer: &'a ChatTokenizer,
    pub processor: &'a ImageProcessor,
    pub params: &'a SftParams,
}

impl Encoder<'_> {
    /// The assistant text the model learns to produce for `row`.
    pub fn target(&self, row: &VqaRow) -> String {
        let answer = format!("<answer> {} </answer>", row.answer);
        match self.params.target {
            Target::Answer => answer,
            Target::ThinkAnswer => {
                format!("<think>{}</think>\n{answer}", self.params.think_text.replace("{class_name}", &row.class_name))
            }
        }
    }

    /// Tokens of `row`'s assistant turn, the ones in the loss (as
    /// [`Example::target_tokens`] counts them), without encoding the image.
    pub fn target_tokens(&self, row: &VqaRow) -> anyhow::Result<usize> {
        Ok(self.tokenizer.encode(&format!("{}<|im_end|>", self.target(row)))?.len())
    }

    pub fn encode(&self, row: &VqaRow) -> anyhow::Result<Example> {
        let prompts =
            PromptEncoder { tokenizer: self.tokenizer, processor: self.processor, variant: self.params.prompt };
        let prompt = prompts.encode(row)?;
        // Prompt and target are tokenized separately, exactly as generation
        // sees them: the model continues right after the prompt's tokens.
        let target_ids = self.tokenizer.encode(&format!("{}<|im_end|>", self.target(row)))?;
        let ids: Vec<i64> = prompt.ids.iter().copied().chain(target_ids.iter().map(|&t| i64::from(t))).collect();
        let labels: Vec<i64> =
            std::iter::repeat_n(IGNORE, prompt.ids.len()).chain(target_ids.iter().map(|&t| i64::from(t))).collect();
        Ok(Example { ids, labels, pixel_values: prompt.pixel_values, grid: prompt.grid })
    }
}

/// The row's image (if any) has a readable header: the cheap check of
/// every row before training, so a corrupt image fails the stage at once.
fn check_image(row: &VqaRow) -> anyhow::Result<()> {
    if let Some(bytes) = &row.image {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .ok()
            .and_then(|r| r.into_dimensions().ok())
            .with_context(|| format!("item `{}`: column `image.bytes` is not a decodable image", row.id))?;
    }
    Ok(())
}

impl Example {
    /// Tokens in the loss (the assistant turn; position 0 predicts nothing).
    pub fn target_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

/// Mean cross-entropy over the assistant tokens of a left-padded batch.
pub fn batch_loss(model: &Qwen25Vl, batch: &[&Example]) -> anyhow::Result<Tensor> {
    let tokens: usize = batch.iter().map(|e| e.target_tokens()).sum();
    Ok(batch_loss_sum(model, batch)? / tokens.max(1) as f64)
}

/// A left-padded batch of examples as model inputs and labels.
struct Collated {
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    pixel_values: Option<Tensor>,
    grid: Vec<[i64; 3]>,
}

impl Collated {
    fn new(model: &Qwen25Vl, batch: &[&Example]) -> Self {
        let len = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for e in batch {
            let pad = len - e.ids.len();
            ids.extend(std::iter::repeat_n(0i64, pad).chain(e.ids.iter().copied()));
            mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, e.ids.len())));
            labels.extend(std::iter::repeat_n(IGNORE, pad).chain(e.labels.iter().copied()));
        }
        let shape = [batch.len() as i64, len as i64];
        let device = model.device;
        let pv: Vec<&Tensor> = batch.iter().filter_map(|e| e.pixel_values.as_ref()).collect();
        Self {
            input_ids: Tensor::from_slice(&ids).reshape(shape).to_device(device),
            attention_mask: Tensor::from_slice(&mask).reshape(shape).to_device(device),
            labels: Tensor::from_slice(&labels).reshape(shape).to_device(device),
            pixel_values: (!pv.is_empty()).then(|| Tensor::cat(&pv, 0).to_device(device).to_kind(model.kind)),
            grid: batch.iter().flat_map(|e| e.grid.iter().copied()).collect(),
        }
    }

    fn batch(&self) -> Batch<'_> {
        Batch {
            input_ids: &self.input_ids,
            attention_mask: &self.attention_mask,
            pixel_values: self.pixel_values.as_ref(),
            image_grid_thw: &self.grid,
        }
    }
}

/// Summed cross-entropy over the assistant tokens of a left-padded batch.
pub fn batch_loss_sum(model: &Qwen25Vl, batch: &[&Example]) -> anyhow::Result<Tensor> {
    let c = Collated::new(model, batch);
    let logits = model.forward(&c.batch())?;
    Ok(masked_cross_entropy_sum(&logits, &c.labels))
}

/// Backpropagate the summed cross-entropy of a batch divided by `divisor`
/// (gradients accumulate into the parameters), with or without activation
/// checkpointing; returns that loss.
pub fn backward_batch(model: &Qwen25Vl, batch: &[&Example], divisor: f64, checkpointing: bool) -> anyhow::Result<f64> {
    let c = Collated::new(model, batch);
    model.forward_backward(&c.batch(), LogitsSpan::All, checkpointing, |logits| {
        Ok(masked_cross_entropy_sum(logits, &c.labels) / divisor)
    })
}

/// Mean next-token cross-entropy of (batch, len, vocab) logits against
/// (batch, len) labels; positions labelled IGNORE contribute nothing.
pub fn masked_cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    cross_entropy(logits, labels, Reduction::Mean)
}

/// Like [`masked_cross_entropy`], summed over the tokens instead of averaged.
pub fn masked_cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> Tensor {
    cross_entropy(logits, labels, Reduction::Sum)
}

fn cross_entropy(logits: &Tensor, labels: &Tensor, reduction: Reduction) -> Tensor {
    // Token t predicts token t+1.
    let (len, vocab) = (logits.size()[1], logits.size()[2]);
    let shifted = logits.narrow(1, 0, len - 1).to_kind(Kind::Float).reshape([-1, vocab]);
    let targets = labels.narrow(1, 1, len - 1).reshape([-1]);
    shifted.cross_entropy_loss::<Tensor>(&targets, None, reduction, IGNORE, 0.0)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::optim::{AdamW, clip_grad_norm};
    use stages_task::completion::{ResponseFormat, is_well_formed};
    use stages_task::prompt::THINK_TEMPLATE;
    use stages_vlm::InitModel;
    use stages_vlm::Pretrained;
    use stages_vlm::init_model::InitModelParams;

    /// The model, tokenizer and processor of a checkpoint dir (f32, CPU).
    fn load_parts(dir: &Path) -> anyhow::Result<(Qwen25Vl, ChatTokenizer, ImageProcessor)> {
        let Pretrained { model, tokenizer, processor } = Pretrained::load(dir, Kind::Float, tch::Device::Cpu)?;
        Ok((model, tokenizer, processor))
    }

    /// A tiny checkpoint from the real init_model stage.
    fn tiny_checkpoint(dir: &Path) -> std::path::PathBuf {
        let corpus = dir.join("corpus");
        std::fs::create_dir_all(&corpus).unwrap();
        std::fs::write(
            corpus.join("qa.txt"),
            format!("{THINK_TEMPLATE} Which lesion? A. airway B. emphysema\n").repeat(4),
        )
        .unwrap();
        let out = dir.join("model");
        let mut ctx = StageContext::builder("tiny", &out).input("corpus", "c", None, &corpus).seed(3).build().unwrap();
        InitModel::run(&InitModelParams { vocab_size: 300, ..Default::default() }, &mut ctx).unwrap();
        out
    }

    fn png(w: u32, h: u32, shade: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([shade, (x * 7) as u8, (y * 5) as u8]));
        let mut bytes = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        bytes
    }

    fn row(i: usize, answer: &str) -> VqaRow {
        VqaRow {
            id: format!("case{i}"),
            image: Some(png(56, 56, (i * 60) as u8)),
            problem: THINK_TEMPLATE.replace("{Question}", "Which lesion? A. airway B. emphysema"),
            answer: answer.into(),
            answers: Vec::new(),
            options: vec!["A. airway".into(), "B. emphysema".into()],
            class: "airway".into(),
            class_name: "airway abnormalities".into(),
        }
    }

    #[test]
    fn labels_cover_exactly_the_assistant_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let (_, tokenizer, processor) = load_parts(&tiny_checkpoint(dir.path())).unwrap();
        let params = SftParams { target: Target::ThinkAnswer, ..Default::default() };
        let enc = Encoder { tokenizer: &tokenizer, processor: &processor, params: &params };
        let ex = enc.encode(&row(0, "B")).unwrap();
        assert_eq!(ex.ids.len(), ex.labels.len());
        let first = ex.labels.iter().position(|&l| l != IGNORE).unwrap();
        assert!(ex.labels[first..].iter().all(|&l| l != IGNORE), "no hole in the target");
        assert_eq!(&ex.ids[first..], &ex.labels[first..]);
        let target: Vec<u32> = ex.labels[first..].iter().map(|&t| t as u32).collect();
        let text = tokenizer.decode(&target, false).unwrap();
        assert!(text.contains("<answer>") && text.contains("</answer>") && text.contains("<think>"), "{text}");
        assert!(text.contains("airway abnormalities"), "{text}");
        // The prompt part holds the image pads and the question, all masked.
        let prompt: Vec<u32> = ex.ids[..first].iter().map(|&t| t as u32).collect();
        let prompt_text = tokenizer.decode(&prompt, false).unwrap();
        assert!(prompt_text.contains("<|image_pad|>") && prompt_text.ends_with("assistant\n"), "{prompt_text}");
        assert_eq!(ex.grid, vec![[1, 4, 4]]);
        // The targets are in the format the GRPO reward and the eval hold completions to.
        assert!(is_well_formed(&enc.target(&row(0, "B")), ResponseFormat::Think));
        let answer_only = SftParams { target: Target::Answer, ..Default::default() };
        let enc = Encoder { params: &answer_only, ..enc };
        assert!(is_well_formed(&enc.target(&row(0, "B")), ResponseFormat::NoThink));
    }

    #[test]
    fn loss_ignores_every_prediction_at_prompt_positions() {
        // The Med-R1 lineage pitfall: prompt tokens in the loss. Perturbing the
        // model's predictions at every prompt position must leave the loss
        // bit-identical; perturbing one target prediction must change it.
        let dir = tempfile::tempdir().unwrap();
        let (model, tokenizer, processor) = load_parts(&tiny_checkpoint(dir.path())).unwrap();
        let params = SftParams { target: Target::ThinkAnswer, ..Default::default() };
        let enc = Encoder { tokenizer: &tokenizer, processor: &processor, params: &params };
        let ex = enc.encode(&row(1, "A")).unwrap();
        let len = ex.ids.len() as i64;
        let input_ids = Tensor::from_slice(&ex.ids).view([1, len]);
        let mask = Tensor::ones([1, len], (Kind::Int64, tch::Device::Cpu));
        let labels = Tensor::from_slice(&ex.labels).view([1, len]);
        let logits = tch::no_grad(|| {
            model.forward(&Batch {
                input_ids: &input_ids,
                attention_mask: &mask,
                pixel_values: ex.pixel_values.as_ref(),
                image_grid_thw: &ex.grid,
            })
        })
        .unwrap();
        let base = masked_cross_entropy(&logits, &labels).double_value(&[]);
        // Logits at position t predict token t + 1: positions before
        // `first - 1` predict prompt tokens.
        let first = ex.labels.iter().position(|&l| l != IGNORE).unwrap() as i64;
        tch::manual_seed(0);
        let noise = Tensor::randn(logits.size(), (Kind::Float, tch::Device::Cpu)) * 5.0;
        let prompt_part = Tensor::arange(len, (Kind::Int64, tch::Device::Cpu)).lt(first - 1).view([1, len, 1]);
        let perturbed = &logits + noise.shallow_clone() * prompt_part.to_kind(Kind::Float);
        assert_eq!(masked_cross_entropy(&perturbed, &labels).double_value(&[]), base);
        let target_part = Tensor::arange(len, (Kind::Int64, tch::Device::Cpu)).eq(first - 1).view([1, len, 1]);
        let perturbed = &logits + noise * target_part.to_kind(Kind::Float);
        assert_ne!(masked_cross_entropy(&perturbed, &labels).double_value(&[]), base);
        // And it is the mean negative log-likelihood of the target tokens.
        let logp = logits.squeeze_dim(0).log_softmax(-1, Kind::Float);
        let nll: f64 =
            (first..len).map(|t| -logp.double_value(&[t - 1, ex.ids[t as usize]])).sum::<f64>() / (len - first) as f64;
        assert!((nll - base).abs() < 1e-5, "{nll} vs {base}");
    }

    #[test]
    fn mlp_only_training_lowers_the_loss_and_leaves_everything_else_bit_identical() {
        let dir = tempfile::tempdir().unwrap();
        let (model, tokenizer, processor) = load_parts(&tiny_checkpoint(dir.path())).unwrap();
        let params = SftParams::default();
        let names = model.set_trainable(&regex_union(&params.trainable).unwrap()).unwrap();
        assert!(!names.is_empty() && names.iter().all(|n| n.contains(".mlp.") && n.contains("language_model")));
        let before: Vec<(String, Tensor)> = model.params.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect();

        let enc = Encoder { tokenizer: &tokenizer, processor: &processor, params: &params };
        let examples: Vec<Example> = (0..4).map(|i| enc.encode(&row(i, ["A", "B"][i % 2])).unwrap()).collect();
        let batch: Vec<&Example> = examples.iter().collect();
        let trainable: Vec<(String, Tensor)> =
            names.iter().map(|n| (n.clone(), model.params[n].shallow_clone())).collect();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut opt = AdamW::new(trainable, cfg);
        let first = batch_loss(&model, &batch).unwrap().double_value(&[]);
        for _ in 0..30 {
            let loss = batch_loss(&model, &batch).unwrap();
            loss.backward();
            clip_grad_norm(opt.params(), 1.0);
            opt.step(1e-2);
        }
        let last = tch::no_grad(|| batch_loss(&model, &batch)).unwrap().double_value(&[]);
        assert!(last < first - 0.5, "loss {first} -> {last}");
        for (name, old) in &before {
            let same = model.params[name].equal(old);
            if names.contains(name) {
                assert!(!same, "{name} should have trained");
            } else {
                assert!(same, "{name} is frozen but changed");
                assert!(!model.params[name].grad().defined(), "{name} got a gradient");
            }
        }
    }

    #[test]
    fn bad_params_name_the_key() {
        let e = Sft::validate(&SftParams { trainable: vec!["(".into()], ..Default::default() }).unwrap_err();
        assert_eq!(e.path, vec!["trainable"]);
        let e = stage_api::configure_params::<Sft>(toml::toml! { batch_size = 0 }).unwrap_err();
        assert_eq!((e.path, e.message.as_str()), (vec!["batch_size".into()], "0 is out of range: expected 1..=4096"));
        let e = Sft::validate(&SftParams { prompt: PromptVariant::CotForcing, ..Default::default() }).unwrap_err();
        assert_eq!(e.path, vec!["prompt"]);
    }
}
