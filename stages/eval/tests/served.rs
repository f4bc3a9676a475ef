//! The eval's `http` backend against in-process servers on 127.0.0.1: the
//! request shape (image part, messages, sampling params), retries counted
//! request by request (500, 429 with `Retry-After`, a stall past the
//! timeout, malformed JSON), a clear error when retries run out, a rerun
//! that asks only for what is missing, and the same predictions as the
//! local backend when the server is our own tiny checkpoint.

#[path = "support/fake_openai.rs"]
mod fake_openai;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use fake_openai::{FakeServer, Request, Response, completion};
use stage_api::{StageContext, StageKind};
use stages_eval::artifacts::{METRICS_JSON, PREDICTIONS_JSONL, SERVED_JSON};
use stages_eval::eval::{Eval, EvalBackend, EvalParams, generate_batch};
use stages_eval::predictions::{Prediction, read_jsonl};
use stages_eval::served::{RESUME_FILE, ServedParams};
use stages_task::dataset::{VqaRow, write_rows};
use stages_task::prompt::{PromptVariant, THINK_TEMPLATE};

const OPTIONS: [&str; 3] = ["A. airway abnormalities", "B. emphysema", "C. ground-glass opacity"];

fn encoded(w: u32, h: u32, shade: u8, format: image::ImageFormat) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([shade.wrapping_add((x * 3 + y) as u8)]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(img).write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A row whose question carries `marker` (how the fake servers tell items apart).
fn row(id: &str, marker: &str, image: Option<Vec<u8>>, answer: &str) -> VqaRow {
    let q = format!("Which lesion? [{marker}]\nOptions:\n{}", OPTIONS.join("\n"));
    let (class, class_name) = match answer {
        "A" => ("airway", "airway abnormalities"),
        "B" => ("emphysema", "emphysema"),
        _ => ("ggo", "ground-glass opacity"),
    };
    VqaRow {
        id: id.into(),
        image,
        problem: THINK_TEMPLATE.replace("{Question}", &q),
        answer: answer.into(),
        options: OPTIONS.map(String::from).to_vec(),
        class: class.into(),
        class_name: class_name.into(),
        answers: Vec::new(),
    }
}

fn split(dir: &Path, rows: &[VqaRow]) -> PathBuf {
    let data = dir.join("test");
    std::fs::create_dir_all(&data).unwrap();
    write_rows(&data.join("test-00000-of-00001.parquet"), rows).unwrap();
    data
}

fn served(url: &str) -> EvalParams {
    EvalParams {
        backend: EvalBackend::Http,
        http: ServedParams {
            url: url.into(),
            model: "served-qwen".into(),
            timeout_s: 5.0,
            backoff_s: 0.01,
            max_backoff_s: 0.05,
            ..Default::default()
        },
        max_new_tokens: 32,
        ..Default::default()
    }
}

fn run_eval(params: &EvalParams, data: &Path, out: &Path) -> anyhow::Result<()> {
    let mut ctx =
        StageContext::builder("eval_served", out).input("data", "export", Some("test"), data).seed(5).build()?;
    Eval::validate(params).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Eval::run(params, &mut ctx)
}

/// The marker of the item a request is about.
fn marker(body: &serde_json::Value) -> String {
    let text = body["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "user"))
        .map(|m| match &m["content"] {
            serde_json::Value::String(s) => s.clone(),
            parts => parts.as_array().into_iter().flatten().filter_map(|p| p["text"].as_str()).collect(),
        })
        .unwrap_or_default();
    text.split_once('[').and_then(|(_, r)| r.split_once(']')).map(|(m, _)| m.to_string()).unwrap_or_default()
}

/// What a request carried: its Authorization header, path and JSON body.
type Seen = (Option<String>, String, serde_json::Value);

/// Per-marker request counts.
#[derive(Default, Clone)]
struct Counts(Arc<Mutex<BTreeMap<String, usize>>>);

impl Counts {
    /// Count one more request for `m`; returns its attempt number (1-based).
    fn hit(&self, m: &str) -> usize {
        let mut c = self.0.lock().unwrap();
        let n = c.entry(m.to_string()).or_insert(0);
        *n += 1;
        *n
    }
    fn get(&self) -> BTreeMap<String, usize> {
        self.0.lock().unwrap().clone()
    }
}

#[test]
fn requests_carry_the_image_prompt_and_params_and_outputs_match_the_local_format() {
    let dir = tempfile::tempdir().unwrap();
    let png = encoded(56, 48, 10, image::ImageFormat::Png);
    let jpeg = encoded(40, 64, 90, image::ImageFormat::Jpeg);
    let rows = [
        row("c1/a/1", "m0", Some(png.clone()), "B"),
        row("c2/b/2", "m1", Some(jpeg.clone()), "A"),
        row("c3/c/3", "m2", None, "C"),
    ];
    let data = split(dir.path(), &rows);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let server = {
        let seen = seen.clone();
        FakeServer::start(move |r: &Request| {
            let Some(body) = r.json() else { return Response::raw(400, "{\"error\": \"body is not JSON\"}") };
            seen.lock().unwrap().push((r.header("authorization").map(str::to_string), r.path.clone(), body.clone()));
            // Trailing text after the answer: the client cuts it where local generation stops.
            let m = marker(&body);
            completion("Qwen/served-id", &format!(" looks like {m}</think><answer>B</answer>\nextra"), "stop", 40, 9)
        })
    };
    let params = EvalParams {
        prompt: PromptVariant::CotForcing,
        system: Some("Be brief.".into()),
        seed: Some(100),
        top_k: 4,
        http: ServedParams {
            concurrency: 2,
            extra_body: BTreeMap::from([("repetition_penalty".into(), serde_json::json!(1.05))]),
            ..served(&server.url()).http
        },
        ..served(&server.url())
    };
    let out = dir.path().join("out");
    run_eval(&params, &data, &out).unwrap();
    assert_eq!(server.requests(), 3, "one request per item");

    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|(_, _, b)| marker(b));
    let mut seeds = BTreeSet::new();
    for ((auth, path, body), (row, image)) in seen.iter().zip(rows.iter().zip([Some(&png), Some(&jpeg), None])) {
        assert_eq!(path, "/v1/chat/completions");
        assert_eq!(auth, &None, "no api_key_env: no Authorization header");
        assert_eq!(body["model"], "served-qwen");
        assert_eq!((body["max_tokens"].as_u64(), body["temperature"].as_f64()), (Some(32), Some(0.0)));
        assert_eq!((body["top_p"].as_f64(), body["top_k"].as_u64()), (Some(1.0), Some(4)));
        assert_eq!(body["repetition_penalty"], 1.05);
        assert!(body.get("stop").is_none() && body.get("stream").is_none());
        seeds.insert(body["seed"].as_u64().unwrap());
        let m = body["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3, "system, user, pre-filled assistant: {m:?}");
        assert_eq!(m[0], serde_json::json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[2], serde_json::json!({"role": "assistant", "content": "<think>"}));
        assert_eq!(
            (body["continue_final_message"].as_bool(), body["add_generation_prompt"].as_bool()),
            (Some(true), Some(false))
        );
        let user_text = THINK_TEMPLATE
            .replace("{Question}", &format!("Which lesion? [{}]\nOptions:\n{}", marker(body), OPTIONS.join("\n")));
        match image {
            Some(bytes) => {
                let parts = m[1]["content"].as_array().unwrap();
                assert_eq!(parts.len(), 2);
                let url = parts[0]["image_url"]["url"].as_str().unwrap();
                let (mime, b64) = url.strip_prefix("data:").unwrap().split_once(";base64,").unwrap();
                let decoded = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
                assert_eq!(&decoded, bytes, "{}: the image bytes travel unchanged", row.id);
                let img = image::load_from_memory(&decoded).unwrap();
                let want = image::load_from_memory(bytes).unwrap();
                assert_eq!((img.width(), img.height()), (want.width(), want.height()));
                assert_eq!(mime, if bytes == &png { "image/png" } else { "image/jpeg" });
                assert_eq!(parts[1], serde_json::json!({"type": "text", "text": user_text}));
            }
            None => assert_eq!(m[1]["content"], user_text, "a text-only item is a plain user message"),
        }
    }
    assert_eq!(seeds, BTreeSet::from([100, 101, 102]), "seed + item index");

    let preds = read_jsonl(&out.join(PREDICTIONS_JSONL)).unwrap();
    assert_eq!(preds.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["c1/a/1", "c2/b/2", "c3/c/3"]);
    for (p, m) in preds.iter().zip(["m0", "m1", "m2"]) {
        assert_eq!(p.completion, format!("<think> looks like {m}</think><answer>B</answer>"));
        assert_eq!((p.finish.as_str(), p.prompt_tokens, p.completion_tokens), ("stop_string", 40, 9));
        assert!(p.format_ok && p.valid);
        assert_eq!(p.predicted_class.as_deref(), Some("emphysema"));
    }
    assert_eq!(preds.iter().map(|p| p.correct).collect::<Vec<_>>(), [true, false, false]);
    let metrics: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(METRICS_JSON)).unwrap()).unwrap();
    assert_eq!((metrics["n"].as_u64(), metrics["accuracy"]["k"].as_u64()), (Some(3), Some(1)));
    assert_eq!(
        metrics["source"],
        serde_json::json!({"model": "served:served-qwen", "data": "export.test", "dataset": "export.test", "split": "test",
            "prompt": "cot_forcing", "answer_match": "choice"})
    );
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(SERVED_JSON)).unwrap()).unwrap();
    assert_eq!(
        record,
        serde_json::json!({"backend": "http", "model": "served-qwen", "server_models": {"Qwen/served-id": 3},
                           "unnamed": 0, "prefill_via": "continue_final_message"})
    );
}

#[test]
fn retries_absorb_500_429_stalls_and_bad_json_and_every_request_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let markers = ["ok0", "e500x2", "e429", "stall", "badjson", "ok1"];
    let rows: Vec<VqaRow> = markers
        .iter()
        .enumerate()
        .map(|(i, m)| row(&format!("r{i}"), m, Some(encoded(32, 32, i as u8 * 40, image::ImageFormat::Png)), "A"))
        .collect();
    let data = split(dir.path(), &rows);
    let counts = Counts::default();
    let server = {
        let counts = counts.clone();
        FakeServer::start(move |r: &Request| {
            let body = r.json().unwrap_or_default();
            let m = marker(&body);
            let attempt = counts.hit(&m);
            let ok = completion("srv", &format!("x</think><answer>A</answer>{m}"), "stop", 5, 3);
            match (m.as_str(), attempt) {
                ("e500x2", 1 | 2) => Response::raw(500, "{\"error\": \"boom\"}"),
                // Retry-After 1 s, capped by max_backoff_s: the wait rule is unit-tested in chat_api.
                ("e429", 1) => Response::raw(429, "{\"error\": \"slow down\"}").header("Retry-After", "1"),
                ("stall", 1) => ok.after(Duration::from_millis(1500)),
                ("badjson", 1) => Response::raw(200, "{\"choices\": [{\"message\": "),
                _ => ok,
            }
        })
    };
    let mut params = served(&server.url());
    params.http.timeout_s = 0.3;
    params.http.retries = 3;
    params.http.concurrency = 3;
    let out = dir.path().join("out");
    run_eval(&params, &data, &out).unwrap();
    let want: BTreeMap<String, usize> =
        [("ok0", 1), ("e500x2", 3), ("e429", 2), ("stall", 2), ("badjson", 2), ("ok1", 1)]
            .into_iter()
            .map(|(m, n)| (m.to_string(), n))
            .collect();
    assert_eq!(counts.get(), want);
    assert_eq!(server.requests(), 11);
    let preds = read_jsonl(&out.join(PREDICTIONS_JSONL)).unwrap();
    assert_eq!(preds.len(), 6, "nothing lost");
    for (p, (r, m)) in preds.iter().zip(rows.iter().zip(markers)) {
        assert_eq!(p.id, r.id, "input order");
        assert_eq!(p.completion, "x</think><answer>A</answer>", "{m}: cut at the stop string");
        assert!(p.correct);
    }
}

#[test]
fn exhausted_retries_fail_clearly_and_a_rerun_asks_only_for_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<VqaRow> = ["ok0", "down", "ok2", "ok3"]
        .iter()
        .enumerate()
        .map(|(i, m)| row(&format!("r{i}"), m, Some(encoded(32, 32, 7, image::ImageFormat::Png)), "A"))
        .collect();
    let data = split(dir.path(), &rows);
    let counts = Counts::default();
    let flaky = {
        let counts = counts.clone();
        FakeServer::start(move |r: &Request| {
            let m = marker(&r.json().unwrap_or_default());
            counts.hit(&m);
            if m == "down" {
                Response::raw(503, "{\"error\": \"overloaded\"}")
            } else {
                completion("srv", "first</think><answer>A</answer>", "stop", 5, 3)
            }
        })
    };
    // One request at a time: r0 succeeds, r1 fails for good, r2 and r3 are never asked.
    let mut params = served(&flaky.url());
    params.http.retries = 2;
    params.http.concurrency = 1;
    let out = dir.path().join("out");
    let err = format!("{:#}", run_eval(&params, &data, &out).unwrap_err());
    for want in ["item `r1`", "HTTP 503", "overloaded", "3 attempts", "retries exhausted", "1 of 4 replies are kept"] {
        assert!(err.contains(want), "missing {want:?} in: {err}");
    }
    assert_eq!(counts.get(), BTreeMap::from([("down".to_string(), 3), ("ok0".to_string(), 1)]));
    assert!(!out.join(PREDICTIONS_JSONL).exists(), "no partial outputs");
    let saved = std::fs::read_to_string(out.with_extension("resume").join(RESUME_FILE)).unwrap();
    assert_eq!(saved.lines().count(), 1);

    // The server recovers: the rerun (same stage, same resume dir) asks for r1..r3 only.
    let healthy = FakeServer::start(|_: &Request| completion("srv", "second</think><answer>A</answer>", "stop", 5, 3));
    params.http.url = healthy.url();
    run_eval(&params, &data, &out).unwrap();
    assert_eq!(healthy.requests(), 3);
    let preds = read_jsonl(&out.join(PREDICTIONS_JSONL)).unwrap();
    let texts: Vec<&str> = preds.iter().map(|p| p.completion.as_str()).collect();
    assert_eq!(
        texts,
        [
            "first</think><answer>A</answer>",
            "second</think><answer>A</answer>",
            "second</think><answer>A</answer>",
            "second</think><answer>A</answer>"
        ]
    );
}

#[test]
fn refusals_are_not_retried_and_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [row("r0", "m0", Some(encoded(32, 32, 1, image::ImageFormat::Png)), "A")];
    let data = split(dir.path(), &rows);
    // A server without the prefill extension refuses the trailing assistant turn.
    let server = FakeServer::start(|r: &Request| {
        if r.json().is_some_and(|b| b.get("continue_final_message").is_some()) {
            Response::raw(400, "{\"error\": \"extra fields not permitted: continue_final_message\"}")
        } else {
            Response::raw(401, "{\"error\": \"invalid api key\"}")
        }
    });
    let params = EvalParams { prompt: PromptVariant::CotForcing, ..served(&server.url()) };
    let err = format!("{:#}", run_eval(&params, &data, &dir.path().join("a")).unwrap_err());
    assert!(err.contains("HTTP 400") && err.contains("1 attempt, not retryable"), "{err}");
    assert!(err.contains("continue_final_message"), "{err}");
    assert_eq!(server.requests(), 1);
    let err = format!("{:#}", run_eval(&served(&server.url()), &data, &dir.path().join("b")).unwrap_err());
    assert!(err.contains("HTTP 401") && err.contains("http.api_key_env"), "{err}");
    assert_eq!(server.requests(), 2);
    // A named key variable that is not set stops the stage before any request.
    let mut params = served(&server.url());
    params.http.api_key_env = Some("MEDREASON_TEST_UNSET_KEY_VAR".into());
    let err = format!("{:#}", run_eval(&params, &data, &dir.path().join("c")).unwrap_err());
    assert!(err.contains("MEDREASON_TEST_UNSET_KEY_VAR") && err.contains("http.api_key_env"), "{err}");
    assert_eq!(server.requests(), 2);
}

/// Our tiny checkpoint behind a minimal chat-completions wrapper that runs
/// the local backend's own generation on what the request carries.
fn serve_checkpoint(model: &Path) -> FakeServer {
    use stages_vlm::generate::GenerationConfig;
    let answerer = stages_eval::eval::Answerer::load(model, tch::Kind::Float, tch::Device::Cpu).unwrap();
    let answerer = Mutex::new(answerer);
    FakeServer::start(move |r: &Request| {
        let Some(body) = r.json() else { return Response::raw(400, "{}") };
        let messages = body["messages"].as_array().cloned().unwrap_or_default();
        let system = messages.iter().find(|m| m["role"] == "system").and_then(|m| m["content"].as_str());
        let prefill = match messages.last() {
            Some(m) if m["role"] == "assistant" && body["continue_final_message"] == true => {
                m["content"].as_str().unwrap_or("").to_string()
            }
            _ => String::new(),
        };
        let Some(user) = messages.iter().find(|m| m["role"] == "user") else { return Response::raw(400, "{}") };
        let (text, image) = match &user["content"] {
            serde_json::Value::String(s) => (s.clone(), None),
            parts => {
                let parts = parts.as_array().cloned().unwrap_or_default();
                let text = parts.iter().filter_map(|p| p["text"].as_str()).collect::<String>();
                let image = parts.iter().filter_map(|p| p["image_url"]["url"].as_str()).next().and_then(|u| {
                    let b64 = u.split_once(";base64,")?.1;
                    base64::engine::general_purpose::STANDARD.decode(b64).ok()
                });
                (text, image)
            }
        };
        let a = answerer.lock().unwrap();
        let params = EvalParams {
            prompt: if prefill.is_empty() { PromptVariant::Think } else { PromptVariant::CotForcing },
            cot_prefill: prefill.clone(),
            system: system.map(str::to_string),
            ..Default::default()
        };
        let cfg = GenerationConfig {
            max_new_tokens: body["max_tokens"].as_u64().unwrap_or(16) as usize,
            temperature: body["temperature"].as_f64().unwrap_or(0.0),
            top_p: body["top_p"].as_f64().unwrap_or(1.0),
            seed: body["seed"].as_u64().unwrap_or(0),
            eos_token_ids: a.tokenizer.eos_ids.iter().map(|&e| i64::from(e)).collect(),
            ..Default::default()
        };
        let row = VqaRow {
            id: "served".into(),
            image,
            problem: String::new(),
            answer: String::new(),
            options: Vec::new(),
            class: String::new(),
            class_name: String::new(),
            answers: Vec::new(),
        };
        let g = match generate_batch(&a, &[&row], &[text], &params, &cfg) {
            Ok(mut g) => g.remove(0),
            Err(e) => return Response::raw(500, serde_json::json!({"error": e.to_string()}).to_string()),
        };
        let content = g.text.strip_prefix(&prefill).unwrap_or(&g.text).to_string();
        let finish = if g.finish == "length" { "length" } else { "stop" };
        completion("tiny", &content, finish, g.prompt_tokens as u64, g.completion_tokens as u64)
    })
}

#[test]
fn a_served_checkpoint_gives_the_local_backends_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let mut ctx = StageContext::builder("tiny", &model).seed(3).build().unwrap();
    stages_vlm::InitModel::run(&Default::default(), &mut ctx).unwrap();
    let rows = [
        row("c1", "m0", Some(encoded(56, 56, 10, image::ImageFormat::Png)), "A"),
        row("c2", "m1", Some(encoded(64, 56, 90, image::ImageFormat::Png)), "B"),
        row("c3", "m2", Some(encoded(56, 84, 200, image::ImageFormat::Png)), "C"),
    ];
    let data = split(dir.path(), &rows);
    let server = serve_checkpoint(&model);
    for prompt in [PromptVariant::CotForcing, PromptVariant::NoThink] {
        let base = EvalParams { prompt, max_new_tokens: 12, batch_size: 2, ..Default::default() };
        let local_out = dir.path().join(format!("local-{prompt:?}"));
        let mut ctx = StageContext::builder("eval", &local_out)
            .input("model", "tiny", None, &model)
            .input("data", "export", Some("test"), &data)
            .seed(5)
            .build()
            .unwrap();
        Eval::run(&base, &mut ctx).unwrap();
        let served_out = dir.path().join(format!("served-{prompt:?}"));
        let params = EvalParams {
            backend: EvalBackend::Http,
            http: ServedParams { url: server.url(), model: "tiny".into(), concurrency: 2, ..Default::default() },
            ..base
        };
        run_eval(&params, &data, &served_out).unwrap();
        let local: Vec<Prediction> = read_jsonl(&local_out.join(PREDICTIONS_JSONL)).unwrap();
        let remote: Vec<Prediction> = read_jsonl(&served_out.join(PREDICTIONS_JSONL)).unwrap();
        assert_eq!(remote, local, "{prompt:?}: every field of every prediction");
        let metrics = |d: &Path| {
            let mut m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(d.join(METRICS_JSON)).unwrap()).unwrap();
            m["source"]["model"].take()
        };
        assert_eq!((metrics(&local_out), metrics(&served_out)), ("tiny".into(), "served:tiny".into()));
        let strip = |d: &Path| {
            let mut m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(d.join(METRICS_JSON)).unwrap()).unwrap();
            m["source"]["model"] = serde_json::Value::Null;
            m
        };
        assert_eq!(strip(&served_out), strip(&local_out), "{prompt:?}: the same metrics.json apart from the model");
    }
}
