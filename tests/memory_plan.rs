//! `pipeline plan` / `show` predict per-rank memory for the paper's recipe
//! from the committed Qwen2.5-VL-7B config (no weights), check it against
//! the GPU's memory and name the term to shrink.

use std::path::{Path, PathBuf};
use std::process::Output;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/qwen2_5_vl_7b")
}

/// `pipeline <args> recipes/full.toml --cache-dir … --set base_model.path=<fixture> <sets>`.
fn full(cmd: &[&str], sets: &[&str], cache: &Path) -> String {
    let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
    args.extend(["--cache-dir".into(), cache.display().to_string()]);
    args.extend(["--set".into(), format!("base_model.path={}", fixture().display())]);
    args.extend(["--set".into(), format!("index.root={}", cache.join("no-data").display())]);
    for s in sets {
        args.extend(["--set".into(), s.to_string()]);
    }
    let out: Output = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(&args)
        .env("PIPELINE_WORKSPACE", cache)
        .current_dir(root())
        .output()
        .expect("running pipeline");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pipeline {args:?} failed:\n{text}");
    text
}

fn line<'a>(plan: &'a str, stage: &str) -> &'a str {
    plan.lines().find(|l| l.split_whitespace().next() == Some(stage)).unwrap_or_default()
}

/// The warnings printed under a stage's row.
fn warnings_of<'a>(plan: &'a str, stage: &str) -> Vec<&'a str> {
    let mut lines = plan.lines().skip_while(|l| l.split_whitespace().next() != Some(stage)).skip(1);
    let mut out = Vec::new();
    for l in lines.by_ref() {
        if !l.starts_with("  ") {
            break;
        }
        out.push(l);
    }
    out
}

#[test]
fn the_paper_recipe_prints_per_rank_memory_and_warns_where_it_will_not_fit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path();
    // As shipped (ZeRO-1 SFT, ZeRO-2 GRPO over 8 ranks) on the paper's H20s.
    let shipped = full(&["plan", "recipes/full.toml"], &[], cache);
    assert!(
        shipped.contains("GPU memory per rank vs 96.0G ([executor] gpu_memory_gb = 96): all 11 CUDA stages"),
        "{shipped}"
    );
    for stage in ["sft", "grpo"] {
        assert!(line(&shipped, stage).contains("/96.0G host"), "{stage}: {shipped}");
    }
    // The rest: unsharded, as a recipe without `shard` runs.
    const UNSHARDED: [&str; 2] = ["sft.shard=none", "grpo.shard=none"];
    let full = |cmd: &[&str], sets: &[&str], cache: &Path| {
        let sets: Vec<&str> = sets.iter().copied().chain(UNSHARDED).collect();
        full(cmd, &sets, cache)
    };
    // An H200 (141 GiB), unsharded: SFT and the evaluations fit; GRPO (its
    // reference copy and a 5 × 1000-token micro-batch more) leaves under 10 %.
    let h200 = full(&["plan", "recipes/full.toml"], &["executor.gpu_memory_gb=141"], cache);
    for stage in ["sft", "eval", "eval_base_nothink"] {
        let l = line(&h200, stage);
        assert!(l.contains("gpu ") && l.contains("/141.0G host "), "{stage}: {l}\n{h200}");
        assert!(warnings_of(&h200, stage).iter().all(|w| !w.contains("on the GPU")), "{h200}");
    }
    let w = warnings_of(&h200, "grpo").join("\n");
    assert!(w.contains("leaves under 10 % headroom: 141.0G"), "{w}");
    assert!(
        h200.contains("GPU memory per rank vs 141.0G ([executor] gpu_memory_gb = 141): 1 of 11 CUDA stages"),
        "{h200}"
    );
    // Enough memory for all of them.
    let b200 = full(&["plan", "recipes/full.toml"], &["executor.gpu_memory_gb=180"], cache);
    assert!(b200.contains("all 11 CUDA stages with a prediction fit with headroom"), "{b200}");

    // Unsharded on an 80 GiB H100: SFT and GRPO do not fit; the optimizer
    // moments are the biggest term; the evaluations still fit.
    let h100 = full(&["plan", "recipes/full.toml"], &["executor.gpu_memory_gb=80"], cache);
    for stage in ["sft", "grpo"] {
        assert!(line(&h100, stage).contains("/80.0G !"), "{h100}");
        let w = warnings_of(&h100, stage).join("\n");
        assert!(w.contains("per rank on the GPU during training micro-batch, does not fit: 80.0G"), "{stage}: {w}");
        assert!(w.contains("([executor] gpu_memory_gb = 80); biggest term: optimizer moments"), "{stage}: {w}");
        assert!(w.contains("to shrink it: shard = \"optimizer\""), "{stage}: {w}");
    }
    assert!(!line(&h100, "eval").contains('!'), "{h100}");
    assert!(h100.contains("2 of 11 CUDA stages do not fit with headroom"), "{h100}");

    // A micro-batch too big for the GPU: activations become the biggest term,
    // and the warning names the setting: activation checkpointing first; once
    // it is on, the logits of a huge micro-batch lead and the micro-batch is
    // the setting.
    let big = full(&["plan", "recipes/full.toml"], &["executor.gpu_memory_gb=141", "sft.batch_size=64"], cache);
    let w = warnings_of(&big, "sft").join("\n");
    assert!(
        w.contains("biggest term: activations") && w.contains("to shrink it: gradient_checkpointing = true"),
        "{w}"
    );
    let sets = ["executor.gpu_memory_gb=141", "sft.batch_size=512", "sft.gradient_checkpointing=true"];
    let big = full(&["plan", "recipes/full.toml"], &sets, cache);
    let w = warnings_of(&big, "sft").join("\n");
    assert!(w.contains("biggest term: logits") && w.contains("to shrink it: batch_size"), "{w}");
    // A small GPU: the 7B weights alone leave the evaluation no headroom.
    let small = full(&["plan", "recipes/full.toml"], &["executor.gpu_memory_gb=16"], cache);
    let w = warnings_of(&small, "eval_base").join("\n");
    assert!(w.contains("does not fit: 16.0G") && w.contains("biggest term: weights"), "{w}");
}

#[test]
fn json_and_show_carry_the_breakdown_and_memory_stays_out_of_the_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path();
    // Unsharded (as a recipe without `shard` runs).
    let plan = |sets: &[&str]| -> serde_json::Value {
        let sets: Vec<&str> = sets.iter().copied().chain(["sft.shard=none", "grpo.shard=none"]).collect();
        serde_json::from_str(&full(&["plan", "recipes/full.toml", "--json"], &sets, cache)).expect("plan --json")
    };
    let stage = |p: &serde_json::Value, id: &str| -> serde_json::Value {
        p["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).cloned().unwrap()
    };
    let eight = plan(&[]);
    let sft = stage(&eight, "sft");
    assert_eq!(sft["memory"]["state"], "predicted", "{sft}");
    let host = sft["memory"]["host_peak_bytes"].as_u64().unwrap();
    let gpu = sft["memory"]["gpu_peak_bytes"].as_u64().unwrap();
    assert!(gpu > 96 << 30, "unsharded SFT of the 7B exceeds 96 GiB: {gpu}");
    assert_eq!(sft["memory"]["gpu_fit"]["fits"], false);
    assert_eq!(sft["resources"]["ranks"], 8);
    assert_eq!(sft["resources"]["memory_mb"].as_u64().unwrap(), 8 * host.div_ceil(1 << 20), "--mem is host × ranks");
    assert_eq!(eight["gpu_memory"]["source"], "[executor] gpu_memory_gb = 96");
    // Two ranks: the same per-rank prediction, a quarter of the job's memory, the same key.
    let two = plan(&["executor.stage.sft.ranks=2", "executor.gpu_memory_gb=141"]);
    let sft2 = stage(&two, "sft");
    assert_eq!(sft2["memory"]["gpu_peak_bytes"].as_u64().unwrap(), gpu);
    assert_eq!(sft2["resources"]["memory_mb"].as_u64().unwrap(), 2 * host.div_ceil(1 << 20));
    assert_eq!(sft2["memory"]["gpu_fit"]["fits"], true);
    for id in ["sft", "grpo", "eval"] {
        assert_eq!(stage(&eight, id)["key"], stage(&two, id)["key"], "{id}: memory settings changed the key");
    }

    let show = full(&["show", "recipes/full.toml", "grpo"], &["grpo.shard=none"], cache);
    for needle in [
        "memory per rank, 8 ranks (predicted",
        "  GPU: peak ",
        "    weights ",
        "    gradients ",
        "    optimizer moments ",
        "    f32 masters ",
        "    reference model ",
        "    while generation: +",
        "      KV cache ",
        "    while training micro-batch (peak): +",
        "      activations ",
        "      logits ",
        "  host: peak ",
        "images ≤ 401408 px (data bound) → 512 image tokens",
        "  GPU: needs ",
    ] {
        assert!(show.contains(needle), "missing `{needle}` in\n{show}");
    }
}

#[test]
fn memory_is_unknown_until_the_model_input_can_be_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("no-model");
    let plan = full(&["plan", "recipes/full.toml"], &[&format!("base_model.path={}", missing.display())], tmp.path());
    assert!(line(&plan, "sft").contains(" ? "), "{plan}");
    assert!(plan.contains("  memory: unknown until `base_model` runs (admission assumes 4096M)"), "{plan}");
    // GRPO reads SFT's output, which has no stand-in while SFT's own input is missing.
    assert!(warnings_of(&plan, "grpo").iter().any(|w| w.contains("unknown until `sft` runs")), "{plan}");
}

/// A small recipe of its own: a tiny Qwen2-VL checkpoint (`model_type
/// qwen2_vl`, the vlm parity fixture) imported, SFT and an eval on CUDA.
fn small_recipe(dir: &Path, gpu_memory_gb: &str) -> PathBuf {
    let model = root().join("stages/vlm/tests/fixtures/parity_qwen2vl/checkpoint");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let recipe = dir.join(format!("small_{gpu_memory_gb}.toml"));
    let text = format!(
        r#"[recipe]
name = "memory_small"

[executor]
gpu_memory_gb = {gpu_memory_gb}

[stage.base]
kind = "files"
path = "{model}"

[stage.data]
kind = "files"
path = "{data}"

[stage.sft]
kind = "sft"
model = "base"
data = "data"
device = "cuda"
batch_size = 2

[stage.eval]
kind = "eval"
model = "sft"
data = "data"
device = "cuda"
"#,
        model = model.display(),
        data = data.display(),
    );
    std::fs::write(&recipe, text).expect("writing the recipe");
    recipe
}

fn plan_small(dir: &Path, gpu_memory_gb: &str) -> String {
    let recipe = small_recipe(dir, gpu_memory_gb);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["plan", &recipe.display().to_string(), "--cache-dir", &dir.join("cache").display().to_string()])
        .env("PIPELINE_WORKSPACE", dir)
        .output()
        .expect("running pipeline");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "plan failed:\n{text}");
    text
}

#[test]
fn a_small_recipe_gets_the_column_and_a_warning_only_when_the_gpu_is_too_small() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The tiny model's SFT needs a few MiB per rank: 5 MiB of GPU is too little.
    let low = plan_small(tmp.path(), "0.005");
    let header = low.lines().next().unwrap_or_default();
    assert!(header.contains("MEMORY/RANK"), "{low}");
    for stage in ["sft", "eval"] {
        let l = line(&low, stage);
        assert!(l.contains("gpu ") && l.contains("M/5.1M !") && l.contains(" host "), "{stage}: {l}\n{low}");
        let w = warnings_of(&low, stage).join("\n");
        assert!(w.contains("does not fit: 5.1M") && w.contains("([executor] gpu_memory_gb = 0.005)"), "{w}");
        assert!(w.contains("; biggest term: "), "{w}");
    }
    // SFT names the setting that shrinks its biggest term.
    let w = warnings_of(&low, "sft").join("\n");
    assert!(w.contains("to shrink it: "), "{w}");
    assert!(low.contains("2 of 2 CUDA stages do not fit with headroom"), "{low}");
    // The import stages have no model: their fixed memory, no GPU column.
    assert!(!line(&low, "base").contains("gpu "), "{low}");

    // A GPU that holds them: the same column, no memory warning.
    let fits = plan_small(tmp.path(), "1");
    for stage in ["sft", "eval"] {
        assert!(line(&fits, stage).contains("M/1.0G host "), "{fits}");
        assert!(warnings_of(&fits, stage).iter().all(|w| !w.contains("on the GPU")), "{fits}");
    }
    assert!(fits.contains("all 2 CUDA stages with a prediction fit with headroom"), "{fits}");
}
