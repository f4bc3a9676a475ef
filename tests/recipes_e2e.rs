//! The shipped recipes through the real binary: every recipe validates, and
//! `recipes/ci.toml` runs end to end, then reruns entirely from the cache.

use std::path::Path;
use std::process::{Command, Output};

fn pipeline(args: &[&str], workspace: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .env("PIPELINE_WORKSPACE", workspace)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running pipeline")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn recipe_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("recipes dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            recipe_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path.strip_prefix(env!("CARGO_MANIFEST_DIR")).expect("relative").display().to_string());
        }
    }
}

#[test]
fn every_shipped_recipe_plans_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    let mut recipes = Vec::new();
    recipe_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes"), &mut recipes);
    assert!(recipes.iter().any(|r| r.ends_with("mini.toml")), "{recipes:?}");
    for recipe in recipes {
        let out = pipeline(&["plan", &recipe, "--cache-dir", cache.to_str().expect("utf8")], tmp.path());
        assert!(out.status.success(), "plan {recipe} failed:\n{}", text(&out));
    }
}

#[test]
fn full_recipe_plans_without_data_or_gpu() {
    // The paper's recipe must be checkable on a laptop: missing data, model
    // and GPU are warnings in the plan, not errors.
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    let missing_data = tmp.path().join("no-such-ReXGroundingCT");
    let missing_model = tmp.path().join("no-such-Qwen2.5-VL-7B-Instruct");
    let out = pipeline(
        &[
            "plan",
            "recipes/full.toml",
            "--cache-dir",
            cache.to_str().expect("utf8"),
            "--set",
            &format!("index.root={}", missing_data.display()),
            "--set",
            &format!("base_model.path={}", missing_model.display()),
        ],
        tmp.path(),
    );
    let out_text = text(&out);
    assert!(out.status.success(), "plan full.toml failed:\n{out_text}");
    for missing in [&missing_data, &missing_model] {
        assert!(
            out_text.contains(&format!("{} does not exist", missing.display())),
            "no warning about {}:\n{out_text}",
            missing.display()
        );
    }
    // Every stage of the paper's pipeline is in the plan, to run.
    for stage in ["index", "export", "sft", "grpo", "eval", "eval_nothink", "eval_sft", "eval_base", "judge", "report"]
    {
        assert!(
            out_text.lines().any(|l| l.split_whitespace().next() == Some(stage) && l.contains(" run ")),
            "stage {stage} missing from the plan:\n{out_text}"
        );
    }
    // Training asks for a GPU: granted where one is, else a warning (not an error).
    assert!(
        out_text.contains("stage `sft` requests a CUDA device")
            || out_text.lines().any(|l| l.starts_with("sft ") && l.contains("dev=cuda")),
        "sft does not ask for CUDA:\n{out_text}"
    );
}

#[test]
fn ci_recipe_runs_then_reruns_from_cache() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    let cache = cache.to_str().expect("utf8");
    let first = pipeline(&["run", "recipes/ci.toml", "--cache-dir", cache], tmp.path());
    assert!(first.status.success(), "first run failed:\n{}", text(&first));
    assert!(text(&first).contains(" 0 failed"), "{}", text(&first));

    // GRPO checkpointed into its resume dir; publishing removed it.
    let resume = Path::new(cache).join("resume");
    let left: Vec<_> = std::fs::read_dir(&resume).expect("resume dir").collect();
    assert!(left.is_empty(), "resume state left after a successful run: {left:?}");

    let second = pipeline(&["run", "recipes/ci.toml", "--cache-dir", cache], tmp.path());
    let second_text = text(&second);
    assert!(second.status.success(), "rerun failed:\n{second_text}");
    assert!(second_text.contains(": 0 ran,"), "rerun ran something:\n{second_text}");

    // The exported dataset is real Parquet with both sides of the split.
    let export = tmp.path().join("outputs/ci/export");
    for side in ["train", "test"] {
        let shards: Vec<_> = std::fs::read_dir(export.join(side))
            .unwrap_or_else(|e| panic!("{side}: {e}"))
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
            .collect();
        assert!(!shards.is_empty(), "no {side} shards in {}", export.display());
    }

    // The model learnt something on held-out patients: the output format,
    // and most classes, not only the majority one (always answering the most
    // frequent class gives a macro accuracy of 1/7; ci measured 0.99).
    let metrics_path = tmp.path().join("outputs/ci/eval/metrics.json");
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&metrics_path).expect("eval metrics.json")).expect("json");
    let value = |key: &str| metrics[key]["value"].as_f64().or_else(|| metrics[key].as_f64());
    let format = value("format_rate").expect("format_rate");
    let macro_acc = value("macro_accuracy").expect("macro_accuracy");
    let acc = value("accuracy").expect("accuracy");
    eprintln!("ci held-out: accuracy {acc:.3}, macro {macro_acc:.3}, format {format:.3}");
    assert!(format >= 0.9, "format rate {format}");
    assert!(macro_acc >= 0.5, "macro accuracy {macro_acc}: the classes were not learnt");
}
