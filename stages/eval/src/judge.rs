//! Stage `judge`: does the reasoning support the final answer? (the paper's
//! reasoning-answer consistency, 97.98% vs 91.17%).
//!
//! For every prediction of an `eval` output whose completion is in the think
//! format ([`stages_task::completion`]: the same rule as the eval's format
//! metric and the GRPO format reward) and whose answer is valid, a backend
//! names the class the reasoning (the `<think>` block) supports; the verdict
//! is consistent when it equals the class of the extracted answer (the
//! completion's one answer block). Completions outside the format are skipped.
//! Backends: `rules` (offline synonym matching), `http` (an
//! OpenAI-compatible chat endpoint, e.g. vLLM / llama.cpp serving gpt-oss-20b)
//! and `model` (a local checkpoint run by our own stack: any Qwen2 / Qwen2.5
//! text checkpoint, `Qwen2ForCausalLM`, or a Qwen2.5-VL one, asked text only).
//!
//! Outputs: `verdicts.jsonl` (one row per prediction: nothing is dropped,
//! skipped items and endpoint failures are rows too) and `consistency.json`
//! (rate with 95% CI over judged items, counts of skipped / undetermined / errors).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rayon::prelude::*;
use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::{InputSpec, ParamError, Resources, StageContext, StageKind};

use stages_vlm::device::{DeviceChoice, device_and_kind};
use stages_vlm::generate::GenerationConfig;

use stages_task::answer::{option_letters, option_names};
use stages_task::completion::{Completion, ResponseFormat};

use crate::artifacts::{CONSISTENCY_JSON, PREDICTIONS_JSONL, VERDICTS_JSONL, artifact_id, predictions_digest};
use crate::chat_api::{ApiKey, ChatClient, ClientConfig, message_content};
use crate::eval::Answerer;
use crate::metrics::{CiMethod, Rate};
use crate::predictions::{Prediction, read_jsonl};

pub const DEFAULT_JUDGE_PROMPT: &str = "Below is the reasoning a model wrote about a chest CT slice before answering a multiple-choice question.\n\nReasoning:\n{reasoning}\n\nOptions:\n{options}\n\nBased only on this reasoning, which option is the most probable diagnosis? Reply with the single option letter only.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Offline: the class the reasoning names (synonym table), see `pick`.
    #[default]
    Rules,
    /// An OpenAI-compatible `/chat/completions` endpoint.
    Http,
    /// A local checkpoint (input `judge_model`) run by our own stack, text
    /// only: a Qwen2/Qwen2.5 causal LM or a Qwen2.5-VL checkpoint.
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pick {
    /// The class mentioned last (reasoning usually concludes at its end).
    #[default]
    Last,
    /// The class mentioned most often (ties: the one mentioned last).
    Most,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LocalModelParams {
    /// Reply budget in tokens (greedy decoding).
    pub max_new_tokens: usize,
    /// Prompts per generate call.
    pub batch_size: usize,
    /// `auto` (float32 on CPU, bfloat16 on CUDA), `float32`, `bfloat16`, `float16`.
    pub dtype: String,
    /// `cpu`, `auto` or `cuda`.
    pub device: DeviceChoice,
}

impl Default for LocalModelParams {
    fn default() -> Self {
        Self { max_new_tokens: 32, batch_size: 8, dtype: "auto".into(), device: DeviceChoice::Cpu }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HttpParams {
    /// Base URL of the API, e.g. `http://127.0.0.1:8000/v1` (`/chat/completions` is appended).
    pub url: String,
    /// Model name sent in the request (what the server serves).
    pub model: String,
    /// Name of an environment variable holding a bearer token (optional).
    pub api_key_env: Option<String>,
    /// Per-request timeout in seconds.
    pub timeout_s: f64,
    /// Retries after a timeout, connection error, 429 or 5xx (then the item is reported as an error).
    pub retries: u32,
    /// First backoff in seconds; doubles after each failed attempt.
    pub backoff_s: f64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Reply budget (reasoning judges such as gpt-oss think before answering).
    pub max_tokens: u32,
    /// Optional system message.
    pub system: Option<String>,
}

impl Default for HttpParams {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8000/v1".into(),
            model: "gpt-oss-20b".into(),
            api_key_env: None,
            timeout_s: 60.0,
            retries: 3,
            backoff_s: 1.0,
            concurrency: 4,
            max_tokens: 512,
            system: None,
        }
    }
}

fn default_synonyms() -> BTreeMap<String, Vec<String>> {
    let t: [(&str, &[&str]); 7] = [
        (
            "airway abnormalities",
            &["airway abnormalit", "airway", "bronchial wall thickening", "bronchiectasis", "bronchial", "bronchi"],
        ),
        ("emphysema", &["emphysema", "emphysematous", "bullae", "bulla", "hyperlucen"]),
        (
            "fibrosis-related changes",
            &["fibrosis", "fibrotic", "honeycombing", "reticulation", "septal thickening", "linear opacit"],
        ),
        ("pulmonary nodules/masses", &["nodule", "nodular", "mass", "masses"]),
        ("consolidation/atelectasis", &["consolidation", "atelectasis", "atelectatic", "collapse"]),
        ("ground-glass opacity", &["ground-glass", "ground glass", "ggo", "hazy opacit"]),
        ("pleural effusion/thickening", &["pleural effusion", "effusion", "pleural thickening", "pleural fluid"]),
    ];
    t.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect()
}

fn default_negations() -> Vec<String> {
    ["no", "not", "without", "absence of", "rule out", "ruled out", "unlikely", "rather than", "instead of"]
        .map(String::from)
        .to_vec()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct JudgeParams {
    /// `rules` (offline, default), `http` or `model`.
    pub backend: Backend,
    /// Class display name -> phrases that name it (case-insensitive, matched
    /// at word starts, so `nodule` also matches `nodules`).
    pub synonyms: BTreeMap<String, Vec<String>>,
    /// A mention preceded (within 3 words) by one of these does not count.
    pub negations: Vec<String>,
    /// `last` or `most` mentioned class.
    pub pick: Pick,
    /// Endpoint settings of the `http` backend (its `system` message is used by `model` too).
    pub http: HttpParams,
    /// Settings of the `model` backend.
    pub model: LocalModelParams,
    /// Prompt for model backends: `{reasoning}` and `{options}` are substituted.
    pub prompt: String,
    /// Count items whose reasoning names no class as inconsistent (else they
    /// are excluded from the rate, still reported).
    pub undetermined_is_inconsistent: bool,
    pub ci: CiMethod,
}

impl Default for JudgeParams {
    fn default() -> Self {
        Self {
            backend: Backend::Rules,
            synonyms: default_synonyms(),
            negations: default_negations(),
            pick: Pick::Last,
            http: HttpParams::default(),
            model: LocalModelParams::default(),
            prompt: DEFAULT_JUDGE_PROMPT.into(),
            undetermined_is_inconsistent: true,
            ci: CiMethod::Wilson,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Consistent,
    Inconsistent,
    /// The reasoning names no class (or the judge's reply named none).
    Undetermined,
    /// No reasoning or no valid answer to compare.
    Skipped,
    /// The backend failed after all retries.
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub id: String,
    pub answer_class: Option<String>,
    pub judged_class: Option<String>,
    pub status: Status,
    /// Why skipped, the error, or the judge's raw reply.
    pub detail: String,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Consistency {
    /// Stage id of the judged eval in the run that produced this output.
    #[serde(default)]
    pub eval_stage: String,
    /// blake3 of the judged `predictions.jsonl`: how the report finds the
    /// eval. Not the stage id: a cached judge output serves every recipe
    /// whose judge has the same key (mini's `judge` is an ablation's
    /// `judge@zoom`), and it recorded the id of the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_predictions: Option<String>,
    pub backend: Backend,
    pub n: usize,
    /// Consistent over judged items (consistent + inconsistent [+ undetermined]).
    pub rate: Rate,
    pub consistent: usize,
    pub inconsistent: usize,
    pub undetermined: usize,
    pub skipped: usize,
    pub errors: usize,
}

/// The reasoning of a completion: its `<think>` block, trimmed, when the
/// completion is in the think format; None otherwise (nothing to judge).
pub fn reasoning_of(completion: &str) -> Option<&str> {
    Completion::parse(completion).blocks(ResponseFormat::Think).and_then(|b| b.reasoning)
}

/// Why a prediction is not judged.
pub const NOT_IN_FORMAT: &str = "not in the <think>...</think><answer>...</answer> format: no reasoning to judge";
pub const NO_VALID_ANSWER: &str = "no valid answer to compare with";

/// Offline judge: finds class mentions with the synonym table.
pub struct RuleJudge {
    patterns: Vec<(String, Regex)>,
    negation: Option<Regex>,
    pick: Pick,
}

impl RuleJudge {
    pub fn new(
        synonyms: &BTreeMap<String, Vec<String>>,
        negations: &[String],
        pick: Pick,
    ) -> Result<Self, regex::Error> {
        let mut patterns = Vec::new();
        for (class, words) in synonyms {
            if words.is_empty() {
                continue;
            }
            // Longest first so "pleural effusion" wins over "effusion" at the same start.
            let mut ws: Vec<&String> = words.iter().collect();
            ws.sort_by_key(|w| std::cmp::Reverse(w.len()));
            let alt = ws.iter().map(|w| regex::escape(w)).collect::<Vec<_>>().join("|");
            patterns.push((class.clone(), Regex::new(&format!(r"(?i)\b(?:{alt})"))?));
        }
        let negation = if negations.is_empty() {
            None
        } else {
            let alt = negations.iter().map(|w| regex::escape(w)).collect::<Vec<_>>().join("|");
            // A cue followed by at most two other words, right before the mention.
            Some(Regex::new(&format!(r"(?i)\b(?:{alt})\b(?:\W+\w+){{0,2}}\W*$"))?)
        };
        Ok(Self { patterns, negation, pick })
    }

    /// The class the text supports, or None when it names none.
    pub fn judge(&self, text: &str) -> Option<String> {
        // (position, class) of every non-negated mention.
        let mut mentions: Vec<(usize, &str)> = Vec::new();
        for (class, re) in &self.patterns {
            for m in re.find_iter(text) {
                let before = &text[..m.start()];
                // Only look back within the clause.
                let clause = before.rfind(['.', ';', ':', ',', '\n']).map_or(before, |i| &before[i + 1..]);
                if self.negation.as_ref().is_some_and(|n| n.is_match(clause)) {
                    continue;
                }
                mentions.push((m.start(), class));
            }
        }
        mentions.sort();
        match self.pick {
            Pick::Last => mentions.last().map(|(_, c)| c.to_string()),
            Pick::Most => {
                let mut count: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
                for (pos, c) in &mentions {
                    let e = count.entry(c).or_insert((0, 0));
                    e.0 += 1;
                    e.1 = *pos;
                }
                count.into_iter().max_by_key(|(_, (n, last))| (*n, *last)).map(|(c, _)| c.to_string())
            }
        }
    }
}

/// OpenAI-compatible chat completions judge (the client is [`crate::chat_api`]'s).
pub struct HttpJudge {
    client: ChatClient,
    params: HttpParams,
}

/// Longest wait between attempts of the judge (its params have no cap of their own).
const JUDGE_MAX_BACKOFF: Duration = Duration::from_secs(60);

impl HttpJudge {
    pub fn new(params: &HttpParams) -> anyhow::Result<Self> {
        let api_key = ApiKey::from_env(params.api_key_env.as_deref(), "http.api_key_env")?;
        let config = ClientConfig {
            url: params.url.clone(),
            timeout: Duration::from_secs_f64(params.timeout_s),
            retries: params.retries,
            backoff: Duration::from_secs_f64(params.backoff_s),
            max_backoff: JUDGE_MAX_BACKOFF,
        };
        Ok(Self { client: ChatClient::new(config, api_key), params: params.clone() })
    }

    /// Ask once, retrying with exponential backoff; returns (reply, attempts).
    pub fn ask(&self, user: &str) -> (Result<String, String>, u32) {
        let mut messages = Vec::new();
        if let Some(s) = &self.params.system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        messages.push(serde_json::json!({"role": "user", "content": user}));
        let body = serde_json::json!({
            "model": self.params.model,
            "messages": messages,
            "temperature": 0.0,
            "max_tokens": self.params.max_tokens,
        });
        match self.client.post(&body, &|| false) {
            Ok(reply) => (message_content(&reply.body).map(str::to_string), reply.attempts),
            Err(f) => (Err(f.last.message), f.attempts),
        }
    }
}

/// The class a judge reply names: a bare option letter (possibly in
/// `<answer>` tags or followed by punctuation), else a class mention.
pub fn class_from_reply(reply: &str, options: &[String], rules: &RuleJudge) -> Option<String> {
    let letters = option_letters(options);
    let names = option_names(options);
    // Reasoning models may think first: judge the text after their final tag.
    let tail = reply.rsplit("</think>").next().unwrap_or(reply);
    let stripped = tail.replace("<answer>", " ").replace("</answer>", " ");
    let first = stripped.split_whitespace().next().map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()));
    if let Some(w) = first
        && let Some(i) = letters.iter().position(|l| l == w)
    {
        return Some(names[i].clone());
    }
    rules.judge(&stripped)
}

fn options_block(options: &[String]) -> String {
    options.join("\n")
}

/// A verdict before judging: skipped, or the reasoning and answer class to compare.
fn prepare(p: &Prediction) -> Result<(String, String), Verdict> {
    let skipped = |detail: &str| Verdict {
        id: p.id.clone(),
        answer_class: p.predicted_class.clone(),
        judged_class: None,
        status: Status::Skipped,
        detail: detail.into(),
        attempts: 0,
    };
    let reasoning = reasoning_of(&p.completion).ok_or_else(|| skipped(NOT_IN_FORMAT))?;
    let answer = p.predicted_class.clone().ok_or_else(|| skipped(NO_VALID_ANSWER))?;
    Ok((reasoning.to_string(), answer))
}

fn verdict(p: &Prediction, answer: String, judged: Option<String>, detail: String, attempts: u32) -> Verdict {
    let status = match &judged {
        None => Status::Undetermined,
        Some(j) if *j == answer => Status::Consistent,
        Some(_) => Status::Inconsistent,
    };
    Verdict { id: p.id.clone(), answer_class: Some(answer), judged_class: judged, status, detail, attempts }
}

fn judge_prompt(params: &JudgeParams, p: &Prediction, reasoning: &str) -> String {
    params.prompt.replace("{reasoning}", reasoning).replace("{options}", &options_block(&p.options))
}

/// Judge every prediction, in order. `local` is the loaded checkpoint of the
/// `model` backend; the `http` backend fans out over `concurrency` threads.
pub fn judge_all(
    params: &JudgeParams,
    predictions: &[Prediction],
    local: Option<&Answerer>,
) -> anyhow::Result<Vec<Verdict>> {
    let rules =
        RuleJudge::new(&params.synonyms, &params.negations, params.pick).context("param `synonyms`/`negations`")?;
    match params.backend {
        Backend::Rules => Ok(predictions
            .iter()
            .map(|p| match prepare(p) {
                Err(v) => v,
                Ok((reasoning, answer)) => verdict(p, answer, rules.judge(&reasoning), String::new(), 0),
            })
            .collect()),
        Backend::Http => {
            let http = HttpJudge::new(&params.http)?;
            let judge_one = |p: &Prediction| -> Verdict {
                let (reasoning, answer) = match prepare(p) {
                    Err(v) => return v,
                    Ok(x) => x,
                };
                let (reply, attempts) = http.ask(&judge_prompt(params, p, &reasoning));
                match reply {
                    Ok(r) => {
                        let judged = class_from_reply(&r, &p.options, &rules);
                        verdict(p, answer, judged, r.chars().take(500).collect(), attempts)
                    }
                    Err(e) => Verdict {
                        id: p.id.clone(),
                        answer_class: Some(answer),
                        judged_class: None,
                        status: Status::Error,
                        detail: e,
                        attempts,
                    },
                }
            };
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(params.http.concurrency.max(1))
                .thread_name(|i| format!("judge-http-{i}"))
                .build()
                .context("building the judge request pool")?;
            // par_iter + collect keeps the input order.
            Ok(pool.install(|| predictions.par_iter().map(judge_one).collect()))
        }
        Backend::Model => {
            let a = local.context("backend `model` needs the `judge_model` input (a checkpoint directory)")?;
            let cfg = GenerationConfig {
                max_new_tokens: params.model.max_new_tokens,
                eos_token_ids: a.tokenizer.eos_ids.iter().map(|&e| i64::from(e)).collect(),
                stop_strings: Vec::new(),
                ..Default::default()
            };
            let mut out: Vec<Option<Verdict>> = vec![None; predictions.len()];
            let mut pending = Vec::new();
            for (i, p) in predictions.iter().enumerate() {
                match prepare(p) {
                    Err(v) => out[i] = Some(v),
                    Ok((reasoning, answer)) => pending.push((i, judge_prompt(params, p, &reasoning), answer)),
                }
            }
            for chunk in pending.chunks(params.model.batch_size.max(1)) {
                let users: Vec<String> = chunk.iter().map(|(_, u, _)| u.clone()).collect();
                let replies = a.complete_texts(&users, params.http.system.as_deref(), &cfg)?;
                for ((i, _, answer), r) in chunk.iter().zip(replies) {
                    let p = &predictions[*i];
                    let judged = class_from_reply(&r, &p.options, &rules);
                    out[*i] = Some(verdict(p, answer.clone(), judged, r.chars().take(500).collect(), 1));
                }
            }
            Ok(out.into_iter().flatten().collect())
        }
    }
}

pub fn summarise(
    params: &JudgeParams,
    eval_stage: &str,
    eval_predictions: Option<String>,
    verdicts: &[Verdict],
) -> Consistency {
    let count = |s: Status| verdicts.iter().filter(|v| v.status == s).count();
    let outcomes: Vec<bool> = verdicts
        .iter()
        .filter(|v| match v.status {
            Status::Consistent | Status::Inconsistent => true,
            Status::Undetermined => params.undetermined_is_inconsistent,
            Status::Skipped | Status::Error => false,
        })
        .map(|v| v.status == Status::Consistent)
        .collect();
    Consistency {
        eval_stage: eval_stage.to_string(),
        eval_predictions,
        backend: params.backend,
        n: verdicts.len(),
        rate: params.ci.rate(&outcomes),
        consistent: count(Status::Consistent),
        inconsistent: count(Status::Inconsistent),
        undetermined: count(Status::Undetermined),
        skipped: count(Status::Skipped),
        errors: count(Status::Error),
    }
}

fn write_verdicts(path: &Path, verdicts: &[Verdict]) -> anyhow::Result<()> {
    let mut w =
        std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    for v in verdicts {
        serde_json::to_writer(&mut w, v)?;
        w.write_all(b"\n")?;
    }
    w.flush().with_context(|| format!("writing {}", path.display()))
}

pub struct Judge;

impl StageKind for Judge {
    type Params = JudgeParams;
    const KIND: &'static str = "judge";
    // 2: consistency.json records the digest of the judged predictions.
    // 3: only completions in the task's think format are judged; their
    //    reasoning is the think block (was: any <think> text, else the text before <answer>).
    const VERSION: u32 = 3;
    const SUMMARY: &'static str = "Reasoning-answer consistency of an eval's completions (rules offline, a local Qwen2/Qwen2.5 checkpoint, or an OpenAI-compatible endpoint)";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[
            InputSpec::one("eval", "`eval` output (predictions.jsonl)"),
            InputSpec::optional(
                "judge_model",
                "checkpoint directory for backend `model` (HF Qwen2/Qwen2.5 text, Qwen2.5-VL or Qwen2-VL)",
            ),
        ];
        INPUTS
    }

    fn resources(p: &Self::Params) -> Resources {
        match p.backend {
            Backend::Rules => Resources::default(),
            Backend::Http => Resources { cpu: p.http.concurrency.max(1), ..Default::default() },
            Backend::Model => Resources { cpu: 0, device: p.model.device.request(), memory_mb: 4096 },
        }
    }

    fn validate(p: &Self::Params) -> Result<(), ParamError> {
        if let Err(e) = RuleJudge::new(&p.synonyms, &p.negations, p.pick) {
            return Err(ParamError::new(&["synonyms"], format!("does not compile to a pattern: {e}")));
        }
        if p.backend != Backend::Rules && !p.prompt.contains("{reasoning}") {
            return Err(ParamError::new(&["prompt"], "must contain `{reasoning}`"));
        }
        if p.backend == Backend::Model && !["auto", "float32", "bfloat16", "float16"].contains(&p.model.dtype.as_str())
        {
            return Err(ParamError::new(
                &["model", "dtype"],
                format!("expected auto, float32, bfloat16 or float16, got {:?}", p.model.dtype),
            ));
        }
        if p.backend == Backend::Http {
            if !(p.http.url.starts_with("http://") || p.http.url.starts_with("https://")) {
                return Err(ParamError::new(
                    &["http", "url"],
                    format!("expected an http:// URL, got {:?}", p.http.url),
                ));
            }
            if p.http.url.starts_with("https://") {
                return Err(ParamError::new(
                    &["http", "url"],
                    "https is not built in (serve the judge locally over http)",
                ));
            }
            let ok = p.http.timeout_s > 0.0 && p.http.backoff_s >= 0.0;
            if !ok {
                return Err(ParamError::new(&["http", "timeout_s"], "timeout_s must be > 0 and backoff_s >= 0"));
            }
            if p.http.concurrency == 0 {
                return Err(ParamError::new(&["http", "concurrency"], "must be at least 1"));
            }
        }
        Ok(())
    }

    fn run(params: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()> {
        let path = ctx.input("eval")?.join(PREDICTIONS_JSONL);
        let eval_stage = artifact_id(&ctx.inputs("eval")[0]);
        let predictions = read_jsonl(&path)?;
        let digest = predictions_digest(&path)?;
        if predictions.is_empty() {
            bail!("{}: no predictions to judge", path.display());
        }
        ctx.progress().start("judge", predictions.len() as u64);
        let local = match (params.backend, ctx.optional_input("judge_model")?) {
            (Backend::Model, Some(dir)) => {
                let (device, kind) = device_and_kind(ctx, &params.model.dtype)?;
                Some(Answerer::load(dir, kind, device)?)
            }
            (Backend::Model, None) => bail!("backend `model` needs the `judge_model` input (a checkpoint directory)"),
            _ => None,
        };
        let verdicts = judge_all(params, &predictions, local.as_ref())?;
        ctx.progress().advance(predictions.len() as u64);
        let summary = summarise(params, &eval_stage, Some(digest), &verdicts);
        if summary.errors > 0 {
            tracing::warn!(errors = summary.errors, "judge endpoint failed for some items (see verdicts.jsonl)");
        }
        tracing::info!(rate = summary.rate.value, judged = summary.rate.n, "consistency");
        write_verdicts(&ctx.output_dir().join(VERDICTS_JSONL), &verdicts)?;
        let out = ctx.output_dir().join(CONSISTENCY_JSON);
        std::fs::write(&out, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", out.display()))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::predictions::tests::sample;

    fn rules() -> RuleJudge {
        let p = JudgeParams::default();
        RuleJudge::new(&p.synonyms, &p.negations, p.pick).unwrap()
    }

    #[test]
    fn rules_judge_a_table_of_reasonings() {
        let r = rules();
        let table: &[(&str, Option<&str>)] = &[
            ("Low-attenuation areas without walls: emphysema.", Some("emphysema")),
            ("Hazy ground-glass opacity in the right lower lobe.", Some("ground-glass opacity")),
            ("There is no effusion. A round nodule is seen.", Some("pulmonary nodules/masses")),
            ("This is not a nodule; it looks like consolidation.", Some("consolidation/atelectasis")),
            ("Could be a mass, but the fluid layering suggests pleural effusion.", Some("pleural effusion/thickening")),
            ("Bronchiectasis with bronchial wall thickening.", Some("airway abnormalities")),
            ("Honeycombing and reticulation indicate fibrosis.", Some("fibrosis-related changes")),
            ("The image looks abnormal.", None),
            ("Masses? Rule out emphysema.", Some("pulmonary nodules/masses")),
            ("", None),
        ];
        for (text, want) in table {
            assert_eq!(r.judge(text).as_deref(), *want, "{text:?}");
        }
        let p = JudgeParams::default();
        let most = RuleJudge::new(&p.synonyms, &p.negations, Pick::Most).unwrap();
        let t = "Emphysema here, emphysema there, maybe a nodule.";
        assert_eq!(most.judge(t).as_deref(), Some("emphysema"));
        assert_eq!(rules().judge(t).as_deref(), Some("pulmonary nodules/masses"));
    }

    #[test]
    fn reasoning_extraction_and_reply_parsing() {
        assert_eq!(reasoning_of("<think> a b </think><answer>A</answer>\n"), Some("a b"));
        // Outside the think format there is no reasoning to judge.
        assert_eq!(reasoning_of("<think>truncated"), None);
        assert_eq!(reasoning_of("plain words <answer>A</answer>"), None);
        assert_eq!(reasoning_of("<think>a</think><answer>A</answer><answer>B</answer>"), None);
        assert_eq!(reasoning_of("<answer>A</answer>"), None);
        assert_eq!(reasoning_of("<think>  </think><answer>A</answer>"), None);
        let opts = vec!["A. emphysema".to_string(), "B. ground-glass opacity".to_string()];
        let r = rules();
        assert_eq!(class_from_reply("B", &opts, &r).as_deref(), Some("ground-glass opacity"));
        assert_eq!(class_from_reply("<answer>A</answer>", &opts, &r).as_deref(), Some("emphysema"));
        assert_eq!(class_from_reply("<think>hmm A?</think>B.", &opts, &r).as_deref(), Some("ground-glass opacity"));
        assert_eq!(class_from_reply("It is most likely emphysema", &opts, &r).as_deref(), Some("emphysema"));
        assert_eq!(class_from_reply("I cannot tell", &opts, &r), None);
    }

    fn preds() -> Vec<Prediction> {
        let mut a = sample("a", "emphysema", "<think>bullae: emphysema</think><answer>A</answer>", true);
        a.options = vec!["A. emphysema".into(), "B. ground-glass opacity".into()];
        a.predicted_class = Some("emphysema".into());
        let mut b = a.clone();
        b.id = "b".into();
        b.completion = "<think>hazy ground glass</think><answer>A</answer>".into();
        let mut c = a.clone();
        c.id = "c".into();
        c.completion = "<answer>A</answer>".into();
        let mut d = a.clone();
        d.id = "d".into();
        d.completion = "<think>ALWAYS500 emphysema</think><answer>A</answer>".into();
        vec![a, b, c, d]
    }

    #[test]
    fn rules_backend_summary_counts_every_item() {
        let p = JudgeParams::default();
        let v = judge_all(&p, &preds(), None).unwrap();
        let st: Vec<Status> = v.iter().map(|v| v.status).collect();
        assert_eq!(st, [Status::Consistent, Status::Inconsistent, Status::Skipped, Status::Consistent]);
        let s = summarise(&p, "eval", None, &v);
        assert_eq!((s.n, s.rate.n, s.rate.k, s.skipped), (4, 3, 2, 1));
    }

    /// A tiny OpenAI-compatible server: request 1 gets a 500, request 2
    /// stalls past the client timeout, later ones answer from the prompt;
    /// prompts containing ALWAYS500 always fail.
    fn serve(hits: Arc<AtomicUsize>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let hits = hits.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut len = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    reader.read_exact(&mut body).unwrap();
                    let body = String::from_utf8_lossy(&body).to_string();
                    let n = hits.fetch_add(1, Ordering::SeqCst);
                    let (status, content) = if body.contains("ALWAYS500") || n == 0 {
                        ("500 Internal Server Error", "{\"error\": \"boom\"}".to_string())
                    } else if n == 1 {
                        std::thread::sleep(Duration::from_millis(1500));
                        ("200 OK", "{}".to_string())
                    } else {
                        let letter = if body.contains("ground glass") { "B" } else { "A" };
                        (
                            "200 OK",
                            serde_json::json!({"choices": [{"message": {"role": "assistant", "content": letter}}]})
                                .to_string(),
                        )
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{content}",
                        content.len()
                    );
                });
            }
        });
        format!("http://{addr}/v1")
    }

    #[test]
    fn http_backend_retries_timeouts_and_500s_and_loses_nothing() {
        let hits = Arc::new(AtomicUsize::new(0));
        let url = serve(hits.clone());
        let params = JudgeParams {
            backend: Backend::Http,
            http: HttpParams { url, timeout_s: 0.5, retries: 3, backoff_s: 0.01, concurrency: 1, ..Default::default() },
            ..Default::default()
        };
        let v = judge_all(&params, &preds(), None).unwrap();
        assert_eq!(v.len(), 4);
        // Item a absorbed the 500 and the timeout, then succeeded on its 3rd attempt.
        assert_eq!((v[0].status, v[0].attempts), (Status::Consistent, 3));
        assert_eq!(v[0].judged_class.as_deref(), Some("emphysema"));
        assert_eq!((v[1].status, v[1].judged_class.as_deref()), (Status::Inconsistent, Some("ground-glass opacity")));
        assert_eq!((v[2].status, v[2].attempts), (Status::Skipped, 0));
        assert_eq!((v[3].status, v[3].attempts), (Status::Error, 4));
        assert!(v[3].detail.contains("HTTP 500"), "{}", v[3].detail);
        let s = summarise(&params, "eval", None, &v);
        assert_eq!((s.errors, s.rate.n, s.rate.k), (1, 2, 1));
        // 3 (a) + 1 (b) + 4 (d); c never asks.
        assert_eq!(hits.load(Ordering::SeqCst), 8);
    }

    #[test]
    fn judge_stage_writes_verdicts_and_consistency() {
        let dir = tempfile::tempdir().unwrap();
        let eval = dir.path().join("eval");
        std::fs::create_dir_all(&eval).unwrap();
        crate::predictions::write_jsonl(&eval.join(PREDICTIONS_JSONL), &preds()).unwrap();
        let out = dir.path().join("judge");
        let mut ctx = StageContext::builder("judge", &out).input("eval", "eval", None, &eval).build().unwrap();
        Judge::run(&JudgeParams::default(), &mut ctx).unwrap();
        let lines = std::fs::read_to_string(out.join(VERDICTS_JSONL)).unwrap();
        assert_eq!(lines.lines().count(), 4);
        let c: Consistency =
            serde_json::from_str(&std::fs::read_to_string(out.join(CONSISTENCY_JSON)).unwrap()).unwrap();
        assert_eq!((c.consistent, c.inconsistent, c.skipped, c.eval_stage.as_str()), (2, 1, 1, "eval"));
        let bytes = std::fs::read(eval.join(PREDICTIONS_JSONL)).unwrap();
        assert_eq!(c.eval_predictions, Some(blake3::hash(&bytes).to_hex().to_string()), "what the report matches on");
        let bad = JudgeParams {
            backend: Backend::Http,
            http: HttpParams { url: "ftp://x".into(), ..Default::default() },
            ..Default::default()
        };
        assert!(format!("{:?}", Judge::validate(&bad).unwrap_err()).contains("url"));
    }

    #[test]
    fn model_backend_judges_with_a_local_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let model = crate::eval::tests::tiny_model(dir.path());
        let answerer = Answerer::load(&model, tch::Kind::Float, tch::Device::Cpu).unwrap();
        let params = JudgeParams {
            backend: Backend::Model,
            model: LocalModelParams { max_new_tokens: 4, batch_size: 2, ..Default::default() },
            ..Default::default()
        };
        let v = judge_all(&params, &preds(), Some(&answerer)).unwrap();
        assert_eq!(v.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        assert_eq!(v[2].status, Status::Skipped);
        for i in [0, 1, 3] {
            assert_eq!(v[i].attempts, 1);
            assert!(matches!(v[i].status, Status::Consistent | Status::Inconsistent | Status::Undetermined));
        }
        // The stage refuses to run the model backend without a checkpoint.
        let eval = dir.path().join("eval");
        std::fs::create_dir_all(&eval).unwrap();
        crate::predictions::write_jsonl(&eval.join(PREDICTIONS_JSONL), &preds()).unwrap();
        let mut ctx =
            StageContext::builder("judge", dir.path().join("out")).input("eval", "eval", None, &eval).build().unwrap();
        let e = Judge::run(&params, &mut ctx).unwrap_err().to_string();
        assert!(e.contains("judge_model"), "{e}");
    }

    /// The `model` backend on a plain Qwen2 causal LM (no vision tower), run
    /// as a stage: the mechanism, not the quality (random weights).
    #[test]
    fn model_backend_runs_a_text_only_qwen2_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("qwen2");
        let corpus: Vec<String> = DEFAULT_JUDGE_PROMPT.lines().map(str::to_string).collect();
        let p = stages_vlm::init_model::InitModelParams { vocab_size: 300, ..Default::default() };
        stages_vlm::init_model::write_checkpoint(&p, &corpus, 5, true, &ckpt).unwrap();
        let cfg = std::fs::read_to_string(ckpt.join("config.json")).unwrap();
        assert!(cfg.contains("\"Qwen2ForCausalLM\"") && !cfg.contains("vision_config"));
        let eval = dir.path().join("eval");
        std::fs::create_dir_all(&eval).unwrap();
        crate::predictions::write_jsonl(&eval.join(PREDICTIONS_JSONL), &preds()).unwrap();
        let out = dir.path().join("judge");
        let mut ctx = StageContext::builder("judge", &out)
            .input("eval", "eval@grpo", None, &eval)
            .input("judge_model", "judge_lm", None, &ckpt)
            .build()
            .unwrap();
        let params = JudgeParams {
            backend: Backend::Model,
            prompt: "Reasoning: {reasoning}\nOptions:\n{options}\nAnswer with one letter.".into(),
            model: LocalModelParams { max_new_tokens: 3, batch_size: 3, ..Default::default() },
            ..Default::default()
        };
        Judge::validate(&params).unwrap();
        Judge::run(&params, &mut ctx).unwrap();
        let verdicts: Vec<Verdict> = std::fs::read_to_string(out.join(VERDICTS_JSONL))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(verdicts.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        for v in [&verdicts[0], &verdicts[1], &verdicts[3]] {
            assert_eq!(v.attempts, 1, "{v:?}");
            assert!(matches!(v.status, Status::Consistent | Status::Inconsistent | Status::Undetermined), "{v:?}");
            assert_eq!(v.answer_class.as_deref(), Some("emphysema"));
        }
        assert_eq!(verdicts[2].status, Status::Skipped);
        let c: Consistency =
            serde_json::from_str(&std::fs::read_to_string(out.join(CONSISTENCY_JSON)).unwrap()).unwrap();
        assert_eq!(
            (c.backend, c.n, c.skipped, c.errors, c.eval_stage.as_str()),
            (Backend::Model, 4, 1, 0, "eval@grpo")
        );
        assert_eq!(c.consistent + c.inconsistent + c.undetermined, 3);
    }
}
