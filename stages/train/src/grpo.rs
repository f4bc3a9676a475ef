//! GRPO (`kind = "grpo"`): the paper's second training stage.
//!
//! Every `num_iterations` optimizer steps a generation round samples
//! `num_generations` completions for each of `prompts_per_step` prompts,
//! scores them with the weighted rewards and turns the rewards into group
//! advantages. Each optimizer step then recomputes the completions'
//! log-probs with gradients in micro-batches, compares them with the
//! log-probs under the generating weights (the clip only matters from the
//! second update of a round) and, when `beta` > 0, with a frozen reference
//! copy of the input model (k3 KL), and takes one AdamW step on the
//! trainable tensors. Metrics use TRL's names.
//!
//! The loop is [`trainer::run`]; this module supplies the rounds and the
//! loss ([`GrpoSteps`]). A checkpoint (trainable weights, AdamW moments,
//! step, data cursor, sampling seed, logs) goes to the engine's resume
//! directory every `checkpoint_every` steps; a killed run resumes from the
//! newest one and ends with the same weights as an uninterrupted run.
//!
//! Data-parallel: with `ranks = N` each rank generates and trains on its
//! shard of every round's prompts (`prompts_per_step` ≥ N); the loss
//! normalisers count the whole round and gradients are summed, so the
//! ranks take the single-process step (up to float rounding). Rank 0 writes
//! metrics, completions, checkpoints and the model.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Deserializer, Serialize};
use stage_api::schemars::{self, JsonSchema};
use stage_api::{InputSpec, MemoryEstimate, ParamError, PlanOutput, PlanView, Resources, StageContext, StageKind};
use stages_task::answer::DEFAULT_ANSWER_REGEX;
use stages_task::dataset::{VqaRow, read_split};
use stages_task::prompt::PromptVariant;
use stages_vlm::device::DeviceChoice;
use stages_vlm::generate::GenerationConfig;
use stages_vlm::{LogitsSpan, Qwen25Vl};
use tch::Tensor;

use crate::advantages::{ScaleRewards, mean_std};
use crate::dist::{self, Collective};
use crate::memory::{GrpoSettings, Parallel};
use crate::optim::{AdamWConfig, LrSchedule};
use crate::policy_loss::{LossConfig, LossInputs, LossStats, LossType, StepScale, policy_loss, token_logps};
use crate::prompt::PromptEncoder;
use crate::rewards::{REWARD_NAMES, RewardError, Rewards, paper_weights};
use crate::rollout::{DataOrder, Rollout, RolloutSpec, Sampler, rollout, round_seed};
use crate::trainer::{self, LoopSettings, Metrics, Position, Setup, ShardLevel, regex_union};

/// Sample completions written by the stage.
pub const COMPLETIONS_JSONL: &str = "completions.jsonl";

/// Learning-rate schedule after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    Constant,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoParams {
    /// Completions sampled per prompt, the group (paper: N = 5).
    // A group needs two completions to have an advantage; TRL runs use up to 64.
    #[schemars(range(min = 2, max = 1024))]
    pub num_generations: usize,
    /// Optimizer steps (paper: 1500).
    // The paper runs 1500; a million is years of GRPO at any scale.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub steps: usize,
    /// Prompts per generation round (CHOSEN: 8; the paper does not say).
    // Prompts x generations per round is bounded in `validate` too.
    #[schemars(range(min = 1, max = 4096))]
    pub prompts_per_step: usize,
    /// Completions per forward/backward pass (gradient accumulation within a step).
    #[schemars(range(min = 1, max = 4096))]
    pub micro_batch_size: usize,
    /// Optimizer steps per generation round; the clip only matters when > 1 (TRL's μ).
    // TRL's mu: 1 to 4 in practice.
    #[schemars(range(min = 1, max = 64))]
    pub num_iterations: usize,
    /// Sampling temperature (1.0); log-probs are taken at the same temperature.
    pub temperature: f64,
    /// Nucleus sampling threshold (1 = off).
    pub top_p: f64,
    /// Keep the k most likely tokens when sampling (0 = off).
    // Larger than any vocabulary (Qwen2.5: 151,936).
    #[schemars(range(max = 1_048_576))]
    pub top_k: usize,
    /// Generation budget per completion; longer ones are truncated.
    // Qwen2.5-VL's context is 32,768 tokens, prompt included.
    #[schemars(range(min = 1, max = 32_768))]
    pub max_completion_length: usize,
    /// Stop a completion once its text contains one of these (besides the
    /// end-of-turn token); empty = only EOS, as TRL.
    pub stop_strings: Vec<String>,
    /// Peak learning rate (1e-6 in the Med-R1 lineage).
    pub lr: f64,
    /// `constant` or `cosine` decay after the warmup.
    pub lr_schedule: LrScheduleKind,
    /// Fraction of the steps spent warming up linearly.
    pub warmup_ratio: f64,
    /// AdamW betas.
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    /// KL coefficient β (0.04); 0 disables the KL term and never loads the reference model.
    pub beta: f64,
    /// Lower clip range ε of the ratio (0.2).
    pub epsilon: f64,
    /// Upper clip range (default: `epsilon`; DAPO uses 0.28).
    pub epsilon_high: Option<f64>,
    /// Token aggregation over the step: `grpo` (mean of the per-sequence means), `bnpo` and
    /// `dapo` (token mean), `dr_grpo` (sum / (sequences × max_completion_length)).
    pub loss_type: LossType,
    /// Advantage scaling: `group` std, `batch` std or `none`.
    pub scale_rewards: ScaleRewards,
    /// Give truncated completions (no EOS within max_completion_length) no loss.
    pub mask_truncated_completions: bool,
    /// Reward name -> weight (paper: format 1, validity 1, correctness 2).
    /// Names not written keep the paper's weight; a weight of 0 removes that
    /// reward from the total (it is still logged). Known: format, validity, correctness.
    #[serde(deserialize_with = "weights_over_paper_defaults")]
    pub reward_weights: BTreeMap<String, f64>,
    /// Answer extraction of the validity and correctness rewards: searched in the
    /// first `<answer>...</answer>` block (as the eval stage does), first group.
    pub answer_regex: String,
    /// Prompt variant: `think` (format reward wants think + answer) or `no_think` (answer only).
    pub prompt: PromptVariant,
    /// Regexes over HF parameter names; a parameter trains if any matches
    /// (default: the language model's MLP layers, as the paper's SFT).
    pub trainable: Vec<String>,
    /// Log a metrics row every this many steps.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub log_every: usize,
    /// Write the round's completions to completions.jsonl every this many steps (0 = never).
    #[schemars(range(max = 1_000_000))]
    pub log_completions_every: usize,
    /// Save a resumable checkpoint every this many steps (0 = never); a multiple of num_iterations.
    #[schemars(range(max = 1_000_000))]
    pub checkpoint_every: usize,
    /// `cpu`, `auto` (CUDA when present) or `cuda`.
    pub device: DeviceChoice,
    /// `auto` (float32 on CPU, bfloat16 on CUDA), `float32`, `bfloat16`.
    pub dtype: String,
    /// Largest safetensors shard of the saved checkpoint, in MiB.
    // Up to 1 TiB per shard; bytes = MiB x 2^20 must not overflow.
    #[schemars(range(min = 1, max = 1_048_576))]
    pub max_shard_mb: u64,
    /// Activation checkpointing in the policy update: keep only each decoder
    /// layer's and vision block's input during the forward pass and recompute
    /// the block in the backward pass. Much less activation memory for about
    /// one more forward pass per micro-batch; the gradients are the same.
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

impl Default for GrpoParams {
    fn default() -> Self {
        Self {
            num_generations: 5,
            steps: 1500,
            prompts_per_step: 8,
            micro_batch_size: 8,
            num_iterations: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_completion_length: 256,
            stop_strings: Vec::new(),
            lr: 1e-6,
            lr_schedule: LrScheduleKind::Constant,
            warmup_ratio: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            beta: 0.04,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: LossType::Grpo,
            scale_rewards: ScaleRewards::Group,
            mask_truncated_completions: false,
            reward_weights: paper_weights(),
            answer_regex: DEFAULT_ANSWER_REGEX.into(),
            prompt: PromptVariant::Think,
            trainable: vec![r"^model\.language_model\.layers\.\d+\.mlp\.".into()],
            log_every: 1,
            log_completions_every: 10,
            checkpoint_every: 100,
            device: DeviceChoice::Cpu,
            dtype: "auto".into(),
            max_shard_mb: 2048,
            gradient_checkpointing: false,
            shard: ShardLevel::None,
        }
    }
}

/// `reward_weights` from a recipe, laid over the paper's weights.
fn weights_over_paper_defaults<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let given = BTreeMap::<String, f64>::deserialize(d)?;
    let mut weights = paper_weights();
    weights.extend(given);
    Ok(weights)
}

impl GrpoParams {
    fn rewards(&self) -> Result<Rewards, RewardError> {
        Rewards::new(&self.reward_weights, self.prompt.response_format(), &self.answer_regex)
    }

    pub fn loss_config(&self) -> LossConfig {
        LossConfig {
            loss_type: self.loss_type,
            epsilon_low: self.epsilon,
            epsilon_high: self.epsilon_high.unwrap_or(self.epsilon),
            beta: self.beta,
            max_completion_length: self.max_completion_length,
        }
    }

    /// What the memory prediction reads (`crate::memory`).
    pub fn memory_settings(&self) -> Result<GrpoSettings<'_>, String> {
        Ok(GrpoSettings {
            trainable: &self.trainable,
            dtype: &self.dtype,
            prompts_per_step: self.prompts_per_step as u64,
            num_generations: self.num_generations as u64,
            micro_batch_size: self.micro_batch_size as u64,
            max_completion_length: self.max_completion_length as u64,
            reference: self.beta != 0.0,
            max_shard_mb: self.max_shard_mb,
            prompt: self.prompt,
            parallel: Parallel::of_params(self)?,
        })
    }

    fn schedule(&self) -> LrSchedule {
        let warmup = (self.warmup_ratio * self.steps as f64).ceil() as usize;
        match self.lr_schedule {
            LrScheduleKind::Constant => LrSchedule::constant(self.lr, warmup, self.steps),
            LrScheduleKind::Cosine => LrSchedule::cosine(self.lr, warmup, self.steps),
        }
    }
}

pub struct Grpo;

impl StageKind for Grpo {
    type Params = GrpoParams;
    const KIND: &'static str = "grpo";
    // 2: every completion samples from its own stream of the round seed (ranks
    // shard the round), candidates drawn in vocabulary order (no full sort).
    // 3: the format reward is the task contract's rule (stages_task::completion:
    // whitespace around the completion allowed, repeated/nested tags and empty
    // blocks not), answers from the first answer block.
    // 4: the loss is normalised by the step's sequences/tokens over all
    // micro-batches and ranks (a short last micro-batch weighed up to 4x more);
    // no step_time_s in metrics.jsonl, no resumed_from_step in trainable.json
    // (run facts go to provenance.json).
    // 5: the gradient norm is summed in a thread-count-independent order
    // (optim::squared_norm), so its last bits, and through clipping the
    // weights, changed.
    // 6: rollouts choose tokens on the device (top-k / nucleus candidates drawn
    // in vocabulary order; sampler log-probs from a tensor log-softmax, within
    // 1e-5 of the host's, so the sampling-diff metrics move) and drop finished
    // rows from the decode batch (other matmul batch shapes: logits can move
    // in the last bits and a draw pick another token).
    const VERSION: u32 = 6;
    const DISTRIBUTED: bool = true;
    const SUMMARY: &'static str =
        "GRPO on a Qwen2.5-VL checkpoint with weighted format/validity/correctness rewards (resumable)";

    fn inputs() -> &'static [InputSpec] {
        const I: &[InputSpec] = &[
            InputSpec::one("model", "HF Qwen2.5-VL or Qwen2-VL checkpoint directory (e.g. an sft stage)"),
            InputSpec::one("data", "Parquet training split (e.g. `export.train`)"),
        ];
        I
    }

    fn resources(p: &GrpoParams) -> Resources {
        // Until `memory` can read the model config (see `crate::memory`).
        Resources { cpu: 0, device: p.device.request(), memory_mb: 4096, libtorch: true }
    }

    fn memory(p: &GrpoParams, plan: &PlanView) -> MemoryEstimate {
        crate::memory::grpo_memory(p.memory_settings(), plan)
    }

    fn plan_output(_: &GrpoParams, plan: &PlanView) -> PlanOutput {
        crate::memory::checkpoint_stand_in(plan)
    }

    fn validate(p: &GrpoParams) -> Result<(), ParamError> {
        // Each count's range is declared on its field; here the limits between fields.
        // 65,536 completions per round (the paper: 8 x 5 = 40) keeps a
        // round's generated tokens below 2^31 at the longest completion.
        let completions = p.prompts_per_step.saturating_mul(p.num_generations);
        if completions > 65_536 {
            return Err(ParamError::new(
                &["prompts_per_step"],
                format!(
                    "{} prompts x {} generations = {completions} completions per round: at most 65536",
                    p.prompts_per_step, p.num_generations
                ),
            ));
        }
        let positive = [("lr", p.lr), ("temperature", p.temperature), ("epsilon", p.epsilon)];
        for (key, v) in positive {
            if !(v > 0.0 && v.is_finite()) {
                return Err(ParamError::new(&[key], format!("must be a positive number, got {v}")));
            }
        }
        if let Some(e) = p.epsilon_high
            && !(e > 0.0 && e.is_finite())
        {
            return Err(ParamError::new(&["epsilon_high"], format!("must be a positive number, got {e}")));
        }
        if !(p.beta >= 0.0 && p.beta.is_finite()) {
            return Err(ParamError::new(&["beta"], format!("must be >= 0, got {}", p.beta)));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(ParamError::new(&["top_p"], "must be in (0, 1]"));
        }
        if !(0.0..1.0).contains(&p.warmup_ratio) {
            return Err(ParamError::new(&["warmup_ratio"], "must be in [0, 1)"));
        }
        if !p.checkpoint_every.is_multiple_of(p.num_iterations) {
            return Err(ParamError::new(
                &["checkpoint_every"],
                format!(
                    "must be a multiple of num_iterations ({}): checkpoints are taken between generation rounds",
                    p.num_iterations
                ),
            ));
        }
        if p.trainable.is_empty() {
            return Err(ParamError::new(&["trainable"], "give at least one regex (nothing would train)"));
        }
        if let Err(e) = regex_union(&p.trainable) {
            return Err(ParamError::new(&["trainable"], e));
        }
        if !matches!(p.prompt, PromptVariant::Think | PromptVariant::NoThink) {
            return Err(ParamError::new(&["prompt"], "use think or no_think (the format reward depends on it)"));
        }
        if !["auto", "float32", "bfloat16"].contains(&p.dtype.as_str()) {
            return Err(ParamError::new(&["dtype"], format!("expected auto, float32 or bfloat16, got {:?}", p.dtype)));
        }
        p.rewards().map(|_| ()).map_err(|e| match e {
            RewardError::Unknown { name } | RewardError::BadWeight { name, .. } => {
                let msg =
                    format!("unknown or invalid reward (known: {}; weights must be finite)", REWARD_NAMES.join(", "));
                ParamError::new(&["reward_weights", &name], msg)
            }
            RewardError::AllZero => ParamError::new(&["reward_weights"], e.to_string()),
            RewardError::Regex(_) => ParamError::new(&["answer_regex"], e.to_string()),
        })
    }

    fn run(p: &GrpoParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let model_dir = ctx.input("model")?.to_path_buf();
        let data = read_split(ctx.input("data")?).context("reading the training split")?;
        if data.is_empty() {
            bail!("the training split is empty");
        }
        let (mut comm, setup) = Setup::start(ctx, &model_dir, &p.dtype, &p.trainable)?;
        if p.prompts_per_step < comm.world_size() {
            bail!(
                "prompts_per_step = {} leaves ranks without prompts: give at least one per rank ({} ranks)",
                p.prompts_per_step,
                comm.world_size()
            );
        }
        let (model, tokenizer) = (&setup.model, &setup.tokenizer);
        // Loaded once, and only when the KL term exists.
        let reference = if p.beta != 0.0 { Some(frozen_copy(model, &setup.trainable.names)?) } else { None };
        let rewards = p.rewards()?;
        let spec = RolloutSpec {
            num_generations: p.num_generations,
            generation: GenerationConfig {
                max_new_tokens: p.max_completion_length,
                temperature: p.temperature,
                top_p: p.top_p,
                top_k: p.top_k,
                eos_token_ids: tokenizer.eos_ids.iter().map(|&e| i64::from(e)).collect(),
                stop_strings: p.stop_strings.clone(),
                suppress_tokens: suppressed_tokens(model),
                ..Default::default()
            },
            scale_rewards: p.scale_rewards,
            micro_batch_size: p.micro_batch_size,
            mask_truncated_completions: p.mask_truncated_completions,
            rewards: &rewards,
        };
        let sampler = Sampler {
            model,
            tokenizer,
            encoder: PromptEncoder { tokenizer, processor: &setup.processor, variant: p.prompt },
            data: &data,
            seed: ctx.seed(),
        };
        let mut steps = GrpoSteps {
            p,
            loss: GrpoLoss { p, model, reference: reference.as_ref(), loss: p.loss_config() },
            spec,
            sampler,
            order: DataOrder::new(data.len(), ctx.seed()),
            completions_path: ctx.output_dir().join(COMPLETIONS_JSONL),
            current: None,
            iteration: 0,
            stats: StepStats::default(),
        };
        let settings = LoopSettings {
            patterns: &p.trainable,
            optimizer: AdamWConfig { beta1: p.betas[0], beta2: p.betas[1], eps: p.eps, weight_decay: p.weight_decay },
            max_grad_norm: p.max_grad_norm,
            schedule: p.schedule(),
            log_every: p.log_every,
            checkpoint_every: p.checkpoint_every,
            max_shard_mb: p.max_shard_mb,
            shard: p.shard,
        };
        trainer::run(ctx, &settings, &setup, comm.as_mut(), &mut steps)
    }
}

/// GRPO as a [`trainer::Algorithm`]: a generation round every
/// `num_iterations` steps (this rank's shard of the round's prompts),
/// then the round's completions are the step's micro-batches.
pub struct GrpoSteps<'a> {
    p: &'a GrpoParams,
    loss: GrpoLoss<'a>,
    spec: RolloutSpec<'a>,
    sampler: Sampler<'a>,
    order: DataOrder,
    completions_path: PathBuf,
    /// The round being trained on.
    current: Option<Rollout>,
    /// Update of the round the prepared step is (0 = first).
    iteration: usize,
    stats: StepStats,
}

impl trainer::Algorithm for GrpoSteps<'_> {
    fn phase(&self) -> &'static str {
        "grpo steps"
    }

    fn total_steps(&self) -> usize {
        self.p.steps
    }

    fn position(&self, done: usize) -> Position {
        // Data order and sampling seeds are derived from the round.
        let next_round = done / self.p.num_iterations;
        Position {
            data_cursor: next_round * self.p.prompts_per_step,
            sampling_seed: round_seed(self.sampler.seed, next_round),
        }
    }

    fn prepare(&mut self, step: usize, ctx: &StageContext, comm: &mut dyn Collective) -> anyhow::Result<()> {
        let p = self.p;
        self.iteration = step % p.num_iterations;
        if self.iteration == 0 || self.current.is_none() {
            let round = step / p.num_iterations;
            let rows = self.order.round(round, p.prompts_per_step);
            let mut r = rollout(&self.spec, &self.sampler, rows, round, comm)
                .with_context(|| format!("generation round {round} (step {})", step + 1))?;
            self.loss.reference_logps(&mut r)?;
            if p.log_completions_every > 0 && step.is_multiple_of(p.log_completions_every) {
                let mine = completion_lines(step + 1, &r, self.sampler.data, self.spec.rewards);
                let lines = dist::all_gather_json(comm, &mine)?;
                if ctx.is_main_rank() {
                    append_lines(&self.completions_path, lines.iter().flatten())?;
                }
            }
            self.current = Some(r);
        }
        self.stats = StepStats::new(self.iteration);
        Ok(())
    }

    fn micro_batches(&self) -> usize {
        self.current.as_ref().map_or(0, |r| r.micro.len())
    }

    fn backward(&mut self, micro: usize) -> anyhow::Result<f64> {
        let Some(r) = self.current.as_mut() else { bail!("GRPO: no generation round prepared") };
        self.loss.micro_backward(r, micro, self.iteration, &mut self.stats)
    }

    fn metrics(&mut self, comm: &mut dyn Collective) -> anyhow::Result<Metrics> {
        if comm.world_size() > 1 {
            self.stats.reduce(comm)?;
        }
        let Some(r) = self.current.as_ref() else { bail!("GRPO: no generation round prepared") };
        Ok(metrics_row(r, &self.stats, self.spec.rewards, self.p))
    }

    fn log_files(&self) -> Vec<PathBuf> {
        vec![self.completions_path.clone()]
    }

    fn summary(&self) -> Metrics {
        let mut s = Metrics::new();
        s.insert("reference_model".into(), self.loss.reference.is_some().into());
        s
    }
}

/// Tokens the policy never samples: an image or video placeholder in a
/// completion would be taken for vision tokens when the completion is fed
/// back for the loss. Sampling and the loss use the same suppressed
/// distribution, so the ratio of unchanged weights is exactly 1.
pub fn suppressed_tokens(model: &Qwen25Vl) -> Vec<i64> {
    // A text-only checkpoint has no vision placeholders to suppress.
    model.config.tokens.as_ref().map(|t| vec![t.image_token_id, t.video_token_id]).unwrap_or_default()
}

/// The input model with its trainable tensors copied and frozen: the KL
/// reference. Frozen tensors are shared with the policy (they never change),
/// so with MLP-only training the reference costs only the MLP weights.
fn frozen_copy(model: &Qwen25Vl, trainable: &[String]) -> anyhow::Result<Qwen25Vl> {
    let params = model
        .params
        .iter()
        .map(|(n, t)| {
            let t = if trainable.binary_search(n).is_ok() { t.detach().copy() } else { t.shallow_clone() };
            (n.clone(), t)
        })
        .collect();
    Ok(Qwen25Vl::from_params(model.config.clone(), params)?)
}

/// What one optimizer step measured (summed over micro-batches, then ranks).
#[derive(Debug, Default)]
pub struct StepStats {
    pub loss_stats: LossStats,
    /// Σ entropy over the loss tokens.
    pub entropy: f64,
    /// Σ |sampler log-prob − recomputed log-prob| over real tokens, the real
    /// tokens and the largest difference (first update of a round only).
    sampling: Option<(f64, f64, f64)>,
}

impl StepStats {
    /// Empty statistics of update `iteration` of a round.
    pub fn new(iteration: usize) -> Self {
        Self { sampling: (iteration == 0).then_some((0.0, 0.0, 0.0)), ..Default::default() }
    }

    /// Mean and max |sampler log-prob − recomputed log-prob| over real
    /// tokens (first update of a round only).
    pub fn sampling_diff(&self) -> Option<(f64, f64)> {
        let (sum, real, max) = self.sampling?;
        (real > 0.0).then(|| (sum / real, max))
    }

    /// Combine the ranks' statistics of one step (every rank gets the totals).
    fn reduce(&mut self, comm: &mut dyn Collective) -> anyhow::Result<()> {
        let l = &mut self.loss_stats;
        let (diff_sum, real, max) = self.sampling.unwrap_or_default();
        let local = [l.tokens, l.kl, l.low_clipped, l.high_clipped, l.region_clipped, self.entropy, diff_sum, real];
        let parts = dist::all_gather_f64(comm, &[&local[..], &[max]].concat())?;
        let mut t = [0.0; 9];
        for part in &parts {
            for (i, v) in part.iter().enumerate().take(8) {
                t[i] += v;
            }
            t[8] = t[8].max(part.get(8).copied().unwrap_or(0.0));
        }
        (l.tokens, l.kl, l.low_clipped, l.high_clipped, l.region_clipped) = (t[0], t[1], t[2], t[3], t[4]);
        self.entropy = t[5];
        // Every rank is at the same update of the round: all have sums or none.
        if self.sampling.is_some() {
            self.sampling = Some((t[6], t[7], t[8]));
        }
        Ok(())
    }
}

/// The GRPO loss of a round's micro-batches: log-probs with gradients
/// against the generating weights' and (β > 0) the reference's.
pub struct GrpoLoss<'a> {
    pub p: &'a GrpoParams,
    pub model: &'a Qwen25Vl,
    pub reference: Option<&'a Qwen25Vl>,
    pub loss: LossConfig,
}

impl GrpoLoss<'_> {
    /// Completion log-probs (batch, completion) and entropies of `model`.
    fn logps(&self, model: &Qwen25Vl, m: &crate::rollout::MicroBatch) -> anyhow::Result<(Tensor, Tensor)> {
        let c = m.completion_len();
        // Logits at the last prompt token .. the second-to-last completion token.
        let logits = model.forward_last(&m.batch(), c + 1)?.narrow(1, 0, c);
        Ok(token_logps(&logits, &m.completion_ids, self.p.temperature, &suppressed_tokens(model)))
    }

    /// Reference log-probs of every micro-batch (once per round).
    pub fn reference_logps(&self, r: &mut Rollout) -> anyhow::Result<()> {
        if let Some(reference) = self.reference {
            for m in &mut r.micro {
                let (lp, _) = tch::no_grad(|| self.logps(reference, m))?;
                m.ref_logps = Some(lp);
            }
        }
        Ok(())
    }

    /// Backpropagate micro-batch `i` of `r`'s share of the step loss at
    /// update `iteration` of the round (gradients accumulate into the
    /// parameters; with `gradient_checkpointing` the decoder layers and
    /// vision blocks are recomputed in the backward); adds its statistics to
    /// `s` and returns the loss value.
    pub fn micro_backward(
        &self,
        r: &mut Rollout,
        i: usize,
        iteration: usize,
        s: &mut StepStats,
    ) -> anyhow::Result<f64> {
        // Normalisers of the whole round, across ranks.
        let totals = &r.round_totals;
        let scale = StepScale { sequences: totals.sequences, tokens: totals.loss_tokens };
        let keep_old = self.p.num_iterations > 1;
        let suppressed = suppressed_tokens(self.model);
        let Some(m) = r.micro.get_mut(i) else { bail!("GRPO: no micro-batch {i} in this round") };
        let c = m.completion_len();
        let mut new_old = None;
        let micro: &crate::rollout::MicroBatch = m;
        // Logits at the last prompt token .. the second-to-last completion token.
        let span = LogitsSpan::Last(c + 1);
        let loss = self.model.forward_backward(&micro.batch(), span, self.p.gradient_checkpointing, |logits| {
            let logits = logits.narrow(1, 0, c);
            let (logps, entropy) = token_logps(&logits, &micro.completion_ids, self.p.temperature, &suppressed);
            let detached = logps.detach();
            let old = match (&micro.old_logps, iteration) {
                (Some(old), i) if i > 0 => old.shallow_clone(),
                _ => {
                    if keep_old {
                        new_old = Some(detached.copy());
                    }
                    detached.shallow_clone()
                }
            };
            if let Some((sum, real, max)) = s.sampling.as_mut() {
                let d = (&detached - &micro.sampling_logps).abs() * &micro.token_mask;
                *sum += d.sum(d.kind()).double_value(&[]);
                *max = max.max(d.max().double_value(&[]));
                *real += micro.token_mask.sum(micro.token_mask.kind()).double_value(&[]);
            }
            let inputs = LossInputs {
                logps: &logps,
                old_logps: &old,
                ref_logps: micro.ref_logps.as_ref(),
                advantages: &micro.advantages,
                mask: &micro.loss_mask,
            };
            let (loss, stats) = policy_loss(&self.loss, &inputs, &scale);
            s.loss_stats.add(&stats);
            s.entropy += (entropy * &micro.loss_mask).sum(micro.loss_mask.kind()).double_value(&[]);
            anyhow::Ok(loss)
        })?;
        if new_old.is_some() {
            m.old_logps = new_old;
        }
        Ok(loss)
    }
}

/// One metrics.jsonl row with TRL's names.
fn metrics_row(
    r: &Rollout,
    s: &StepStats,
    rewards: &Rewards,
    p: &GrpoParams,
) -> serde_json::Map<String, serde_json::Value> {
    let mut row = serde_json::Map::new();
    let mut put = |k: &str, v: f64| {
        row.insert(k.to_string(), v.into());
    };
    let t = &r.round_totals;
    let (mean, std) = mean_std(&t.rewards);
    put("reward", mean);
    put("reward_std", std);
    for (i, name) in rewards.names().iter().enumerate() {
        let col: Vec<f64> = t.scores.iter().map(|x| x[i]).collect();
        let (m, sd) = mean_std(&col);
        put(&format!("rewards/{name}/mean"), m);
        put(&format!("rewards/{name}/std"), sd);
    }
    put("frac_reward_zero_std", r.advantages.frac_zero_std);
    let ls = &s.loss_stats;
    if p.beta != 0.0 {
        put("kl", ls.per_token(ls.kl));
    }
    put("entropy", ls.per_token(s.entropy));
    put("clip_ratio/low_mean", ls.per_token(ls.low_clipped));
    put("clip_ratio/high_mean", ls.per_token(ls.high_clipped));
    put("clip_ratio/region_mean", ls.per_token(ls.region_clipped));
    let lengths: Vec<f64> = t.lengths.iter().map(|&l| l as f64).collect();
    let terminated: Vec<f64> =
        t.lengths.iter().zip(&t.truncated).filter(|(_, cut)| !**cut).map(|(&l, _)| l as f64).collect();
    put("completions/mean_length", mean_std(&lengths).0);
    put("completions/min_length", lengths.iter().copied().fold(f64::INFINITY, f64::min));
    put("completions/max_length", lengths.iter().copied().fold(0.0, f64::max));
    put("completions/clipped_ratio", 1.0 - terminated.len() as f64 / lengths.len().max(1) as f64);
    if !terminated.is_empty() {
        put("completions/mean_terminated_length", mean_std(&terminated).0);
    }
    if let Some((mean, max)) = s.sampling_diff() {
        put("sampling/sampling_logp_difference/mean", mean);
        put("sampling/sampling_logp_difference/max", max);
    }
    row
}

/// One completions.jsonl line per completion of this rank's share of round
/// `r` (trained from step `step` on).
fn completion_lines(step: usize, r: &Rollout, data: &[VqaRow], rewards: &Rewards) -> Vec<String> {
    let names = rewards.names();
    r.completions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let row = &data[r.rows[c.prompt]];
            let scores: serde_json::Map<String, serde_json::Value> =
                names.iter().zip(&r.scores[i]).map(|(n, v)| (n.to_string(), (*v).into())).collect();
            serde_json::json!({
                "step": step, "round": r.round, "id": row.id, "gold": row.answer, "prompt": r.users[c.prompt],
                "completion": c.text, "tokens": c.token_ids.len(), "finish": c.finish,
                "rewards": scores, "reward": r.rewards[i], "advantage": r.advantages.values[i],
            })
            .to_string()
        })
        .collect()
}

fn append_lines<'a>(path: &Path, lines: impl Iterator<Item = &'a String>) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    for line in lines {
        f.write_all(line.as_bytes())?;
        f.write_all(b"\n")?;
    }
    Ok(())
}
