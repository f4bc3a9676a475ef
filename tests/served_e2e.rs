//! `recipes/examples/served_baseline.toml` through the real binary against
//! an in-process fake OpenAI-compatible server on 127.0.0.1 (a random port,
//! passed with `--set`): the served evals reach the report like local ones,
//! the API key goes out in the Authorization header and nowhere else (not
//! in the cache, outputs, provenance, run summaries or logs), a rerun comes
//! from the cache, and a `model` input given to an `http` eval is a located
//! recipe error. Costs a few seconds: 6 phantom cases, 10 test items.

#[path = "../stages/eval/tests/support/fake_openai.rs"]
mod fake_openai;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use fake_openai::{FakeServer, Request, Response, completion};

const RECIPE: &str = "recipes/examples/served_baseline.toml";
const KEY_VAR: &str = "MEDREASON_SERVED_E2E_KEY";
const SECRET: &str = "sk-e2e-7f3a9c21-never-written-down";
const SERVED_ID: &str = "Qwen/Qwen2.5-VL-72B-Instruct";

fn pipeline(args: &[&str], workspace: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .env("PIPELINE_WORKSPACE", workspace)
        .env(KEY_VAR, SECRET)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running pipeline")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// What is wrong with a request, if anything (checked on the server side,
/// answered with a 400 and listed for the test to report).
fn problems(r: &Request) -> Vec<String> {
    let mut bad = Vec::new();
    if r.method != "POST" || r.path != "/v1/chat/completions" {
        bad.push(format!("{} {}", r.method, r.path));
    }
    if r.header("authorization") != Some(&format!("Bearer {SECRET}")) {
        bad.push("no bearer token from the named variable".into());
    }
    let Some(body) = r.json() else {
        bad.push("body is not JSON".into());
        return bad;
    };
    if body["model"] != "qwen2.5-vl-72b" || body["max_tokens"] != 256 || body["temperature"].as_f64() != Some(0.0) {
        bad.push(format!("params: {} {} {}", body["model"], body["max_tokens"], body["temperature"]));
    }
    let user = body["messages"].as_array().and_then(|m| m.iter().find(|m| m["role"] == "user"));
    let parts = user.and_then(|u| u["content"].as_array()).cloned().unwrap_or_default();
    let image = parts
        .first()
        .and_then(|p| p["image_url"]["url"].as_str())
        .and_then(|u| u.strip_prefix("data:image/png;base64,"))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|bytes| image::load_from_memory(&bytes).ok());
    if image.is_none() {
        bad.push("no decodable PNG image part first".into());
    }
    if !parts.get(1).and_then(|p| p["text"].as_str()).is_some_and(|t| t.contains("Options:")) {
        bad.push("no question text part".into());
    }
    bad
}

fn served_reply(r: &Request) -> Response {
    let body = r.json().unwrap_or_default();
    let think = body.to_string().contains("Think through");
    let content = if think { "<think>Low attenuation areas.</think><answer>B</answer>" } else { "<answer>B</answer>" };
    completion(SERVED_ID, content, "stop", 300, 12)
}

/// Files under `dir` holding `needle` (symlinks not followed: outputs link into the cache).
fn files_containing(dir: &Path, needle: &[u8], found: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            files_containing(&path, needle, found);
        } else if kind.is_file()
            && std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        {
            found.push(path.display().to_string());
        }
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn served_baseline_runs_against_a_fake_server_and_keeps_the_key_secret() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    let cache = cache.to_str().expect("utf8");
    let bad: Arc<Mutex<Vec<String>>> = Arc::default();
    let server = {
        let bad = bad.clone();
        FakeServer::start(move |r: &Request| {
            let p = problems(r);
            if p.is_empty() {
                served_reply(r)
            } else {
                bad.lock().expect("lock").extend(p.iter().cloned());
                Response::raw(400, serde_json::json!({"error": p.join("; ")}).to_string())
            }
        })
    };
    let url = server.url();
    let sets: Vec<String> = ["eval_served", "eval_served_nothink"]
        .iter()
        .flat_map(|s| [format!("{s}.http.url={url}"), format!("{s}.http.api_key_env={KEY_VAR}")])
        .collect();
    let mut args = vec!["run", RECIPE, "--cache-dir", cache];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let first = pipeline(&args, tmp.path());
    let first_text = text(&first);
    assert!(first.status.success(), "run failed:\n{first_text}");
    assert_eq!(bad.lock().expect("lock").clone(), Vec::<String>::new(), "malformed requests");

    let outputs = tmp.path().join("outputs/served_baseline");
    let mut n_items = 0;
    for (stage, think) in [("eval_served", true), ("eval_served_nothink", false)] {
        let dir = outputs.join(stage);
        let preds: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("predictions.jsonl"))
            .expect("predictions.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a prediction"))
            .collect();
        assert!(!preds.is_empty());
        n_items = preds.len();
        let want = if think { "<think>Low attenuation areas.</think><answer>B</answer>" } else { "<answer>B</answer>" };
        assert!(preds.iter().all(|p| p["completion"] == want && p["format_ok"] == true), "{stage}");
        let gold_b = preds.iter().filter(|p| p["gold"] == "B").count() as u64;
        let m = json(&dir.join("metrics.json"));
        assert_eq!((m["n"].as_u64(), m["accuracy"]["k"].as_u64()), (Some(n_items as u64), Some(gold_b)), "{stage}");
        assert_eq!(m["source"]["model"], "served:qwen2.5-vl-72b");
        assert_eq!(json(&dir.join("served.json"))["server_models"], serde_json::json!({SERVED_ID: n_items}));
        let prov = json(&dir.join("provenance.json"));
        assert_eq!(prov["params"]["http"]["model"], "qwen2.5-vl-72b", "the served name is in provenance");
        assert_eq!(prov["params"]["http"]["api_key_env"], KEY_VAR, "the variable's name, not its value");
    }
    assert_eq!(server.requests(), 2 * n_items, "one request per item and eval");
    let report = std::fs::read_to_string(outputs.join("report/report.md")).expect("report.md");
    for label in ["Qwen2.5-VL-72B (served, think)", "Qwen2.5-VL-72B (served, no think)", "Table 1, served baseline"] {
        assert!(report.contains(label), "{label} missing from the report:\n{report}");
    }

    // The key is nowhere: cache (stage logs in cache/logs), outputs, run summaries, console.
    let mut leaks = Vec::new();
    files_containing(tmp.path(), SECRET.as_bytes(), &mut leaks);
    assert_eq!(leaks, Vec::<String>::new(), "files holding the API key");
    assert!(!first_text.contains(SECRET), "the console shows the API key");
    let mut logs = Vec::new();
    files_containing(&Path::new(cache).join("logs"), b"asking the served model", &mut logs);
    assert!(!logs.is_empty(), "the stage logs were not searched (no served eval log found)");

    // Cached: nothing is asked again.
    let second = pipeline(&args, tmp.path());
    assert!(second.status.success() && text(&second).contains(": 0 ran,"), "rerun:\n{}", text(&second));
    assert_eq!(server.requests(), 2 * n_items);

    // An `http` eval with a `model` input is a recipe error at the line of `backend`.
    let with_model = pipeline(&["plan", RECIPE, "--cache-dir", cache, "--set", "eval_served.model=export"], tmp.path());
    let msg = text(&with_model);
    assert!(!with_model.status.success(), "{msg}");
    assert!(msg.contains("parameter `backend` of stage `eval_served`") && msg.contains("`model` input"), "{msg}");
    assert!(msg.contains("served_baseline.toml:"), "located in the recipe: {msg}");
    // A local eval without one, too.
    let local = pipeline(&["plan", RECIPE, "--cache-dir", cache, "--set", "eval_served.backend=local"], tmp.path());
    let msg = text(&local);
    assert!(!local.status.success() && msg.contains("needs the `model` input"), "{msg}");
}
