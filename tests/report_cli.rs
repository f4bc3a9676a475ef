//! `pipeline report RUN_A RUN_B ...` on two synthetic runs: run directories
//! with a real `summary.json`, eval outputs scored by the eval stage's own
//! code, a judge's consistency.json and an SFT metrics.jsonl.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pipeline_engine::workspace::{RunStatus, RunSummary, StageStatus, StageSummary};
use stages_eval::artifacts::{METRICS_JSON, PREDICTIONS_JSONL};
use stages_eval::eval::{EvalParams, metrics_of, predict};
use stages_eval::metrics::EvalSource;
use stages_eval::predictions::write_jsonl;
use stages_task::dataset::VqaRow;

fn pipeline(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline")).args(args).current_dir(cwd).output().expect("running pipeline")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// An eval output: one prediction per answer (gold alternates A, B).
fn write_eval(dir: &Path, answers: &[&str], split: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let scorer = EvalParams::default().scorer().unwrap();
    let options = vec!["A. emphysema".to_string(), "B. ground-glass opacity".to_string()];
    let preds: Vec<_> = answers
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let (gold, class) = if i % 2 == 0 { ("A", "emphysema") } else { ("B", "ground-glass opacity") };
            let row = VqaRow {
                id: format!("case{i}/slice"),
                image: None,
                problem: "Which lesion?".into(),
                answer: gold.into(),
                answers: Vec::new(),
                options: options.clone(),
                class: class.into(),
                class_name: class.into(),
            };
            let completion = format!("<think>it looks like {class}</think><answer>{a}</answer>");
            predict(&scorer, &row, "Which lesion?".into(), completion, 20, 12, "stop_string".into())
        })
        .collect();
    write_jsonl(&dir.join(PREDICTIONS_JSONL), &preds).unwrap();
    let mut m = metrics_of(&preds, Default::default());
    m.source = Some(EvalSource {
        model: "sft".into(),
        data: format!("export.{split}"),
        split: Some(split.into()),
        prompt: "think".into(),
        dataset: Some(format!("export.{split}")),
        answer_match: Some("choice".into()),
    });
    std::fs::write(dir.join(METRICS_JSON), serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

fn stage(id: &str, kind: &str, output: &Path) -> StageSummary {
    StageSummary {
        id: id.into(),
        kind: kind.into(),
        status: StageStatus::Cached,
        key: Some(format!("{id}-key")),
        reason: "cached".into(),
        duration_s: 0.1,
        log: None,
        output: Some(output.to_path_buf()),
        error: None,
    }
}

/// A run of the mini recipe started at `started`: eval (+ a train-split eval
/// when `train_acc` is given), judge, sft; returns the run directory.
fn write_run(ws: &Path, started: &str, answers: &[&str], train_acc: Option<&[&str]>, loss: f64) -> PathBuf {
    let run_id = format!("{}-mini", started.replace([':', '-'], ""));
    let art = ws.join("cache/artifacts").join(&run_id);
    let mut stages = Vec::new();
    write_eval(&art.join("eval"), answers, "test");
    stages.push(stage("eval", "eval", &art.join("eval")));
    if let Some(t) = train_acc {
        write_eval(&art.join("eval_train"), t, "train");
        stages.push(stage("eval_train", "eval", &art.join("eval_train")));
    }
    let judge = art.join("judge");
    std::fs::create_dir_all(&judge).unwrap();
    let c = serde_json::json!({
        "eval_stage": "eval", "backend": "rules", "n": answers.len(),
        "rate": {"k": 3, "n": 4, "value": 0.75, "lo": 0.3006, "hi": 0.9544},
        "consistent": 3, "inconsistent": 1, "undetermined": 0, "skipped": 0, "errors": 0
    });
    std::fs::write(judge.join("consistency.json"), c.to_string()).unwrap();
    stages.push(stage("judge", "judge", &judge));
    let sft = art.join("sft");
    std::fs::create_dir_all(&sft).unwrap();
    let rows: Vec<String> =
        (1..=3).map(|s| serde_json::json!({"step": s, "epoch": 0, "loss": loss / s as f64}).to_string()).collect();
    std::fs::write(sft.join("metrics.jsonl"), rows.join("\n") + "\n").unwrap();
    stages.push(stage("sft", "sft", &sft));
    let summary = RunSummary {
        run_id: run_id.clone(),
        recipe: "mini".into(),
        recipe_path: "recipes/mini.toml".into(),
        recipe_digest: "0".repeat(64),
        started: started.into(),
        finished: started.into(),
        duration_s: 1.0,
        status: RunStatus::Succeeded,
        stages,
    };
    let dir = ws.join("runs").join(&run_id);
    std::fs::create_dir_all(&dir).unwrap();
    summary.write(&dir).unwrap();
    dir
}

#[test]
fn report_command_puts_two_runs_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path();
    let a = write_run(ws, "2026-11-30T10:12:40.790Z", &["A", "A", "A", "B"], None, 2.0);
    let b = write_run(ws, "2026-11-30T11:05:02.001Z", &["A", "B", "A", "B"], Some(&["A", "B", "A", "A"]), 1.5);
    let out = ws.join("cmp");
    let (a, b, o) = (a.to_str().unwrap(), b.to_str().unwrap(), out.to_str().unwrap());
    let r = pipeline(&["report", a, b, "--out", o], ws);
    assert!(r.status.success(), "{}", text(&r));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    // Both runs are row groups of the main and per-class tables.
    assert_eq!(html.matches("<tr class=\"group\"><th colspan=").count(), 4, "2 runs x 2 tables");
    for run in ["mini (2026-11-30 10:12)", "mini (2026-11-30 11:05)"] {
        assert!(html.contains(&format!("\">{run}</th></tr>")), "{run} missing");
        assert!(md.contains(&format!("| **{run}** |")), "{md}");
        assert!(html.contains(&format!("<h3>{run} · eval</h3>")), "gallery of {run}");
    }
    // Run 2's train-split eval is its row's "train acc" column, not a row.
    assert!(md.contains("| Model | n | Accuracy | train acc |"), "{md}");
    assert!(md.contains("| eval | 4 | 100.00 [51.01, 100.00] | 75.00 [30.06, 95.44] |"), "{md}");
    assert!(md.contains("| eval | 4 | 75.00 [30.06, 95.44] | - |"), "{md}");
    assert!(!md.contains("| eval_train |"), "{md}");
    // Deltas against the first run's eval; consistency from each run's judge.
    assert!(
        md.contains("| 75.00 [30.06, 95.44] | +25.00 |") && md.contains("| 75.00 [30.06, 95.44] | +0.00 |"),
        "{md}"
    );
    // One training-curve plot with a line per run.
    assert!(
        md.contains("![sft: loss — mini (2026-11-30 10:12) · sft, mini (2026-11-30 11:05) · sft](plots/train_00.png)")
    );
    assert!(out.join("plots/train_00.png").is_file() && out.join("plots/confusion_01.png").is_file());
    assert_eq!(html.matches("<img ").count(), 1 + 2 + 1, "bars, 2 confusion matrices, 1 curve");
    assert!(!html.contains("src=\"http") && !html.contains("src=\"plots/"), "self-contained");

    // Same inputs, same bytes.
    let again = ws.join("cmp2");
    assert!(pipeline(&["report", a, b, "--out", again.to_str().unwrap()], ws).status.success());
    assert_eq!(std::fs::read(out.join("report.html")).unwrap(), std::fs::read(again.join("report.html")).unwrap());

    // Labels, a baseline in the second run, and an outputs/<recipe> directory as a third run.
    let links = ws.join("outputs/mini");
    std::fs::create_dir_all(&links).unwrap();
    let art = Path::new(a).parent().unwrap().parent().unwrap().join("cache/artifacts");
    let first_eval = std::fs::read_dir(&art).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).min().unwrap();
    std::os::unix::fs::symlink(first_eval.join("eval"), links.join("eval")).unwrap();
    let l = ws.join("labelled");
    let r = pipeline(
        &[
            "report",
            a,
            b,
            links.to_str().unwrap(),
            "--out",
            l.to_str().unwrap(),
            "--label",
            "base",
            "--label",
            "tuned",
            "--label",
            "links",
            "--baseline",
            "tuned/eval",
        ],
        ws,
    );
    assert!(r.status.success(), "{}", text(&r));
    let md = std::fs::read_to_string(l.join("report.md")).unwrap();
    assert!(md.contains("deltas vs tuned · eval") && md.contains("| **links** |") && md.contains("| -25.00 |"), "{md}");

    // Mistakes are named.
    let r = pipeline(&["report", a, "--label", "x", "--label", "y"], ws);
    assert!(text(&r).contains("2 labels for 1 runs"), "{}", text(&r));
    assert_eq!(r.status.code(), Some(2), "a usage mistake");
    let r = pipeline(&["report", a, a], ws);
    assert!(!r.status.success() && text(&r).contains("--label"), "{}", text(&r));
    let r = pipeline(&["report", a, "--baseline", "nope"], ws);
    assert!(!r.status.success() && text(&r).contains("`nope` is not one of the evals"), "{}", text(&r));
    let r = pipeline(&["report", ws.join("missing").to_str().unwrap()], ws);
    assert!(!r.status.success() && text(&r).contains("not a directory"), "{}", text(&r));
}
