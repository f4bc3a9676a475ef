//! The eval's `http` backend: score a model served elsewhere (vLLM, SGLang,
//! lmdeploy, ... anything with the OpenAI-compatible chat API and image
//! inputs) with the same prompts, scoring and output files as the local
//! backend.
//!
//! One request per item ([`request_body`]): the system message (if any),
//! the user turn with the item's image as a base64 `data:` URI in an
//! `image_url` part followed by the prompt text, and under `cot_forcing` an
//! assistant turn holding the prefill with vLLM's `continue_final_message`
//! (the server continues that turn instead of opening a new one).
//! `temperature`, `top_p`, `max_tokens` and a per-item `seed` (the eval's
//! seed + the item's index, so results do not depend on concurrency) are
//! sent; `top_k` only when set (a vLLM extension).
//!
//! The local backend stops at the first `</answer>`; servers strip a `stop`
//! string from their reply, which would break the format, so no `stop` is
//! sent and the reply is cut after its first stop string here
//! ([`parse_reply`]). Requests run on `concurrency` threads; every reply is
//! appended to the stage's resume directory as it arrives, so a stage that
//! fails (retries exhausted, the run cancelled) asks only for the rest when
//! it runs again.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::ParamError;
use stage_api::context::ProgressSink;

use crate::chat_api::{ChatClient, ClientConfig, Failure, message_content};

/// Replies received so far, one JSON line each, in the stage's resume directory.
pub const RESUME_FILE: &str = "served_replies.jsonl";

/// Request fields the eval sets itself; `extra_body` may not repeat them.
pub const RESERVED_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "n",
    "stream",
    "stop",
    "echo",
    "continue_final_message",
    "add_generation_prompt",
];

/// The `http` table of an eval: which served model and how to reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServedParams {
    /// Base URL of the API, e.g. `http://127.0.0.1:8000/v1` (`/chat/completions` is appended; plain http).
    pub url: String,
    /// Model name sent in every request (vLLM: `--served-model-name`); required with `backend = "http"`.
    pub model: String,
    /// Name of an environment variable holding a bearer token, read at run time (never recorded).
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Per-request timeout in seconds (connect, generation and reply together).
    pub timeout_s: f64,
    /// Retries after a timeout, connection error, 429, 5xx or unparseable reply; then the stage fails (replies so far are kept for its rerun).
    pub retries: u32,
    /// First backoff in seconds; doubles after each failed attempt. A `Retry-After` header replaces it.
    pub backoff_s: f64,
    /// Longest wait between attempts in seconds (caps the backoff and `Retry-After`).
    pub max_backoff_s: f64,
    /// Extra top-level request fields for server-specific settings (vLLM: `repetition_penalty`, `chat_template_kwargs`, ...); may not repeat a field the eval sets.
    pub extra_body: BTreeMap<String, serde_json::Value>,
}

impl Default for ServedParams {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8000/v1".into(),
            model: String::new(),
            api_key_env: None,
            concurrency: 8,
            timeout_s: 300.0,
            retries: 3,
            backoff_s: 1.0,
            max_backoff_s: 60.0,
            extra_body: BTreeMap::new(),
        }
    }
}

impl ServedParams {
    /// Checks of the `http` table (paths under `http`).
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.url.starts_with("https://") {
            return Err(ParamError::new(
                &["http", "url"],
                "https is not built in: reach the server over plain http (an SSH tunnel or a local proxy)",
            ));
        }
        if !self.url.starts_with("http://") {
            return Err(ParamError::new(&["http", "url"], format!("expected an http:// URL, got {:?}", self.url)));
        }
        if self.model.trim().is_empty() {
            return Err(ParamError::new(&["http", "model"], "backend `http` needs the served model name").with_hint(
                "e.g. `http = { url = \"http://127.0.0.1:8000/v1\", model = \"Qwen/Qwen2.5-VL-72B-Instruct\" }`",
            ));
        }
        if self.concurrency == 0 {
            return Err(ParamError::new(&["http", "concurrency"], "must be at least 1"));
        }
        // Written positively so NaN fails too.
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            return Err(ParamError::new(&["http", "timeout_s"], "must be a positive number of seconds"));
        }
        for (key, v) in [("backoff_s", self.backoff_s), ("max_backoff_s", self.max_backoff_s)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(ParamError::new(&["http", key], "must be a number of seconds >= 0"));
            }
        }
        if let Some(var) = &self.api_key_env
            && var.trim().is_empty()
        {
            return Err(ParamError::new(&["http", "api_key_env"], "names an environment variable; got an empty name"));
        }
        if let Some(k) = self.extra_body.keys().find(|k| RESERVED_FIELDS.contains(&k.as_str())) {
            return Err(ParamError::new(
                &["http", "extra_body", k],
                format!("`{k}` is set by the eval itself (from its params); remove it here"),
            ));
        }
        Ok(())
    }

    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            url: self.url.clone(),
            timeout: Duration::from_secs_f64(self.timeout_s),
            retries: self.retries,
            backoff: Duration::from_secs_f64(self.backoff_s),
            max_backoff: Duration::from_secs_f64(self.max_backoff_s),
        }
    }
}

/// What every request of one eval carries besides the item.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec<'a> {
    pub model: &'a str,
    pub system: Option<&'a str>,
    /// The start of the assistant turn (`cot_forcing`), or empty.
    pub prefill: &'a str,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// 0 = not sent.
    pub top_k: usize,
    /// Item `i` is sent with `seed + i`.
    pub seed: u64,
    pub extra_body: &'a BTreeMap<String, serde_json::Value>,
}

/// One item to ask about.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Item<'a> {
    pub id: &'a str,
    pub image: Option<&'a [u8]>,
    /// The user text (the prompt variant applied).
    pub user: &'a str,
}

/// An image as a `data:` URI (`image/png`, `image/jpeg`, ... sniffed from its bytes).
pub fn image_data_uri(bytes: &[u8]) -> Result<String, String> {
    let format = image::guess_format(bytes).map_err(|_| "the image bytes are not a known image format".to_string())?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    Ok(format!("data:{};base64,{b64}", format.to_mime_type()))
}

/// The chat-completions request for item number `index`.
pub fn request_body(spec: &RequestSpec<'_>, item: &Item<'_>, index: usize) -> Result<serde_json::Value, String> {
    use serde_json::{Value, json};
    let mut messages = Vec::new();
    if let Some(s) = spec.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    let user = match item.image {
        // Image first, then the text: the order of the local backend's chat message.
        Some(bytes) => json!([
            {"type": "image_url", "image_url": {"url": image_data_uri(bytes)?}},
            {"type": "text", "text": item.user},
        ]),
        None => Value::String(item.user.to_string()),
    };
    messages.push(json!({"role": "user", "content": user}));
    let mut body = serde_json::Map::new();
    body.insert("model".into(), json!(spec.model));
    if !spec.prefill.is_empty() {
        messages.push(json!({"role": "assistant", "content": spec.prefill}));
        body.insert("continue_final_message".into(), json!(true));
        body.insert("add_generation_prompt".into(), json!(false));
    }
    body.insert("messages".into(), Value::Array(messages));
    body.insert("max_tokens".into(), json!(spec.max_tokens));
    body.insert("temperature".into(), json!(spec.temperature));
    body.insert("top_p".into(), json!(spec.top_p));
    if spec.top_k > 0 {
        body.insert("top_k".into(), json!(spec.top_k));
    }
    body.insert("seed".into(), json!(spec.seed.wrapping_add(index as u64)));
    for (k, v) in spec.extra_body {
        body.insert(k.clone(), v.clone());
    }
    Ok(Value::Object(body))
}

/// One item's completion as the server gave it (cut at the stop string).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedReply {
    /// The prefill followed by the generated text, as the local backend records it.
    pub text: String,
    /// `usage.prompt_tokens` (0 when the server sends no usage).
    pub prompt_tokens: usize,
    /// `usage.completion_tokens`: what the server generated, including any text after the stop string.
    pub completion_tokens: usize,
    /// `eos`, `stop_string` or `length` as locally; another `finish_reason` as the server named it.
    pub finish: String,
    /// The `model` the reply names.
    pub model: Option<String>,
}

/// Read a chat completion: the content after `prefill`, cut after the
/// first of `stop_strings` (where the local backend would have stopped).
pub fn parse_reply(body: &serde_json::Value, prefill: &str, stop_strings: &[String]) -> Result<ServedReply, String> {
    let content = message_content(body)?;
    let cut = stop_strings.iter().filter_map(|s| content.find(s.as_str()).map(|at| at + s.len())).min();
    let (generated, finish) = match cut {
        Some(end) => (&content[..end], "stop_string".to_string()),
        None => {
            let reason = body.pointer("/choices/0/finish_reason").and_then(|v| v.as_str()).unwrap_or("");
            // Without stop strings sent, `stop` means the model ended its turn.
            (content, if reason == "stop" { "eos".to_string() } else { reason.to_string() })
        }
    };
    let count = |key: &str| body.pointer(&format!("/usage/{key}")).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    Ok(ServedReply {
        text: format!("{prefill}{generated}"),
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
        finish,
        model: body.get("model").and_then(|m| m.as_str()).map(str::to_string),
    })
}

/// What the served run saw, for the log and `served.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedRun {
    /// One reply per item, in item order.
    pub replies: Vec<ServedReply>,
    /// Requests sent by this attempt (retries included).
    pub requests: u64,
    /// Replies taken from an earlier, failed attempt of the stage.
    pub resumed: usize,
}

/// `served.json` in the eval's output: the requested model name and the
/// model ids the server reported (deterministic for a given server; retry
/// counts and timings go to the log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedRecord {
    pub backend: String,
    /// `http.model`: the name sent in every request.
    pub model: String,
    /// The `model` field of the replies -> number of items (a router or an
    /// alias may answer with another id than the one requested).
    pub server_models: BTreeMap<String, usize>,
    /// Items whose reply named no model.
    pub unnamed: usize,
    /// How `cot_forcing` pre-filled the assistant turn (`continue_final_message`), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_via: Option<String>,
}

impl ServedRecord {
    pub fn of(model: &str, prefill: &str, replies: &[ServedReply]) -> Self {
        let mut server_models = BTreeMap::new();
        for r in replies.iter().filter_map(|r| r.model.as_ref()) {
            *server_models.entry(r.clone()).or_insert(0) += 1;
        }
        Self {
            backend: "http".into(),
            model: model.into(),
            server_models,
            unnamed: replies.iter().filter(|r| r.model.is_none()).count(),
            prefill_via: (!prefill.is_empty()).then(|| "continue_final_message".into()),
        }
    }
}

/// A line of [`RESUME_FILE`].
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    index: usize,
    id: String,
    reply: ServedReply,
}

/// Replies of an earlier attempt that still match the items (index and id).
fn load_saved(path: &Path, items: &[Item<'_>]) -> anyhow::Result<Vec<Option<ServedReply>>> {
    let mut slots = vec![None; items.len()];
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(slots),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        // A line cut by a kill is skipped: its item is asked again.
        let Ok(s) = serde_json::from_str::<Saved>(&line) else { continue };
        if items.get(s.index).is_some_and(|it| it.id == s.id) {
            slots[s.index] = Some(s.reply);
        }
    }
    Ok(slots)
}

/// Hints for failures whose cause is usually the recipe, not the server's mood.
fn hint(failure: &Failure, spec: &RequestSpec<'_>, api_key_env: Option<&str>) -> String {
    match failure.last.status {
        Some(401 | 403) => match api_key_env {
            Some(var) => format!(" (check the API key in ${var}, param `http.api_key_env`)"),
            None => " (the server wants an API key: name its environment variable in `http.api_key_env`)".into(),
        },
        Some(404) => format!(
            " (check `http.url`, the base ending before `/chat/completions`, e.g. `http://HOST:8000/v1`, and `http.model` = {:?}, the server's model name)",
            spec.model
        ),
        Some(400 | 422) if !spec.prefill.is_empty() => " (prompt `cot_forcing` needs a server that continues a pre-filled assistant turn: vLLM's `continue_final_message`)".into(),
        _ => String::new(),
    }
}

/// How a served run reports progress and learns it should stop.
pub struct Hooks<'a> {
    pub progress: &'a dyn ProgressSink,
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

/// One item's fate in a served run.
enum Asked {
    Reply(ServedReply),
    /// Given up while waiting to retry: another item's error (or the cancel) is the story.
    Stopped,
    Failed(String),
}

/// A served model and how to ask it.
pub struct Served<'a> {
    pub client: &'a ChatClient,
    pub spec: RequestSpec<'a>,
    /// Where the local backend stops generating (the reply is cut there).
    pub stop_strings: &'a [String],
    pub concurrency: usize,
    /// For hints on 401/403.
    pub api_key_env: Option<&'a str>,
}

impl Served<'_> {
    fn ask(&self, item: &Item<'_>, index: usize, stop: &dyn Fn() -> bool) -> (u32, Asked) {
        let body = match request_body(&self.spec, item, index) {
            Ok(b) => b,
            Err(e) => return (0, Asked::Failed(e)),
        };
        match self.client.post(&body, stop) {
            Ok(r) => match parse_reply(&r.body, self.spec.prefill, self.stop_strings) {
                Ok(reply) => (r.attempts, Asked::Reply(reply)),
                Err(e) => (r.attempts, Asked::Failed(format!("{e} (from {})", self.client.endpoint()))),
            },
            Err(f) if f.stopped => (f.attempts, Asked::Stopped),
            Err(f) => (f.attempts, Asked::Failed(format!("{f}{}", hint(&f, &self.spec, self.api_key_env)))),
        }
    }

    /// Ask the server about every item, `concurrency` requests at a time;
    /// replies are saved in `resume_dir` as they arrive and taken from there
    /// on a rerun. The first item that fails for good stops the run
    /// (requests in flight finish and are saved) with an error naming it.
    pub fn answer_all(&self, items: &[Item<'_>], resume_dir: &Path, hooks: &Hooks<'_>) -> anyhow::Result<ServedRun> {
        let resume_path = resume_dir.join(RESUME_FILE);
        let slots = load_saved(&resume_path, items)?;
        let resumed = slots.iter().filter(|s| s.is_some()).count();
        if resumed > 0 {
            tracing::info!(resumed, of = items.len(), "replies kept from an earlier attempt");
            hooks.progress.advance(resumed as u64);
        }
        let pending: Vec<usize> = (0..items.len()).filter(|&i| slots[i].is_none()).collect();
        let saved = Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&resume_path)
                .with_context(|| format!("opening {}", resume_path.display()))?,
        );
        let slots = Mutex::new(slots);
        let next = AtomicUsize::new(0);
        let requests = AtomicU64::new(0);
        let failing = AtomicBool::new(false);
        let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        let fail = |e: anyhow::Error| {
            failing.store(true, Ordering::SeqCst);
            if let Ok(mut f) = failure.lock()
                && f.is_none()
            {
                *f = Some(e);
            }
        };
        let stop = || failing.load(Ordering::SeqCst) || (hooks.cancelled)();
        // Worker threads log into the stage's log like its own thread.
        let span = tracing::Span::current();
        std::thread::scope(|scope| {
            for _ in 0..self.concurrency.min(pending.len()) {
                scope.spawn(|| {
                    let _entered = span.enter();
                    while !stop() {
                        let k = next.fetch_add(1, Ordering::SeqCst);
                        let Some(&i) = pending.get(k) else { break };
                        let item = &items[i];
                        let (attempts, asked) = self.ask(item, i, &stop);
                        requests.fetch_add(u64::from(attempts), Ordering::SeqCst);
                        match asked {
                            Asked::Reply(reply) => {
                                let line = serde_json::to_string(&Saved {
                                    index: i,
                                    id: item.id.into(),
                                    reply: reply.clone(),
                                });
                                let written = line.map_err(anyhow::Error::from).and_then(|l| {
                                    let mut f =
                                        saved.lock().map_err(|_| anyhow::anyhow!("resume file lock poisoned"))?;
                                    writeln!(f, "{l}").and_then(|_| f.flush()).map_err(anyhow::Error::from)
                                });
                                if let Err(e) = written {
                                    fail(e.context(format!("saving a reply to {}", resume_path.display())));
                                    break;
                                }
                                if let Ok(mut s) = slots.lock() {
                                    s[i] = Some(reply);
                                }
                                hooks.progress.advance(1);
                            }
                            Asked::Stopped => break,
                            Asked::Failed(e) => {
                                fail(anyhow::anyhow!("item `{}`: {e}", item.id));
                                break;
                            }
                        }
                    }
                });
            }
        });
        let requests = requests.into_inner();
        let slots = slots.into_inner().map_err(|_| anyhow::anyhow!("reply slots poisoned"))?;
        let got = slots.iter().filter(|s| s.is_some()).count();
        if let Some(e) = failure.into_inner().map_err(|_| anyhow::anyhow!("failure slot poisoned"))? {
            bail!(
                "{e:#}\n{got} of {} replies are kept in {}: running the stage again asks only for the other {}",
                items.len(),
                resume_path.display(),
                items.len() - got
            );
        }
        if (hooks.cancelled)() {
            bail!("cancelled with {got} of {} replies (kept for the next attempt)", items.len());
        }
        let replies: Vec<ServedReply> = slots.into_iter().flatten().collect();
        if replies.len() != items.len() {
            bail!("{} of {} items got no reply", items.len() - replies.len(), items.len());
        }
        Ok(ServedRun { replies, requests, resumed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(extra: &'a BTreeMap<String, serde_json::Value>, prefill: &'a str) -> RequestSpec<'a> {
        RequestSpec {
            model: "m",
            system: Some("sys"),
            prefill,
            max_tokens: 7,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 10,
            extra_body: extra,
        }
    }

    fn png() -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::GrayImage::new(4, 4).write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn requests_carry_image_prompt_sampling_and_prefill() {
        let extra = BTreeMap::from([("repetition_penalty".to_string(), serde_json::json!(1.05))]);
        let bytes = png();
        let item = Item { id: "a", image: Some(&bytes), user: "Which?" };
        let b = request_body(&spec(&extra, ""), &item, 3).unwrap();
        assert_eq!(b["model"], "m");
        assert_eq!(b["seed"], 13, "seed + item index");
        assert_eq!((b["max_tokens"].as_u64(), b["temperature"].as_f64()), (Some(7), Some(0.0)));
        assert!(b.get("top_k").is_none() && b.get("continue_final_message").is_none() && b.get("stop").is_none());
        assert_eq!(b["repetition_penalty"], 1.05);
        let m = b["messages"].as_array().unwrap();
        assert_eq!((m.len(), m[0]["role"].as_str(), m[1]["role"].as_str()), (2, Some("system"), Some("user")));
        let url = m[1]["content"][0]["image_url"]["url"].as_str().unwrap();
        let b64 = url.strip_prefix("data:image/png;base64,").unwrap();
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(b64).unwrap(), bytes);
        assert_eq!(m[1]["content"][1], serde_json::json!({"type": "text", "text": "Which?"}));

        let text_only = Item { id: "b", image: None, user: "Q" };
        let b = request_body(&RequestSpec { top_k: 5, ..spec(&extra, "<think>") }, &text_only, 0).unwrap();
        let m = b["messages"].as_array().unwrap();
        assert_eq!(m[1]["content"], "Q");
        assert_eq!(m[2], serde_json::json!({"role": "assistant", "content": "<think>"}));
        assert_eq!(
            (b["continue_final_message"].as_bool(), b["add_generation_prompt"].as_bool()),
            (Some(true), Some(false))
        );
        assert_eq!(b["top_k"], 5);
        let bad = Item { id: "c", image: Some(b"not an image"), user: "Q" };
        assert!(request_body(&spec(&extra, ""), &bad, 0).unwrap_err().contains("not a known image format"));
    }

    #[test]
    fn replies_are_cut_at_the_stop_string_like_local_generation() {
        let stops = vec!["</answer>".to_string()];
        let reply = |content: &str, reason: &str| {
            serde_json::json!({
                "model": "served-id",
                "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": reason}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 5},
            })
        };
        let r = parse_reply(&reply("x</think><answer>A</answer>\nmore <answer>B</answer>", "stop"), "<think>", &stops)
            .unwrap();
        assert_eq!(r.text, "<think>x</think><answer>A</answer>");
        assert_eq!((r.finish.as_str(), r.prompt_tokens, r.completion_tokens), ("stop_string", 11, 5));
        assert_eq!(r.model.as_deref(), Some("served-id"));
        assert_eq!(parse_reply(&reply("<answer>A", "length"), "", &stops).unwrap().finish, "length");
        assert_eq!(parse_reply(&reply("no tags", "stop"), "", &stops).unwrap().finish, "eos");
        let rec = ServedRecord::of("m", "<think>", &[r.clone(), ServedReply { model: None, ..r }]);
        assert_eq!((rec.server_models["served-id"], rec.unnamed), (1, 1));
        assert_eq!(rec.prefill_via.as_deref(), Some("continue_final_message"));
    }

    #[test]
    fn params_are_checked_with_their_path() {
        let ok = ServedParams { model: "m".into(), ..Default::default() };
        assert!(ok.validate().is_ok());
        let path = |p: ServedParams| p.validate().unwrap_err().path.join(".");
        assert_eq!(path(ServedParams::default()), "http.model");
        assert_eq!(path(ServedParams { url: "https://x/v1".into(), ..ok.clone() }), "http.url");
        assert_eq!(path(ServedParams { url: "x".into(), ..ok.clone() }), "http.url");
        assert_eq!(path(ServedParams { concurrency: 0, ..ok.clone() }), "http.concurrency");
        assert_eq!(path(ServedParams { timeout_s: f64::NAN, ..ok.clone() }), "http.timeout_s");
        assert_eq!(path(ServedParams { max_backoff_s: -1.0, ..ok.clone() }), "http.max_backoff_s");
        let extra = BTreeMap::from([("temperature".to_string(), serde_json::json!(1))]);
        assert_eq!(path(ServedParams { extra_body: extra, ..ok }), "http.extra_body.temperature");
    }
}
