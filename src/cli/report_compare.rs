//! `pipeline report RUN_A RUN_B ...`: several runs side by side in one
//! report (the `report` stage's tables and plots, runs as row groups).
//!
//! Each argument is a run directory (`<workspace>/runs/<time>-<recipe>/`,
//! whose `summary.json` lists every stage with its kind and output), a
//! directory of stage outputs (`<workspace>/outputs/<recipe>/`), or one stage
//! output. Outputs are recognised by their `provenance.json` (stage id and
//! kind), else by their files: `metrics.json` + `predictions.jsonl` (eval),
//! `consistency.json` (judge), `metrics.jsonl` (training curves).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use pipeline_engine::workspace::{RunSummary, StageStatus};
use serde::Deserialize;

use stages_eval::artifacts::{
    CONSISTENCY_JSON, METRICS_JSON, PREDICTIONS_JSONL, REPORT_HTML, REPORT_MD, TRAIN_METRICS_JSONL,
};
use stages_eval::report::{EvalRun, Report, ReportParams, TrainRun, attach_judge, load_eval, load_train};

use super::exit::UsageError;

#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Run directories (`runs/<time>-<recipe>/`), output directories
    /// (`outputs/<recipe>/`) or single stage outputs, one row group each.
    #[arg(required = true, value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    /// Where report.html, report.md and plots/ are written.
    #[arg(long, default_value = "report", value_name = "DIR")]
    pub out: PathBuf,
    /// Row-group label of each run, in order (default: recipe name and run time).
    #[arg(long = "label", value_name = "LABEL")]
    pub labels: Vec<String>,
    /// Eval the deltas are taken against: `LABEL/STAGE`, or a stage id that
    /// only one run has (default: the first eval of the first run).
    #[arg(long, value_name = "EVAL")]
    pub baseline: Option<String>,
    #[arg(long, default_value = "MedReason-R1 runs compared")]
    pub title: String,
    /// Gallery items shown per eval.
    #[arg(long, default_value_t = 4)]
    pub gallery: usize,
}

/// What a stage output is, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Eval,
    Judge,
    Train,
}

/// One stage output of a run.
#[derive(Debug, Clone)]
struct Output {
    id: String,
    role: Role,
    dir: PathBuf,
}

/// The evals, judges and training runs of one run argument.
#[derive(Debug)]
struct Run {
    label: String,
    outputs: Vec<Output>,
}

/// The two fields of `provenance.json` the report needs.
#[derive(Deserialize)]
struct ProvenanceHead {
    stage_id: String,
    kind: String,
}

fn role_of(kind: &str, dir: &Path) -> Option<Role> {
    match kind {
        "eval" => Some(Role::Eval),
        "judge" => Some(Role::Judge),
        "report" => None,
        _ if dir.join(TRAIN_METRICS_JSONL).is_file() => Some(Role::Train),
        _ => None,
    }
}

/// Role by the files a directory holds (outputs without provenance.json).
fn sniff(dir: &Path) -> Option<Role> {
    if dir.join(METRICS_JSON).is_file() && dir.join(PREDICTIONS_JSONL).is_file() {
        Some(Role::Eval)
    } else if dir.join(CONSISTENCY_JSON).is_file() {
        Some(Role::Judge)
    } else if dir.join(TRAIN_METRICS_JSONL).is_file() {
        Some(Role::Train)
    } else {
        None
    }
}

/// A stage output directory: its stage id and role, if the report uses it.
fn classify(dir: &Path) -> anyhow::Result<Option<Output>> {
    let prov = dir.join("provenance.json");
    let (id, role) = if prov.is_file() {
        let text = std::fs::read_to_string(&prov).with_context(|| format!("reading {}", prov.display()))?;
        let head: ProvenanceHead = serde_json::from_str(&text)
            .with_context(|| format!("{}: expected `stage_id` and `kind` strings", prov.display()))?;
        let role = role_of(&head.kind, dir);
        (head.stage_id, role)
    } else {
        let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "output".into());
        (name, sniff(dir))
    };
    Ok(role.map(|role| Output { id, role, dir: dir.to_path_buf() }))
}

/// `mini (2026-11-30 10:12)` from a run summary.
fn run_label(s: &RunSummary) -> String {
    let time: String = s.started.replace('T', " ").chars().take(16).collect();
    if time.is_empty() { s.recipe.clone() } else { format!("{} ({time})", s.recipe) }
}

fn read_run_dir(dir: &Path, summary_path: &Path) -> anyhow::Result<Run> {
    let text = std::fs::read_to_string(summary_path).with_context(|| format!("reading {}", summary_path.display()))?;
    let summary: RunSummary = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a run summary (see `pipeline run --help`)", summary_path.display()))?;
    // Outputs are absolute unless the cache dir was given relative: then they
    // are relative to where `pipeline run` ran, most likely the workspace.
    let workspace = dir.parent().and_then(Path::parent).unwrap_or(Path::new("."));
    let mut outputs = Vec::new();
    for s in &summary.stages {
        if !matches!(s.status, StageStatus::Ran | StageStatus::Cached) {
            continue;
        }
        let Some(out) = &s.output else { continue };
        let out = if out.is_absolute() || out.exists() { out.clone() } else { workspace.join(out) };
        if !out.is_dir() {
            bail!(
                "{}: output of stage `{}` ({}) is gone (cache cleaned or moved?)",
                summary_path.display(),
                s.id,
                out.display()
            );
        }
        if let Some(role) = role_of(&s.kind, &out) {
            outputs.push(Output { id: s.id.clone(), role, dir: out });
        }
    }
    Ok(Run { label: run_label(&summary), outputs })
}

fn read_run(path: &Path) -> anyhow::Result<Run> {
    if !path.is_dir() {
        return Err(UsageError(format!(
            "{}: not a directory (expected a run directory, an outputs/<recipe> directory or a stage output)",
            path.display()
        ))
        .into());
    }
    let summary = path.join("summary.json");
    if summary.is_file() {
        return read_run_dir(path, &summary);
    }
    let name = path
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| path.display().to_string());
    if let Some(one) = classify(path)? {
        return Ok(Run { label: name, outputs: vec![one] });
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("listing {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut outputs = Vec::new();
    for d in dirs {
        outputs.extend(classify(&d)?);
    }
    Ok(Run { label: name, outputs })
}

/// Load every run and build the report (labels override the run labels).
fn build(args: &ReportArgs) -> anyhow::Result<Report> {
    if !args.labels.is_empty() && args.labels.len() != args.runs.len() {
        let n = (args.labels.len(), args.runs.len());
        return Err(UsageError(format!("--label: {} labels for {} runs (give one per run, in order)", n.0, n.1)).into());
    }
    let mut runs = args.runs.iter().map(|p| read_run(p)).collect::<anyhow::Result<Vec<_>>>()?;
    for (i, run) in runs.iter_mut().enumerate() {
        if let Some(l) = args.labels.get(i) {
            run.label = l.clone();
        }
    }
    for (i, run) in runs.iter().enumerate() {
        if runs[..i].iter().any(|r| r.label == run.label) {
            let msg = format!("two runs are labelled `{}`: give each its own with --label", run.label);
            return Err(UsageError(msg).into());
        }
    }
    let mut evals: Vec<EvalRun> = Vec::new();
    let mut train: Vec<TrainRun> = Vec::new();
    for run in &runs {
        let group = Some(run.label.clone());
        for o in run.outputs.iter().filter(|o| o.role == Role::Eval) {
            let mut e = load_eval(&o.id, &o.dir, args.gallery)?;
            e.group = group.clone();
            evals.push(e);
        }
        for o in run.outputs.iter().filter(|o| o.role == Role::Judge) {
            attach_judge(&mut evals, group.as_deref(), &o.dir)?;
        }
        for o in run.outputs.iter().filter(|o| o.role == Role::Train) {
            let mut t = load_train(&o.id, &o.dir)?;
            t.group = group.clone();
            train.push(t);
        }
        tracing::info!(run = %run.label, outputs = run.outputs.len(), "run read");
    }
    if evals.is_empty() {
        bail!("no eval outputs found in {:?}", args.runs);
    }
    let params = ReportParams {
        title: args.title.clone(),
        baseline: args.baseline.clone(),
        gallery: args.gallery,
        ..Default::default()
    };
    Report::build(&params, evals, &train)
}

pub fn report_main(args: &ReportArgs) -> anyhow::Result<()> {
    let report = build(args)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    report.write(&args.out)?;
    println!("wrote {} and {REPORT_MD}", args.out.join(REPORT_HTML).display());
    Ok(())
}
