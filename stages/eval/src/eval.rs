//! Stage `eval`: score a Qwen2.5-VL checkpoint, or a model served behind an
//! OpenAI-compatible chat API, on a Parquet VQA split.
//!
//! Inputs: `model` (backend `local`: an HF checkpoint directory, `init_model`,
//! `sft`, `grpo` output or a downloaded Qwen2.5-VL / Qwen2-VL; backend `http`
//! takes none, its model is `http.model` on the server, see [`crate::served`])
//! and `data` (a split directory: Parquet, e.g. `export.test`, `hf_vqa` /
//! `hf_disk_vqa` output or any Parquet VQA set with `question`/`answer`; or a
//! `save_to_disk` directory with our columns, `parquet_export format = "hf_arrow"`).
//! Outputs: `predictions.jsonl` + `predictions.parquet` (one row per item),
//! `metrics.json` (see [`crate::metrics::Metrics`]) and `gallery/` (a few
//! correct and wrong items with their image, for the report); names in
//! [`crate::artifacts`]. Scoring is the task contract's
//! ([`stages_task::answer::Scorer`]): the first answer block is the answer
//! (multiple choice: the letter the answer regex reads in it; free form:
//! its whole content, trimmed), `format_ok` is [`stages_task::completion`]'s
//! rule for the prompt's format. The general-VQA benchmarks are scored with
//! their harness metrics (`answer_match = "chartqa"` / `"vqa_accuracy"`,
//! [`stages_task::benchmark`]); `metrics.json` records the mean credit as
//! `score` and which dataset was scored (`source.dataset`), so the report
//! compares only evals of the same data.
//! Both backends write the same files; `http` adds `served.json` (the model
//! ids the server reported).

use std::path::Path;

use anyhow::{Context as _, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::{DeviceRequest, InputSpec, MemoryEstimate, ParamError, PlanView, Resources, StageContext, StageKind};
use stages_vlm::chat::{ChatTokenizer, Message};
use stages_vlm::device::{DeviceChoice, device_and_kind};
use stages_vlm::generate::{GenerationConfig, generate};
use stages_vlm::processor::ImageProcessor;
use stages_vlm::{Batch, Pretrained, Qwen25Vl};
use tch::Kind;

use stages_task::answer::{
    AnswerMatch, AnswerRegexError, DEFAULT_ANSWER_REGEX, Outcome, Scorer, option_letters, option_names,
};
use stages_task::dataset::{VqaRow, parquet_files, read_split};
use stages_task::prompt::{NO_THINK_TEMPLATE, PromptVariant, THINK_TEMPLATE, user_text};

use crate::artifacts::{
    GALLERY_DIR, GALLERY_JSON, METRICS_JSON, PREDICTIONS_JSONL, PREDICTIONS_PARQUET, SERVED_JSON, artifact_id,
};
use crate::chat_api::{ApiKey, ChatClient};
use crate::memory::EvalSettings;
use crate::metrics::{CiMethod, EvalSource, ScoredItem, aggregate, dataset_identity};
use crate::predictions::{Prediction, write_jsonl, write_parquet};
use crate::served::{Hooks, Item, RequestSpec, Served, ServedParams, ServedRecord};

/// Who generates the completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum EvalBackend {
    /// The `model` input (a checkpoint directory) on our own stack.
    #[default]
    Local,
    /// A model served behind an OpenAI-compatible `/chat/completions` API (the `http` table); no `model` input.
    Http,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EvalParams {
    /// `local` (the `model` input on our own stack) or `http` (a served model, see `http`).
    pub backend: EvalBackend,
    /// Backend `http`: the served model, where it is, and how to ask it.
    pub http: ServedParams,
    /// `think`, `no_think`, `cot_forcing` (think prompt + assistant turn
    /// pre-filled with `cot_prefill`), or `dataset` (the `problem` column as is).
    pub prompt: PromptVariant,
    /// Think prompt; `{Question}` is replaced by the bare question.
    pub think_template: String,
    /// No-think prompt; `{Question}` is replaced by the bare question.
    pub no_think_template: String,
    /// Text the assistant turn starts with under `cot_forcing`.
    pub cot_prefill: String,
    /// Optional system message (else the chat template's default).
    pub system: Option<String>,
    /// Generation budget per completion (the paper's evaluation: 256).
    // Qwen2.5-VL's context is 32,768 tokens, prompt included.
    #[schemars(range(min = 1, max = 32_768))]
    pub max_new_tokens: usize,
    /// 0 = greedy (the paper's evaluation); > 0 samples with `seed`.
    pub temperature: f64,
    /// Nucleus sampling threshold (1 = off).
    pub top_p: f64,
    /// Keep the k most likely tokens when sampling (0 = off).
    // Larger than any vocabulary (Qwen2.5: 151,936).
    #[schemars(range(max = 1_048_576))]
    pub top_k: usize,
    /// Sampling seed; defaults to the recipe seed.
    pub seed: Option<u64>,
    /// Prompts per generate call (backend `local`).
    #[schemars(range(min = 1, max = 4096))]
    pub batch_size: usize,
    /// Regex searched in the completion's first `<answer>...</answer>` block
    /// (tags included); its first group is the answer. Default: `<answer>\s*(\w+)\s*</answer>`
    /// for `choice`; for free-form matching the whole block content, trimmed.
    pub answer_regex: Option<String>,
    /// `choice` (option letters), free-form `exact` / `relaxed` (numbers
    /// within 5%), or a benchmark's own metric as lmms-eval computes it:
    /// `chartqa` (relaxed accuracy) or `vqa_accuracy` (TextVQA, over the
    /// `answers` column's 10 human answers).
    pub answer_match: AnswerMatch,
    /// Confidence intervals: `{ method = "wilson" }` or
    /// `{ method = "bootstrap", resamples = 1000, seed = 0 }` (resamples in 1..=1000000).
    pub ci: CiMethod,
    /// Evaluate only the first `limit` items (quick looks).
    #[schemars(range(min = 1, max = 100_000_000))]
    pub limit: Option<usize>,
    /// Backend `local`: `auto` (float32 on CPU, bfloat16 on CUDA), `float32`, `bfloat16`, `float16`.
    pub dtype: String,
    /// Backend `local`: `cpu`, `auto` (CUDA when present) or `cuda`.
    pub device: DeviceChoice,
    /// Correct and wrong examples (each) kept with their image for the report gallery.
    // Examples embedded in report.html, with their images.
    #[schemars(range(max = 10_000))]
    pub gallery: usize,
}

impl Default for EvalParams {
    fn default() -> Self {
        Self {
            backend: EvalBackend::Local,
            http: ServedParams::default(),
            prompt: PromptVariant::Think,
            think_template: THINK_TEMPLATE.into(),
            no_think_template: NO_THINK_TEMPLATE.into(),
            cot_prefill: "<think>".into(),
            system: None,
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            batch_size: 8,
            answer_regex: None,
            answer_match: AnswerMatch::Choice,
            ci: CiMethod::Wilson,
            limit: None,
            dtype: "auto".into(),
            device: DeviceChoice::Cpu,
            gallery: 3,
        }
    }
}

impl EvalParams {
    /// The regex that reads a multiple-choice answer (the recipe's, else the default).
    pub fn choice_regex(&self) -> &str {
        self.answer_regex.as_deref().unwrap_or(DEFAULT_ANSWER_REGEX)
    }

    /// The scorer of this eval: its answer extraction and matching, and the
    /// format rule of its prompt variant.
    pub fn scorer(&self) -> Result<Scorer, AnswerRegexError> {
        let format = self.prompt.response_format();
        match (&self.answer_regex, self.answer_match.is_free_form()) {
            (Some(re), _) => Scorer::new(re, format, self.answer_match),
            (None, false) => Scorer::new(DEFAULT_ANSWER_REGEX, format, self.answer_match),
            (None, true) => Ok(Scorer::block(format, self.answer_match)),
        }
    }

    /// The text the assistant turn starts with (`cot_forcing`), or empty.
    pub fn prefill(&self) -> &str {
        if self.prompt == PromptVariant::CotForcing { &self.cot_prefill } else { "" }
    }
}

/// Score one completion of `row` into a prediction.
pub fn predict(
    scorer: &Scorer,
    row: &VqaRow,
    prompt: String,
    completion: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    finish: String,
) -> Prediction {
    let letters = option_letters(&row.options);
    let score = scorer.score_answers(&completion, &row.answer, &row.answers, &letters);
    let predicted_class = match (&score.extracted, score.valid, row.options.is_empty()) {
        (Some(a), true, false) => letters.iter().position(|l| l == a).map(|i| option_names(&row.options)[i].clone()),
        // Free form: a correct answer names the gold class, anything else is "other".
        (Some(_), true, true) => Some(if score.correct { row.class_name.clone() } else { "other".into() }),
        _ => None,
    };
    Prediction {
        id: row.id.clone(),
        class: row.class.clone(),
        class_name: row.class_name.clone(),
        gold: row.answer.clone(),
        answers: row.answers.clone(),
        options: row.options.clone(),
        prompt,
        completion,
        extracted: score.extracted,
        predicted_class,
        failure: score.failure,
        format_ok: score.format_ok,
        valid: score.valid,
        correct: score.correct,
        credit: Some(score.credit),
        outcome: score.outcome,
        prompt_tokens,
        completion_tokens,
        finish,
    }
}

/// Metrics of a list of predictions (class order: the first item's options).
pub fn metrics_of(predictions: &[Prediction], ci: CiMethod) -> crate::metrics::Metrics {
    let classes = predictions.first().map(|p| option_names(&p.options)).unwrap_or_default();
    let items: Vec<ScoredItem> = predictions
        .iter()
        .map(|p| ScoredItem {
            class: p.class_name.clone(),
            predicted_class: p.predicted_class.clone(),
            score: stages_task::answer::ItemScore {
                extracted: p.extracted.clone(),
                failure: p.failure,
                format_ok: p.format_ok,
                valid: p.valid,
                correct: p.correct,
                credit: p.credit(),
                outcome: p.outcome,
            },
            completion_tokens: p.completion_tokens,
            completion_chars: p.completion.chars().count(),
        })
        .collect();
    aggregate(&items, &classes, ci)
}

/// A loaded checkpoint ready to answer prompts.
pub struct Answerer {
    pub model: Qwen25Vl,
    pub tokenizer: ChatTokenizer,
    pub processor: ImageProcessor,
}

impl Answerer {
    pub fn load(dir: &Path, kind: Kind, device: tch::Device) -> anyhow::Result<Self> {
        let Pretrained { model, tokenizer, processor } = Pretrained::load(dir, kind, device)?;
        Ok(Self { model, tokenizer, processor })
    }

    /// Text-only chat completions (the judge's `model` backend), one per user text.
    pub fn complete_texts(
        &self,
        users: &[String],
        system: Option<&str>,
        cfg: &GenerationConfig,
    ) -> anyhow::Result<Vec<String>> {
        let mut texts = Vec::with_capacity(users.len());
        for u in users {
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(Message::text("system", s));
            }
            messages.push(Message::text("user", u));
            texts.push(self.tokenizer.render(&messages, true)?);
        }
        let enc = self.tokenizer.encode_batch(&texts)?;
        let input_ids = enc.input_ids.to_device(self.model.device);
        let attention_mask = enc.attention_mask.to_device(self.model.device);
        let batch =
            Batch { input_ids: &input_ids, attention_mask: &attention_mask, pixel_values: None, image_grid_thw: &[] };
        Ok(generate(&self.model, Some(&self.tokenizer), &batch, cfg)?.into_iter().map(|c| c.text).collect())
    }
}

/// Generated text and token counts for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The prefill (if any) followed by the generated text.
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// `eos`, `stop_string` or `length`.
    pub finish: String,
}

/// The local backend on one batch: the chat message of every row (system,
/// image, user text, then the `cot_forcing` prefill) through `a`.
pub fn generate_batch(
    a: &Answerer,
    rows: &[&VqaRow],
    users: &[String],
    params: &EvalParams,
    cfg: &GenerationConfig,
) -> anyhow::Result<Vec<Generated>> {
    let prefill = params.prefill();
    let mut images = Vec::new();
    let mut texts = Vec::with_capacity(rows.len());
    let mut counts_per_row = Vec::with_capacity(rows.len());
    for (row, user) in rows.iter().zip(users) {
        let mut messages = Vec::new();
        if let Some(s) = &params.system {
            messages.push(Message::text("system", s));
        }
        let n_images = usize::from(row.image.is_some());
        messages.push(Message::user_with_images(n_images, user));
        texts.push(format!("{}{prefill}", a.tokenizer.render(&messages, true)?));
        if let Some(bytes) = &row.image {
            images.push(
                image::load_from_memory(bytes)
                    .with_context(|| format!("item `{}`: column `image.bytes` is not a decodable image", row.id))?,
            );
        }
        counts_per_row.push(n_images);
    }
    let (pixel_values, grid) = if images.is_empty() {
        (None, Vec::new())
    } else {
        let vis = a.processor.process(&images)?;
        let counts = vis.tokens_per_image(a.processor.merge_size);
        let mut next = 0;
        for (text, n) in texts.iter_mut().zip(&counts_per_row) {
            *text = ChatTokenizer::expand_image_pads(text, &counts[next..next + n])?;
            next += n;
        }
        (Some(vis.pixel_values.to_device(a.model.device).to_kind(a.model.kind)), vis.grid_thw)
    };
    let enc = a.tokenizer.encode_batch(&texts)?;
    let input_ids = enc.input_ids.to_device(a.model.device);
    let attention_mask = enc.attention_mask.to_device(a.model.device);
    let batch = Batch {
        input_ids: &input_ids,
        attention_mask: &attention_mask,
        pixel_values: pixel_values.as_ref(),
        image_grid_thw: &grid,
    };
    let out = generate(&a.model, Some(&a.tokenizer), &batch, cfg)?;
    Ok(out
        .into_iter()
        .map(|c| Generated {
            text: format!("{prefill}{}", c.text),
            prompt_tokens: enc.lengths[c.prompt],
            completion_tokens: c.token_ids.len(),
            finish: serde_json::to_value(c.finish)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        })
        .collect())
}

/// The split an eval scores: the data input's output name (`export.train` ->
/// `train`), else the prefix of HF-style shard names (`test-00000-of-00001.parquet`).
pub fn split_name(output: Option<&str>, data: &Path) -> Option<String> {
    if let Some(o) = output {
        return Some(o.to_string());
    }
    let files = parquet_files(data).ok()?;
    let name = files.first()?.file_stem()?.to_str()?;
    let (prefix, rest) = name.split_once('-')?;
    let shard = rest
        .split_once("-of-")
        .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit()));
    (shard && !prefix.is_empty()).then(|| prefix.to_string())
}

/// File-name-safe version of an item id.
pub fn safe_name(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Keep the first `n` correct and `n` wrong items (with an image) for the report.
fn write_gallery(dir: &Path, rows: &[VqaRow], preds: &[Prediction], n: usize) -> anyhow::Result<()> {
    let mut kept = Vec::new();
    for want_correct in [true, false] {
        let picks = rows.iter().zip(preds).filter(|(r, p)| p.correct == want_correct && r.image.is_some()).take(n);
        for (r, p) in picks {
            let file = format!("{}.img", safe_name(&r.id));
            if let Some(bytes) = &r.image {
                std::fs::write(dir.join(&file), bytes)
                    .with_context(|| format!("writing {}", dir.join(&file).display()))?;
            }
            kept.push(serde_json::json!({"id": p.id, "image": file}));
        }
    }
    let path = dir.join(GALLERY_JSON);
    std::fs::write(&path, serde_json::to_string_pretty(&kept)?).with_context(|| format!("writing {}", path.display()))
}

impl EvalParams {
    /// What the memory prediction reads (`crate::memory`).
    pub fn memory_settings(&self) -> EvalSettings<'_> {
        let template = match self.prompt {
            PromptVariant::NoThink => self.no_think_template.len(),
            PromptVariant::Think | PromptVariant::CotForcing => self.think_template.len() + self.cot_prefill.len(),
            PromptVariant::Dataset => 0,
        };
        let batch = self.limit.map_or(self.batch_size, |l| l.min(self.batch_size));
        EvalSettings {
            dtype: &self.dtype,
            batch: batch as u64,
            max_new_tokens: self.max_new_tokens as u64,
            template_chars: template as u64,
        }
    }
}

/// Completions from the `model` input, `batch_size` prompts per generate call.
fn generate_local(
    params: &EvalParams,
    ctx: &StageContext,
    rows: &[VqaRow],
    users: &[String],
    seed: u64,
) -> anyhow::Result<Vec<Generated>> {
    let model_dir = ctx.input("model")?;
    let (device, kind) = device_and_kind(ctx, &params.dtype)?;
    let answerer = Answerer::load(model_dir, kind, device)?;
    let cfg = GenerationConfig {
        max_new_tokens: params.max_new_tokens,
        temperature: params.temperature,
        top_p: params.top_p,
        top_k: params.top_k,
        seed,
        eos_token_ids: answerer.tokenizer.eos_ids.iter().map(|&e| i64::from(e)).collect(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(rows.len());
    for (chunk_rows, chunk_users) in rows.chunks(params.batch_size).zip(users.chunks(params.batch_size)) {
        ctx.check_cancelled()?;
        let refs: Vec<&VqaRow> = chunk_rows.iter().collect();
        // Each batch gets its own seed so sampled runs do not depend on batch order.
        let batch_cfg = GenerationConfig { seed: cfg.seed.wrapping_add(out.len() as u64), ..cfg.clone() };
        let generated = generate_batch(&answerer, &refs, chunk_users, params, &batch_cfg)
            .with_context(|| format!("generating for items starting at `{}`", chunk_rows[0].id))?;
        out.extend(generated);
        ctx.progress().advance(chunk_rows.len() as u64);
    }
    Ok(out)
}

/// Completions from the served `http.model` (see [`crate::served`]).
fn generate_served(
    params: &EvalParams,
    ctx: &StageContext,
    rows: &[VqaRow],
    users: &[String],
    seed: u64,
) -> anyhow::Result<(Vec<Generated>, ServedRecord)> {
    let http = &params.http;
    let api_key = ApiKey::from_env(http.api_key_env.as_deref(), "http.api_key_env")?;
    let client = ChatClient::new(http.client_config(), api_key);
    // Where the local backend stops: its generation defaults.
    let stop_strings = GenerationConfig::default().stop_strings;
    let served = Served {
        client: &client,
        spec: RequestSpec {
            model: &http.model,
            system: params.system.as_deref(),
            prefill: params.prefill(),
            max_tokens: params.max_new_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            seed,
            extra_body: &http.extra_body,
        },
        stop_strings: &stop_strings,
        concurrency: http.concurrency,
        api_key_env: http.api_key_env.as_deref(),
    };
    let items: Vec<Item<'_>> =
        rows.iter().zip(users).map(|(r, u)| Item { id: &r.id, image: r.image.as_deref(), user: u }).collect();
    let resume_dir = ctx.resume_dir()?.to_path_buf();
    let cancelled = || ctx.is_cancelled();
    let hooks = Hooks { progress: ctx.progress(), cancelled: &cancelled };
    tracing::info!(model = %http.model, url = %client.endpoint(), concurrency = http.concurrency, "asking the served model");
    let run = served.answer_all(&items, &resume_dir, &hooks)?;
    let record = ServedRecord::of(&http.model, params.prefill(), &run.replies);
    tracing::info!(
        requests = run.requests,
        resumed = run.resumed,
        server_models = ?record.server_models,
        "served replies complete"
    );
    let generated = run
        .replies
        .into_iter()
        .map(|r| Generated {
            text: r.text,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            finish: r.finish,
        })
        .collect();
    Ok((generated, record))
}

pub struct Eval;

impl StageKind for Eval {
    type Params = EvalParams;
    const KIND: &'static str = "eval";
    // v2: metrics.json records its `source` (model, data, split, prompt).
    // v3: sampling (temperature > 0) draws candidates in vocabulary order (no full sort).
    // v4: the task contract's format rule (one non-empty think and answer block,
    //     whitespace around allowed) and answer from the first answer block;
    //     `format_regex` is gone (one format definition for eval, GRPO, judge).
    // v5: free-form answers are the whole answer block (not `(\w+)`); gold
    //     answer lists, `chartqa` / `vqa_accuracy` matching and the mean credit
    //     (`score`); `source` records the dataset identity and the matching.
    // (The `http` backend added params, not a version: local results are unchanged.)
    // v6: tokens chosen on the device (top-k / nucleus candidates drawn in
    //     vocabulary order) and finished rows dropped from the decode batch.
    //     Dropping rows changes the batch shape of every matmul, so logits can
    //     move in the last bits: at 7B decoder shapes a sampled completion
    //     came out 3 tokens longer (decode_bench), and greedy near-ties can
    //     flip the same way.
    const VERSION: u32 = 6;
    const SUMMARY: &'static str = "Score a Qwen2.5-VL / Qwen2-VL checkpoint, or a model served behind an OpenAI-compatible API, on a VQA split: predictions, accuracy (overall, per class, CI) or a benchmark metric (ChartQA, TextVQA), format/validity";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[
            InputSpec::optional(
                "model",
                "HF Qwen2.5-VL or Qwen2-VL checkpoint directory (init_model / sft / grpo output); backend `local` only",
            ),
            InputSpec::one(
                "data",
                "Split directory (e.g. `export.test`, an `hf_vqa` / `hf_disk_vqa` output) or a Parquet VQA file",
            ),
        ];
        INPUTS
    }

    fn resources(p: &Self::Params) -> Resources {
        match p.backend {
            EvalBackend::Local => Resources { cpu: 0, device: p.device.request(), memory_mb: 4096, libtorch: true },
            // Request threads wait on the network: one core, no device.
            _ => Resources { cpu: 1, device: DeviceRequest::Cpu, memory_mb: 512, libtorch: false },
        }
    }

    fn unkeyed_params(p: &Self::Params) -> Vec<&'static str> {
        match p.backend {
            // Where the server is and how patiently it is asked cannot change
            // its replies (seeds are per item, failures fail the stage), so
            // moving a server keeps its cached results. The served model's
            // name and the request params stay in the key.
            EvalBackend::Http => crate::served::UNKEYED.to_vec(),
            // Irrelevant to a local run, but keyed as they always were.
            EvalBackend::Local => Vec::new(),
        }
    }

    fn memory(p: &Self::Params, plan: &PlanView) -> MemoryEstimate {
        match p.backend {
            EvalBackend::Local => crate::memory::eval_memory(&p.memory_settings(), plan),
            // The model lives on the server: the fixed request-thread budget stands.
            EvalBackend::Http => MemoryEstimate::NotModelled,
        }
    }

    fn validate(p: &Self::Params) -> Result<(), ParamError> {
        // Written positively so NaN fails too.
        let ok = p.temperature >= 0.0 && p.top_p > 0.0 && p.top_p <= 1.0;
        if !ok {
            return Err(ParamError::new(&["temperature"], "temperature must be >= 0 and top_p in (0, 1]"));
        }
        if !["auto", "float32", "bfloat16", "float16"].contains(&p.dtype.as_str()) {
            return Err(ParamError::new(
                &["dtype"],
                format!("expected auto, float32, bfloat16 or float16, got {:?}", p.dtype),
            ));
        }
        for (key, t) in [("think_template", &p.think_template), ("no_think_template", &p.no_think_template)] {
            if !t.contains("{Question}") {
                return Err(ParamError::new(&[key], "must contain the `{Question}` placeholder"));
            }
        }
        if p.backend == EvalBackend::Http {
            p.http.validate()?;
        }
        p.scorer().map(|_| ()).map_err(|e| ParamError::new(&["answer_regex"], e.to_string()))
    }

    fn validate_inputs(p: &Self::Params, given: &[&str]) -> Result<(), ParamError> {
        let has_model = given.contains(&"model");
        match p.backend {
            EvalBackend::Local if !has_model => Err(ParamError::new(
                &["backend"],
                "backend `local` needs the `model` input (a checkpoint directory)",
            )
            .with_hint("add `model = \"STAGE\"`, or score a served model: `backend = \"http\"` with `http = { url = ..., model = ... }`")),
            EvalBackend::Http if has_model => Err(ParamError::new(
                &["backend"],
                "backend `http` asks the served `http.model`; the `model` input would be ignored",
            )
            .with_hint("remove the `model` input, or set `backend = \"local\"`")),
            _ => Ok(()),
        }
    }

    fn run(params: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()> {
        let data = ctx.input("data")?.to_path_buf();
        let mut rows = read_split(&data).with_context(|| format!("reading the eval split {}", data.display()))?;
        if let Some(n) = params.limit {
            rows.truncate(n);
        }
        if rows.is_empty() {
            bail!("{}: the split has no rows to evaluate", data.display());
        }
        if params.answer_match.needs_answer_list()
            && let Some(r) = rows.iter().find(|r| r.answers.is_empty())
        {
            bail!(
                "{}: item `{}` has no gold answer list: `answer_match = \"vqa_accuracy\"` scores against \
                 every human answer, read from an `answers` column (an `hf_vqa` stage with `preset = \"textvqa\"` \
                 writes it)",
                data.display(),
                r.id
            );
        }
        let users: Vec<String> = rows
            .iter()
            .map(|r| {
                user_text(&r.problem, params.prompt, &params.think_template, &params.no_think_template)
                    .map_err(|e| anyhow::anyhow!("item `{}`: {e}", r.id))
            })
            .collect::<anyhow::Result<_>>()?;
        let scorer = params.scorer()?;
        let seed = params.seed.unwrap_or_else(|| ctx.seed());
        tracing::info!(items = rows.len(), prompt = ?params.prompt, backend = ?params.backend, "evaluating");
        ctx.progress().start("eval", rows.len() as u64);
        let (generated, model, served) = match params.backend {
            EvalBackend::Local => {
                let model_input = ctx.inputs("model").first().context("input `model` is missing")?;
                let model = artifact_id(model_input);
                let _threads = stages_vlm::ThreadsGuard::set(ctx.threads());
                (generate_local(params, ctx, &rows, &users, seed)?, model, None)
            }
            EvalBackend::Http => {
                let (generated, record) = generate_served(params, ctx, &rows, &users, seed)?;
                (generated, format!("served:{}", params.http.model), Some(record))
            }
        };
        ctx.progress().finish();
        let predictions: Vec<Prediction> = rows
            .iter()
            .zip(&users)
            .zip(generated)
            .map(|((row, user), g)| {
                predict(&scorer, row, user.clone(), g.text, g.prompt_tokens, g.completion_tokens, g.finish)
            })
            .collect();
        let mut metrics = metrics_of(&predictions, params.ci);
        let data_input = ctx.inputs("data").first().context("input `data` is missing")?;
        let label = |v: serde_json::Value| v.as_str().unwrap_or_default().to_string();
        metrics.source = Some(EvalSource {
            model,
            data: artifact_id(data_input),
            split: split_name(data_input.output.as_deref(), &data),
            prompt: label(serde_json::to_value(params.prompt)?),
            dataset: Some(dataset_identity(&data_input.stage, data_input.output.as_deref(), params.limit)),
            answer_match: Some(label(serde_json::to_value(params.answer_match)?)),
        });
        let out = ctx.output_dir().to_path_buf();
        write_jsonl(&out.join(PREDICTIONS_JSONL), &predictions)?;
        write_parquet(&out.join(PREDICTIONS_PARQUET), &predictions)?;
        let mpath = out.join(METRICS_JSON);
        std::fs::write(&mpath, serde_json::to_string_pretty(&metrics)?)
            .with_context(|| format!("writing {}", mpath.display()))?;
        if let Some(record) = served {
            let path = out.join(SERVED_JSON);
            std::fs::write(&path, serde_json::to_string_pretty(&record)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        write_gallery(&ctx.output(GALLERY_DIR)?, &rows, &predictions, params.gallery)?;
        let unparseable = predictions.iter().filter(|p| p.outcome == Outcome::Unparseable).count();
        tracing::info!(
            accuracy = metrics.accuracy.value,
            score = metrics.headline().value,
            format = metrics.format_rate.value,
            unparseable,
            "eval done"
        );
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use stage_api::StageKind as _;
    use stages_vlm::InitModel;

    use super::*;
    use crate::predictions::read_jsonl;

    fn png(w: u32, h: u32, shade: u8) -> Vec<u8> {
        let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([shade.wrapping_add((x * 3 + y) as u8)]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    pub(crate) fn tiny_model(dir: &Path) -> std::path::PathBuf {
        let out = dir.join("model");
        let mut ctx = StageContext::builder("tiny", &out).seed(3).build().unwrap();
        InitModel::run(&Default::default(), &mut ctx).unwrap();
        out
    }

    #[test]
    fn predictions_map_letters_to_class_names() {
        let row = VqaRow {
            id: "r".into(),
            image: None,
            problem: "q".into(),
            answer: "B".into(),
            answers: Vec::new(),
            options: vec!["A. airway abnormalities".into(), "B. emphysema".into()],
            class: "emphysema".into(),
            class_name: "emphysema".into(),
        };
        let s = EvalParams::default().scorer().unwrap();
        let p = predict(&s, &row, "q".into(), "<think>x</think><answer>A</answer>".into(), 3, 4, "eos".into());
        assert_eq!((p.predicted_class.as_deref(), p.correct, p.format_ok), (Some("airway abnormalities"), false, true));
        let m = metrics_of(&[p], CiMethod::Wilson);
        assert_eq!(m.confusion.classes, vec!["airway abnormalities", "emphysema"]);
        assert_eq!(m.confusion.counts[1][0], 1);
    }

    #[test]
    fn free_form_evals_read_the_whole_block_and_score_every_answer() {
        let humans: Vec<String> = (0..10).map(|i| if i < 3 { "Stop Sign".into() } else { format!("x{i}") }).collect();
        let row = VqaRow {
            id: "t/1".into(),
            problem: "What does the sign say?".into(),
            answer: "stop sign".into(),
            answers: humans.clone(),
            class: "all".into(),
            class_name: "all".into(),
            ..Default::default()
        };
        let params =
            EvalParams { answer_match: AnswerMatch::VqaAccuracy, prompt: PromptVariant::NoThink, ..Default::default() };
        let p = predict(
            &params.scorer().unwrap(),
            &row,
            "q".into(),
            "<answer> stop sign. </answer>".into(),
            1,
            2,
            "eos".into(),
        );
        assert_eq!(p.extracted.as_deref(), Some("stop sign."), "two words and a period: the whole block");
        assert!((p.credit() - 0.9).abs() < 1e-12 && !p.correct, "3 of 10 humans: 0.9");
        assert_eq!(p.answers, humans);
        let m = metrics_of(&[p], CiMethod::Wilson);
        assert!((m.headline().value - 0.9).abs() < 1e-12 && m.accuracy.k == 0);
        // An explicit regex still wins.
        let params = EvalParams { answer_regex: Some(DEFAULT_ANSWER_REGEX.into()), ..params };
        let p = predict(
            &params.scorer().unwrap(),
            &row,
            "q".into(),
            "<answer>stop sign</answer>".into(),
            1,
            2,
            "eos".into(),
        );
        assert_eq!(p.outcome, Outcome::Unparseable);
    }

    #[test]
    fn vqa_accuracy_without_answer_lists_is_refused_before_loading_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let row = VqaRow { id: "q7".into(), problem: "q".into(), answer: "a".into(), ..Default::default() };
        stages_task::dataset::write_rows(&data.join("val-00000-of-00001.parquet"), &[row]).unwrap();
        let mut ctx = StageContext::builder("eval", dir.path().join("out"))
            .input("model", "m", None, dir.path().join("no-model"))
            .input("data", "textvqa", None, &data)
            .build()
            .unwrap();
        let params = EvalParams { answer_match: AnswerMatch::VqaAccuracy, ..Default::default() };
        let err = format!("{:#}", Eval::run(&params, &mut ctx).unwrap_err());
        assert!(err.contains("item `q7` has no gold answer list") && err.contains("`answers` column"), "{err}");
    }

    #[test]
    fn split_names_come_from_the_output_or_the_shard_prefix() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(split_name(Some("train"), dir.path()).as_deref(), Some("train"));
        assert_eq!(split_name(None, dir.path()), None, "no parquet files");
        std::fs::write(dir.path().join("val-00000-of-00002.parquet"), b"").unwrap();
        assert_eq!(split_name(None, dir.path()).as_deref(), Some("val"));
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("chartqa.parquet"), b"").unwrap();
        assert_eq!(split_name(None, &other), None);
    }

    #[test]
    fn validate_names_bad_keys() {
        let bad = EvalParams { answer_regex: Some("(".into()), ..Default::default() };
        assert!(format!("{:?}", Eval::validate(&bad).unwrap_err()).contains("answer_regex"));
        assert!(Eval::validate(&EvalParams::default()).is_ok());
        // Counts and sizes, through the recipe path: their declared ranges.
        let path = |src: &str| stage_api::configure_params::<Eval>(src.parse().unwrap()).unwrap_err().path.join(".");
        assert_eq!(path("batch_size = 0"), "batch_size");
        assert_eq!(path("max_new_tokens = 1_099_511_627_776"), "max_new_tokens");
        assert_eq!(path("ci = { method = \"bootstrap\", resamples = 0, seed = 1 }"), "ci.resamples");
        stage_api::configure_params::<Eval>("max_new_tokens = 256\nbatch_size = 16".parse().unwrap()).unwrap();
    }

    #[test]
    fn eval_runs_a_tiny_checkpoint_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path());
        let data = dir.path().join("test");
        std::fs::create_dir_all(&data).unwrap();
        let q = THINK_TEMPLATE.replace("{Question}", "Which lesion?\nOptions:\nA. airway abnormalities\nB. emphysema");
        let options: Vec<String> =
            ["A. airway abnormalities", "B. emphysema", "C. ground-glass opacity"].map(String::from).to_vec();
        let row = |id: &str, image: Vec<u8>, answer: &str, class: &str, class_name: &str| VqaRow {
            id: id.into(),
            image: Some(image),
            problem: q.clone(),
            answer: answer.into(),
            answers: Vec::new(),
            options: options.clone(),
            class: class.into(),
            class_name: class_name.into(),
        };
        stages_task::dataset::write_rows(
            &data.join("test-00000-of-00001.parquet"),
            &[
                row("c1/a/1", png(56, 56, 10), "A", "airway", "airway abnormalities"),
                row("c2/b/2", png(64, 56, 90), "B", "emphysema", "emphysema"),
                row("c3/c/3", png(56, 84, 200), "C", "ggo", "ground-glass opacity"),
            ],
        )
        .unwrap();
        let out = dir.path().join("eval");
        let mut ctx = StageContext::builder("eval", &out)
            .input("model", "tiny", None, &model)
            .input("data", "export", Some("test"), &data)
            .seed(5)
            .build()
            .unwrap();
        let params = EvalParams {
            prompt: PromptVariant::CotForcing,
            max_new_tokens: 6,
            batch_size: 2,
            gallery: 1,
            ..Default::default()
        };
        Eval::run(&params, &mut ctx).unwrap();
        let preds = read_jsonl(&out.join(PREDICTIONS_JSONL)).unwrap();
        assert_eq!(preds.len(), 3);
        for p in &preds {
            assert!(p.completion.starts_with("<think>"), "forced prefix kept: {:?}", p.completion);
            assert!(p.prompt.contains("Think through") && p.prompt_tokens > 10);
            assert!(p.completion_tokens >= 1 && p.completion_tokens <= 6);
            // The stored verdict is the scorer's verdict on the stored text.
            let again = params.scorer().unwrap().score(&p.completion, &p.gold, &option_letters(&p.options));
            assert_eq!((again.correct, again.outcome), (p.correct, p.outcome));
        }
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(METRICS_JSON)).unwrap()).unwrap();
        assert_eq!(m["n"], 3);
        assert_eq!(
            m["source"],
            serde_json::json!({
                "model": "tiny", "data": "export.test", "split": "test", "prompt": "cot_forcing",
                "dataset": "export.test", "answer_match": "choice"
            })
        );
        assert_eq!(m["score"]["value"], m["accuracy"]["value"], "binary matching: score is accuracy");
        assert_eq!(m["accuracy"]["k"], preds.iter().filter(|p| p.correct).count() as u64);
        assert!(m["confusion"]["counts"].as_array().unwrap().len() >= 3);
        assert!(out.join(PREDICTIONS_PARQUET).is_file());
        let gallery: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(out.join(GALLERY_DIR).join(GALLERY_JSON)).unwrap()).unwrap();
        assert!(!gallery.is_empty() && gallery.len() <= 2);
        // Greedy decoding is deterministic: a second run gives the same rows.
        let out2 = dir.path().join("eval2");
        let mut ctx2 = StageContext::builder("eval", &out2)
            .input("model", "tiny", None, &model)
            .input("data", "export", Some("test"), &data)
            .build()
            .unwrap();
        Eval::run(&EvalParams { batch_size: 3, ..params.clone() }, &mut ctx2).unwrap();
        let again = read_jsonl(&out2.join(PREDICTIONS_JSONL)).unwrap();
        let texts = |v: &[Prediction]| v.iter().map(|p| p.completion.clone()).collect::<Vec<_>>();
        assert_eq!(texts(&again), texts(&preds), "batching must not change greedy completions");
    }

    /// A Qwen2-VL checkpoint (MedVLM-R1, Med-R1) evaluates through the same
    /// path: `Pretrained::load` picks the architecture from `model_type`.
    #[test]
    fn eval_runs_a_tiny_qwen2_vl_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        let mut ctx = StageContext::builder("tiny", &model).seed(3).build().unwrap();
        let init = stages_vlm::init_model::InitModelParams { model_type: "qwen2_vl".into(), ..Default::default() };
        InitModel::run(&init, &mut ctx).unwrap();
        let data = dir.path().join("test");
        std::fs::create_dir_all(&data).unwrap();
        let row = |id: &str, image: Vec<u8>, answer: &str| VqaRow {
            id: id.into(),
            image: Some(image),
            problem: "Which lesion?\nOptions:\nA. airway abnormalities\nB. emphysema".into(),
            answer: answer.into(),
            options: vec!["A. airway abnormalities".into(), "B. emphysema".into()],
            class: "c".into(),
            class_name: "airway abnormalities".into(),
            answers: Vec::new(),
        };
        let rows = [row("a/1", png(56, 84, 10), "A"), row("b/2", png(64, 56, 90), "B")];
        stages_task::dataset::write_rows(&data.join("test-00000-of-00001.parquet"), &rows).unwrap();
        let out = dir.path().join("eval");
        let mut ctx = StageContext::builder("eval", &out)
            .input("model", "tiny", None, &model)
            .input("data", "export", Some("test"), &data)
            .build()
            .unwrap();
        Eval::run(&EvalParams { max_new_tokens: 4, batch_size: 2, ..Default::default() }, &mut ctx).unwrap();
        let preds = read_jsonl(&out.join(PREDICTIONS_JSONL)).unwrap();
        assert_eq!(preds.len(), 2);
        assert!(preds.iter().all(|p| p.completion_tokens >= 1 && p.completion_tokens <= 4 && p.prompt_tokens > 10));
    }
}
