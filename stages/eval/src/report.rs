//! Stage `report`: every eval (and its judge, and the training runs) of a
//! recipe side by side in `report.md` + `plots/*.png` and a self-contained
//! `report.html` (PNG plots and gallery images embedded as base64, opens
//! offline). Deterministic given its inputs: no timestamps, sorted keys,
//! byte-reproducible PNGs.
//!
//! Inputs: `evals` (many `eval` outputs), optional `judges` (many `judge`
//! outputs; matched to evals by the eval stage id they record) and optional
//! `train` (many SFT/GRPO outputs with `metrics.jsonl`).
//!
//! Train-side accuracy: an eval whose split (recorded in its metrics.json
//! `source`) is one of `side_splits` (default `train`, `val`) and that
//! scored the same model with the same prompt as another eval becomes a
//! "`<split>` acc" column of that eval's row instead of a row of its own.
//!
//! The same [`Report`] renders `pipeline report RUN_A RUN_B ...`
//! ([`crate::compare`]): every eval and training run then carries its run's
//! label as a `group`, and tables show the runs as row groups.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::Path;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stage_api::context::Artifact;
use stage_api::{InputSpec, ParamError, StageContext, StageKind};

use crate::eval::{GALLERY_DIR, METRICS_JSON};
use crate::judge::{CONSISTENCY_JSON, Consistency};
use crate::metrics::{Metrics, Rate};
use crate::plots::{self, Line};
use crate::predictions::{PREDICTIONS_JSONL, Prediction, read_jsonl};

/// A row id for an input artifact: `stage` or `stage.output`.
pub fn artifact_id(a: &Artifact) -> String {
    match &a.output {
        Some(o) => format!("{}.{o}", a.stage),
        None => a.stage.clone(),
    }
}

/// An extra table laid out like the paper's ablation tables (3, 4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    pub title: String,
    /// Eval row ids (stage ids, e.g. `eval@no_validity`), in display order;
    /// deltas are against the first row.
    pub rows: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ReportParams {
    /// Heading of the report.
    pub title: String,
    /// Eval row id the deltas of the main table are taken against (default: the first eval).
    pub baseline: Option<String>,
    /// Display names for row ids (e.g. `"eval_base" = "Qwen2.5-VL (zero-shot)"`).
    pub labels: BTreeMap<String, String>,
    /// Extra ablation tables.
    pub tables: Vec<TableSpec>,
    /// Training metrics to plot (empty: every numeric key of metrics.jsonl;
    /// `reward_std` and `rewards/<name>/std` are then drawn as bands around
    /// their means rather than as plots of their own).
    pub train_metrics: Vec<String>,
    /// Gallery items shown per eval.
    pub gallery: usize,
    /// Splits whose evals become accuracy columns ("train acc") of the eval
    /// of the same model and prompt on another split, instead of rows.
    pub side_splits: Vec<String>,
}

impl Default for ReportParams {
    fn default() -> Self {
        Self {
            title: "MedReason-R1 pipeline report".into(),
            baseline: None,
            labels: BTreeMap::new(),
            tables: Vec::new(),
            train_metrics: Vec::new(),
            gallery: 4,
            side_splits: vec!["train".into(), "val".into()],
        }
    }
}

/// One gallery entry of an eval.
#[derive(Debug, Clone)]
pub struct Example {
    pub prediction: Prediction,
    pub image: Option<Vec<u8>>,
}

/// `group/id`, or `id` outside a comparison of runs.
fn key_of(group: Option<&str>, id: &str) -> String {
    match group {
        Some(g) => format!("{g}/{id}"),
        None => id.to_string(),
    }
}

/// Everything the report knows about one eval.
#[derive(Debug, Clone)]
pub struct EvalRun {
    /// Stage id within its recipe (e.g. `eval@zoom`).
    pub id: String,
    /// The run it belongs to when several runs are compared.
    pub group: Option<String>,
    pub metrics: Metrics,
    pub consistency: Option<Consistency>,
    pub examples: Vec<Example>,
    /// `predictions_digest` of its predictions.jsonl (matches judges to evals).
    pub predictions: String,
}

impl EvalRun {
    /// Unique among the report's evals: `group/id`, or `id`.
    pub fn key(&self) -> String {
        key_of(self.group.as_deref(), &self.id)
    }

    fn split(&self) -> Option<&str> {
        self.metrics.source.as_ref().and_then(|s| s.split.as_deref())
    }

    /// Same run, same model, same prompt (both evals know their source).
    fn same_setting(&self, other: &EvalRun) -> bool {
        match (&self.metrics.source, &other.metrics.source) {
            (Some(a), Some(b)) => self.group == other.group && a.model == b.model && a.prompt == b.prompt,
            _ => false,
        }
    }
}

/// One training run: metric name -> (step, value) points.
#[derive(Debug, Clone)]
pub struct TrainRun {
    pub id: String,
    pub group: Option<String>,
    pub curves: BTreeMap<String, Vec<(f64, f64)>>,
}

impl TrainRun {
    /// The stage name (sweep variants of one stage share their plots).
    fn stage(&self) -> &str {
        self.id.split('@').next().unwrap_or(&self.id)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: unexpected content", path.display()))
}

/// blake3 (hex) of a predictions.jsonl: what a judge output records of the
/// eval it judged.
pub fn predictions_digest(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

pub fn load_eval(id: &str, dir: &Path, gallery: usize) -> anyhow::Result<EvalRun> {
    let metrics: Metrics = read_json(&dir.join(METRICS_JSON))?;
    let predictions = predictions_digest(&dir.join(PREDICTIONS_JSONL))?;
    let preds = read_jsonl(&dir.join(PREDICTIONS_JSONL))?;
    let by_id: BTreeMap<&str, &Prediction> = preds.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut examples = Vec::new();
    let listing = dir.join(GALLERY_DIR).join("gallery.json");
    if listing.exists() {
        let entries: Vec<serde_json::Value> = read_json(&listing)?;
        for e in entries {
            let (Some(pid), Some(file)) = (e["id"].as_str(), e["image"].as_str()) else {
                bail!("{}: entries need string fields `id` and `image`", listing.display());
            };
            let Some(p) = by_id.get(pid) else {
                bail!("{}: id `{pid}` is not in {PREDICTIONS_JSONL}", listing.display());
            };
            let img = dir.join(GALLERY_DIR).join(file);
            let bytes = std::fs::read(&img).with_context(|| format!("reading gallery image {}", img.display()))?;
            examples.push(Example { prediction: (*p).clone(), image: Some(bytes) });
        }
    }
    // Fill up with text-only examples when the eval kept no images.
    for p in &preds {
        if examples.len() >= gallery {
            break;
        }
        if !examples.iter().any(|e| e.prediction.id == p.id) {
            examples.push(Example { prediction: p.clone(), image: None });
        }
    }
    // Alternate correct and wrong so both kinds show when truncated.
    let (ok, bad): (Vec<Example>, Vec<Example>) = examples.into_iter().partition(|e| e.prediction.correct);
    let mut mixed = Vec::new();
    let (mut ok, mut bad) = (ok.into_iter(), bad.into_iter());
    loop {
        let (a, b) = (ok.next(), bad.next());
        if a.is_none() && b.is_none() {
            break;
        }
        mixed.extend(a);
        mixed.extend(b);
    }
    mixed.truncate(gallery);
    Ok(EvalRun { id: id.into(), group: None, metrics, consistency: None, examples: mixed, predictions })
}

/// Attach the `consistency.json` of a judge output in `dir` to the eval it
/// judged, in the same group: the eval whose predictions it judged (by
/// digest; among evals with identical predictions, the one with the
/// recorded stage id, else the first not yet judged), or, for outputs
/// that predate the digest, the eval with the recorded stage id.
pub fn attach_judge(evals: &mut [EvalRun], group: Option<&str>, dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(CONSISTENCY_JSON);
    let c: Consistency = read_json(&path)?;
    let in_group = |e: &EvalRun| e.group.as_deref() == group;
    let index = match &c.eval_predictions {
        Some(digest) => {
            let same: Vec<usize> =
                (0..evals.len()).filter(|&i| in_group(&evals[i]) && &evals[i].predictions == digest).collect();
            same.iter()
                .copied()
                .find(|&i| evals[i].id == c.eval_stage)
                .or_else(|| same.iter().copied().find(|&i| evals[i].consistency.is_none()))
        }
        None => evals.iter().position(|e| in_group(e) && e.id == c.eval_stage),
    };
    let Some(i) = index else {
        bail!(
            "{}: judged eval `{}` is not among the report's evals (or already has a judge)",
            path.display(),
            key_of(group, &c.eval_stage)
        );
    };
    evals[i].consistency = Some(c);
    Ok(())
}

/// Numeric fields of each `metrics.jsonl` row against `step` (row index when absent).
pub fn load_train(id: &str, dir: &Path) -> anyhow::Result<TrainRun> {
    let path = dir.join("metrics.jsonl");
    let file = std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut curves: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: expected a JSON object per line", path.display(), i + 1))?;
        let x = row.get("step").and_then(|v| v.as_f64()).unwrap_or(i as f64);
        for (k, v) in &row {
            if k == "step" || k == "epoch" {
                continue;
            }
            if let Some(y) = v.as_f64().filter(|y| y.is_finite()) {
                curves.entry(k.clone()).or_default().push((x, y));
            }
        }
    }
    Ok(TrainRun { id: id.into(), group: None, curves })
}

/// The std series drawn as a band around `metric` (TRL GRPO names).
fn std_companion(metric: &str) -> Option<String> {
    if metric == "reward" {
        return Some("reward_std".into());
    }
    metric.strip_prefix("rewards/").and_then(|r| r.strip_suffix("/mean")).map(|name| format!("rewards/{name}/std"))
}

/// Plot order of training metrics: loss, reward, its components, KL,
/// completion length, then the rest by name, optimiser metrics last.
fn curve_rank(metric: &str) -> u8 {
    match metric {
        "loss" => 0,
        "reward" => 1,
        m if m.starts_with("rewards/") => 2,
        "kl" => 3,
        m if m.starts_with("completions/") => 4,
        "entropy" => 5,
        m if m.starts_with("clip_ratio") => 6,
        "lr" | "learning_rate" => 8,
        "grad_norm" => 9,
        _ => 7,
    }
}

/// Points of `std` at the x of each point of `mean`, as (x, mean - std, mean + std).
fn band(mean: &[(f64, f64)], std: Option<&Vec<(f64, f64)>>) -> Vec<(f64, f64, f64)> {
    let Some(std) = std else { return Vec::new() };
    let by_x: BTreeMap<u64, f64> = std.iter().map(|&(x, s)| (x.to_bits(), s)).collect();
    mean.iter().filter_map(|&(x, m)| by_x.get(&x.to_bits()).map(|s| (x, m - s, m + s))).collect()
}

/// An HTML id for a section title (`Training curves` -> `training-curves`).
fn anchor(title: &str) -> String {
    title
        .to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Markdown table cells must not break the row.
fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn pct(v: f64) -> String {
    format!("{:.2}", 100.0 * v)
}

fn pct_ci(r: &Rate) -> String {
    format!("{} [{}, {}]", pct(r.value), pct(r.lo), pct(r.hi))
}

fn signed_pp(d: f64) -> String {
    format!("{:+.2}", 100.0 * d)
}

/// One table row; rows of one run share a `group` (shown as a header row).
struct Row {
    group: Option<String>,
    cells: Vec<String>,
}

/// A table: header and rows of cells (plain text).
struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Row>,
}

/// A PNG plot with a caption.
struct Plot {
    file: String,
    caption: String,
    png: Vec<u8>,
}

fn sniff_mime(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(b"\x89PNG") {
        "image/png"
    } else if bytes.starts_with(&[0xff, 0xd8]) {
        "image/jpeg"
    } else {
        "application/octet-stream"
    }
}

fn data_uri(bytes: &[u8]) -> String {
    format!("data:{};base64,{}", sniff_mime(bytes), base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Find an eval by key (`group/id`), or by stage id when only one run has it.
fn find_eval<'a>(evals: &'a [EvalRun], name: &str) -> anyhow::Result<Option<&'a EvalRun>> {
    if let Some(e) = evals.iter().find(|e| e.key() == name) {
        return Ok(Some(e));
    }
    let by_id: Vec<&EvalRun> = evals.iter().filter(|e| e.id == name).collect();
    match by_id.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => bail!(
            "`{name}` names an eval of several runs; say which: {:?}",
            many.iter().map(|e| e.key()).collect::<Vec<_>>()
        ),
    }
}

/// Which evals are rows and which are side-split columns of a row.
struct Layout {
    /// Indexes of the row evals, in input order.
    rows: Vec<usize>,
    /// Row index -> (split, eval index) of its side columns.
    sides: BTreeMap<usize, Vec<(String, usize)>>,
    /// Side splits that got a column, in `side_splits` order.
    columns: Vec<String>,
}

fn layout(evals: &[EvalRun], side_splits: &[String]) -> Layout {
    let is_side_split = |e: &EvalRun| e.split().is_some_and(|s| side_splits.iter().any(|x| x == s));
    let mut is_side = vec![false; evals.len()];
    let mut sides: BTreeMap<usize, Vec<(String, usize)>> = BTreeMap::new();
    for (i, e) in evals.iter().enumerate().filter(|(_, e)| is_side_split(e)) {
        let split = e.split().unwrap_or_default().to_string();
        for (j, row) in evals.iter().enumerate() {
            if j != i && !is_side_split(row) && row.split() != Some(split.as_str()) && row.same_setting(e) {
                is_side[i] = true;
                let cols = sides.entry(j).or_default();
                // The first eval of a split wins when there are several.
                if !cols.iter().any(|(s, _)| *s == split) {
                    cols.push((split.clone(), i));
                }
            }
        }
    }
    let columns =
        side_splits.iter().filter(|s| sides.values().flatten().any(|(x, _)| x == *s)).cloned().collect::<Vec<_>>();
    Layout { rows: (0..evals.len()).filter(|&i| !is_side[i]).collect(), sides, columns }
}

/// The report model: tables and plots built once, written as Markdown and HTML.
pub struct Report {
    title: String,
    tables: Vec<Table>,
    plots: Vec<(String, Vec<Plot>)>,
    /// Gallery sections: heading and examples.
    gallery: Vec<(String, Vec<Example>)>,
}

impl Report {
    pub fn build(params: &ReportParams, evals: Vec<EvalRun>, train: &[TrainRun]) -> anyhow::Result<Self> {
        let label = |group: Option<&str>, id: &str| {
            params
                .labels
                .get(&key_of(group, id))
                .or_else(|| params.labels.get(id))
                .cloned()
                .unwrap_or_else(|| id.to_string())
        };
        // Where no group header row is in sight (plot legends, gallery headings).
        let full_label = |group: Option<&str>, id: &str| match group {
            Some(g) => format!("{g} · {}", label(group, id)),
            None => label(group, id),
        };
        let ids = || evals.iter().map(|e| e.key()).collect::<Vec<_>>();
        let lay = layout(&evals, &params.side_splits);
        let rows: Vec<&EvalRun> = lay.rows.iter().map(|&i| &evals[i]).collect();
        let baseline = match &params.baseline {
            Some(b) => Some(
                find_eval(&evals, b)
                    .context("param `baseline`")?
                    .with_context(|| format!("param `baseline`: `{b}` is not one of the evals {:?}", ids()))?,
            ),
            None => rows.first().copied(),
        };
        let mut tables = Vec::new();
        let base_acc = baseline.map(|b| b.metrics.accuracy.value);
        let mut header: Vec<String> = ["Model", "n", "Accuracy"].map(String::from).to_vec();
        header.extend(lay.columns.iter().map(|s| format!("{s} acc")));
        header.extend(
            ["Macro", "Format", "Validity", "Unparseable", "Mean tokens", "Consistency", "Δ acc (pp)"]
                .map(String::from),
        );
        tables.push(Table {
            title: format!(
                "Accuracy (%, 95% CI) with deltas vs {}",
                baseline.map(|b| full_label(b.group.as_deref(), &b.id)).unwrap_or_else(|| "-".into())
            ),
            header,
            rows: lay
                .rows
                .iter()
                .map(|&i| {
                    let e = &evals[i];
                    let m = &e.metrics;
                    let mut cells = vec![label(e.group.as_deref(), &e.id), m.n.to_string(), pct_ci(&m.accuracy)];
                    let side = lay.sides.get(&i);
                    for col in &lay.columns {
                        let found = side.and_then(|s| s.iter().find(|(split, _)| split == col));
                        cells.push(found.map_or_else(|| "-".into(), |(_, j)| pct_ci(&evals[*j].metrics.accuracy)));
                    }
                    cells.extend([
                        pct(m.macro_accuracy),
                        pct(m.format_rate.value),
                        pct(m.validity_rate.value),
                        pct(m.unparseable_rate.value),
                        format!("{:.1}", m.mean_completion_tokens),
                        match &e.consistency {
                            None => "-".into(),
                            // Every item skipped (no reasoning or no valid answer): no rate to show.
                            Some(c) if c.rate.n == 0 => format!("n/a (0 of {} judged)", c.n),
                            Some(c) => pct_ci(&c.rate),
                        },
                        base_acc.map_or_else(|| "-".into(), |b| signed_pp(m.accuracy.value - b)),
                    ]);
                    Row { group: e.group.clone(), cells }
                })
                .collect(),
        });
        for t in &params.tables {
            let mut trows = Vec::new();
            let mut first = None;
            for r in &t.rows {
                let e = find_eval(&evals, r)
                    .with_context(|| format!("param `tables` (\"{}\")", t.title))?
                    .with_context(|| format!("param `tables` (\"{}\"): no eval named `{r}`", t.title))?;
                let f = *first.get_or_insert(e.metrics.accuracy.value);
                trows.push(Row {
                    group: e.group.clone(),
                    cells: vec![
                        label(e.group.as_deref(), &e.id),
                        pct_ci(&e.metrics.accuracy),
                        pct(e.metrics.format_rate.value),
                        pct(e.metrics.validity_rate.value),
                        signed_pp(e.metrics.accuracy.value - f),
                    ],
                });
            }
            tables.push(Table {
                title: t.title.clone(),
                header: ["Setting", "Accuracy", "Format", "Validity", "Δ acc (pp)"].map(String::from).to_vec(),
                rows: trows,
            });
        }
        // Per-class accuracy: the union of classes, in first-seen confusion order.
        let mut classes: Vec<String> = Vec::new();
        for e in &rows {
            for c in &e.metrics.confusion.classes {
                if e.metrics.per_class.contains_key(c) && !classes.contains(c) {
                    classes.push(c.clone());
                }
            }
        }
        let mut header = vec!["Model".to_string()];
        header.extend(classes.iter().cloned());
        tables.push(Table {
            title: "Per-class accuracy (%)".into(),
            header,
            rows: rows
                .iter()
                .map(|e| {
                    let mut cells = vec![label(e.group.as_deref(), &e.id)];
                    cells.extend(
                        classes.iter().map(|c| e.metrics.per_class.get(c).map_or_else(|| "-".into(), |r| pct(r.value))),
                    );
                    Row { group: e.group.clone(), cells }
                })
                .collect(),
        });

        let mut plots = Vec::new();
        let series: Vec<(String, Vec<f64>)> = rows
            .iter()
            .map(|e| {
                (
                    full_label(e.group.as_deref(), &e.id),
                    classes.iter().map(|c| e.metrics.per_class.get(c).map_or(0.0, |r| r.value)).collect(),
                )
            })
            .collect();
        plots.push((
            "Per-class accuracy".to_string(),
            vec![Plot {
                file: "per_class_accuracy.png".into(),
                caption: "Accuracy per lesion class, one bar per model".into(),
                png: plots::grouped_bars("Per-class accuracy", &classes, &series)?,
            }],
        ));
        let mut confusions = Vec::new();
        for (i, e) in rows.iter().enumerate() {
            let c = &e.metrics.confusion;
            let name = full_label(e.group.as_deref(), &e.id);
            confusions.push(Plot {
                file: format!("confusion_{i:02}.png"),
                caption: format!("{name} (rows gold, columns predicted)"),
                png: plots::heatmap(&format!("Confusion: {name}"), &c.classes, &c.columns, &c.counts)?,
            });
        }
        plots.push(("Confusion matrices".to_string(), confusions));
        let curves = training_curves(params, train, &full_label)?;
        if !curves.is_empty() {
            plots.push(("Training curves".to_string(), curves));
        }
        let gallery =
            rows.iter().map(|e| (full_label(e.group.as_deref(), &e.id), e.examples.clone())).collect::<Vec<_>>();
        Ok(Self { title: params.title.clone(), tables, plots, gallery })
    }

    pub fn markdown(&self) -> String {
        let mut s = format!("# {}\n\n", self.title);
        for t in &self.tables {
            let _ = writeln!(s, "## {}\n", t.title);
            let _ = writeln!(s, "| {} |", t.header.iter().map(|h| md_cell(h)).collect::<Vec<_>>().join(" | "));
            let _ = writeln!(s, "|{}|", vec!["---"; t.header.len()].join("|"));
            let mut group = None;
            for r in &t.rows {
                if r.group.is_some() && r.group != group {
                    group = r.group.clone();
                    let name = md_cell(r.group.as_deref().unwrap_or_default());
                    let _ = writeln!(s, "| **{name}** |{}", " |".repeat(t.header.len() - 1));
                }
                let _ = writeln!(s, "| {} |", r.cells.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | "));
            }
            s.push('\n');
        }
        for (section, plots) in &self.plots {
            let _ = writeln!(s, "## {section}\n");
            for p in plots {
                let _ = writeln!(s, "![{}](plots/{})\n", md_cell(&p.caption), p.file);
            }
        }
        let _ = writeln!(s, "## Examples\n");
        for (heading, examples) in &self.gallery {
            let _ = writeln!(s, "### {heading}\n");
            for ex in examples {
                let p = &ex.prediction;
                let _ = writeln!(
                    s,
                    "- `{}` gold {} ({}), {:?}: `{}`",
                    p.id,
                    p.gold,
                    p.class_name,
                    p.outcome,
                    md_cell(&p.completion).replace('`', "'")
                );
            }
            s.push('\n');
        }
        s
    }

    pub fn html(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\n{}\n</style>\n</head>\n<body>\n<h1>{}</h1>\n",
            esc(&self.title),
            CSS,
            esc(&self.title)
        );
        for t in &self.tables {
            let _ = write!(s, "<section class=\"table\">\n<h2>{}</h2>\n<table>\n<thead><tr>", esc(&t.title));
            for h in &t.header {
                let _ = write!(s, "<th>{}</th>", esc(h));
            }
            s.push_str("</tr></thead>\n<tbody>\n");
            let mut group = None;
            for r in &t.rows {
                if r.group.is_some() && r.group != group {
                    group = r.group.clone();
                    let _ = writeln!(
                        s,
                        "<tr class=\"group\"><th colspan=\"{}\">{}</th></tr>",
                        t.header.len(),
                        esc(r.group.as_deref().unwrap_or_default())
                    );
                }
                s.push_str("<tr>");
                for c in &r.cells {
                    let _ = write!(s, "<td>{}</td>", esc(c));
                }
                s.push_str("</tr>\n");
            }
            s.push_str("</tbody>\n</table>\n</section>\n");
        }
        for (section, plots) in &self.plots {
            let _ = write!(
                s,
                "<section class=\"plots\" id=\"{}\">\n<h2>{}</h2>\n<div class=\"grid\">\n",
                anchor(section),
                esc(section)
            );
            for p in plots {
                let _ = writeln!(
                    s,
                    "<figure><img alt=\"{}\" src=\"{}\"><figcaption>{}</figcaption></figure>",
                    esc(&p.caption),
                    data_uri(&p.png),
                    esc(&p.caption)
                );
            }
            s.push_str("</div>\n</section>\n");
        }
        s.push_str("<section class=\"gallery\" id=\"examples\">\n<h2>Examples</h2>\n");
        for (heading, examples) in &self.gallery {
            let _ = write!(s, "<h3>{}</h3>\n<div class=\"examples\">\n", esc(heading));
            for ex in examples {
                let p = &ex.prediction;
                let class = if p.correct { "ok" } else { "bad" };
                let _ = write!(s, "<div class=\"example {class}\">");
                if let Some(img) = &ex.image {
                    let _ = write!(s, "<img alt=\"slice {}\" src=\"{}\">", esc(&p.id), data_uri(img));
                }
                let _ = writeln!(
                    s,
                    "<p class=\"meta\"><code>{}</code> gold <b>{}</b> ({}) · answer <b>{}</b> · {}</p><details><summary>question</summary><pre>{}</pre></details><pre class=\"completion\">{}</pre></div>",
                    esc(&p.id),
                    esc(&p.gold),
                    esc(&p.class_name),
                    esc(p.extracted.as_deref().unwrap_or("—")),
                    esc(&format!("{:?}", p.outcome).to_lowercase()),
                    esc(&p.prompt),
                    esc(&p.completion)
                );
            }
            s.push_str("</div>\n");
        }
        s.push_str("</section>\n</body>\n</html>\n");
        s
    }

    /// Write `report.md`, `plots/*.png` and `report.html` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let plots_dir = dir.join("plots");
        std::fs::create_dir_all(&plots_dir).with_context(|| format!("creating {}", plots_dir.display()))?;
        for p in self.plots.iter().flat_map(|(_, p)| p) {
            let path = plots_dir.join(&p.file);
            std::fs::write(&path, &p.png).with_context(|| format!("writing {}", path.display()))?;
        }
        for (name, text) in [("report.md", self.markdown()), ("report.html", self.html())] {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

/// One plot per (stage, metric), one line per variant (and run): loss,
/// reward and each reward component (± std bands), KL, completion length...
fn training_curves(
    params: &ReportParams,
    train: &[TrainRun],
    full_label: &dyn Fn(Option<&str>, &str) -> String,
) -> anyhow::Result<Vec<Plot>> {
    let mut stages: Vec<&str> = Vec::new();
    for t in train {
        if !stages.contains(&t.stage()) {
            stages.push(t.stage());
        }
    }
    let mut plots = Vec::new();
    for stage in stages {
        let runs: Vec<&TrainRun> = train.iter().filter(|t| t.stage() == stage).collect();
        let mut metrics: Vec<&String> = runs.iter().flat_map(|t| t.curves.keys()).collect();
        metrics.sort();
        metrics.dedup();
        if params.train_metrics.is_empty() {
            // A std drawn as a band around its mean gets no plot of its own.
            let banded: Vec<String> = metrics.iter().filter_map(|m| std_companion(m)).collect();
            metrics.retain(|m| !banded.contains(*m));
        } else {
            metrics.retain(|m| params.train_metrics.contains(*m));
        }
        metrics.sort_by_key(|m| (curve_rank(m), (*m).clone()));
        for metric in metrics {
            let std_key = std_companion(metric);
            let lines: Vec<Line> = runs
                .iter()
                .filter_map(|t| {
                    let points = t.curves.get(metric)?;
                    Some(Line {
                        name: full_label(t.group.as_deref(), &t.id),
                        points: points.clone(),
                        band: band(points, std_key.as_ref().and_then(|k| t.curves.get(k))),
                    })
                })
                .collect();
            let title = format!("{stage}: {metric}");
            let band_note = if lines.iter().any(|l| !l.band.is_empty()) { " (band: ± std)" } else { "" };
            let names = lines.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ");
            plots.push(Plot {
                file: format!("train_{:02}.png", plots.len()),
                caption: format!("{title}{band_note} — {names}"),
                png: plots::lines(&title, "step", &lines)?,
            });
        }
    }
    Ok(plots)
}

const CSS: &str = "body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}\
h1{border-bottom:2px solid #444}h2{margin-top:2rem}\
table{border-collapse:collapse;font-size:.9rem}th,td{border:1px solid #bbb;padding:.3rem .6rem;text-align:right}\
th{background:#eee}td:first-child,th:first-child{text-align:left}\
.grid{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0}figure img{max-width:100%;border:1px solid #ddd}\
figcaption{font-size:.8rem;color:#555}\
.examples{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:1rem}\
.example{border:2px solid #ccc;border-radius:6px;padding:.5rem;font-size:.8rem}.example.ok{border-color:#3a3}.example.bad{border-color:#c33}\
tr.group th{background:#dde6f0;text-align:left}\
.example img{width:100%;image-rendering:pixelated}.meta code{word-break:break-all}pre{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;padding:.4rem}";

pub struct ReportStage;

impl StageKind for ReportStage {
    type Params = ReportParams;
    const KIND: &'static str = "report";
    // v2: train-side accuracy columns, per-stage training curves with std bands.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "report.md + self-contained report.html: accuracy/consistency tables, per-class and confusion plots, training curves, examples";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[
            InputSpec::many("evals", "`eval` outputs, one table row each"),
            InputSpec {
                name: "judges",
                doc: "`judge` outputs (matched to evals by stage id)",
                many: true,
                optional: true,
            },
            InputSpec {
                name: "train",
                doc: "SFT/GRPO outputs with metrics.jsonl (training curves)",
                many: true,
                optional: true,
            },
        ];
        INPUTS
    }

    fn validate(p: &Self::Params) -> Result<(), ParamError> {
        if let Some(i) = p.tables.iter().position(|t| t.rows.is_empty()) {
            return Err(ParamError::new(&["tables"], format!("table {i} (\"{}\") has no rows", p.tables[i].title)));
        }
        Ok(())
    }

    fn run(params: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()> {
        let mut evals = Vec::new();
        for a in ctx.inputs("evals") {
            evals.push(load_eval(&artifact_id(a), &a.path, params.gallery)?);
        }
        if evals.is_empty() {
            bail!("input `evals`: no eval outputs given");
        }
        for a in ctx.inputs("judges") {
            attach_judge(&mut evals, None, &a.path)?;
        }
        let mut train = Vec::new();
        for a in ctx.inputs("train") {
            train.push(load_train(&artifact_id(a), &a.path)?);
        }
        let report = Report::build(params, evals, &train)?;
        report.write(ctx.output_dir())?;
        tracing::info!(dir = %ctx.output_dir().display(), "report written");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::metrics_of;
    use crate::metrics::{CiMethod, ExtractFailure, Outcome};
    use crate::predictions::tests::sample;
    use crate::predictions::write_jsonl;

    fn write_eval(dir: &Path, accuracy_pattern: &[bool]) {
        write_eval_of(dir, accuracy_pattern, None);
    }

    fn source(model: &str, split: &str, prompt: &str) -> Option<crate::metrics::EvalSource> {
        Some(crate::metrics::EvalSource {
            model: model.into(),
            data: format!("export.{split}"),
            split: Some(split.into()),
            prompt: prompt.into(),
        })
    }

    fn write_eval_of(dir: &Path, accuracy_pattern: &[bool], source: Option<crate::metrics::EvalSource>) {
        std::fs::create_dir_all(dir.join(GALLERY_DIR)).unwrap();
        let classes = ["emphysema", "ground-glass opacity"];
        let preds: Vec<Prediction> = accuracy_pattern
            .iter()
            .enumerate()
            .map(|(i, &ok)| {
                let class = classes[i % 2];
                let mut p = sample(&format!("case{i}/s"), class, "<think>x < y & z</think><answer>A</answer>", ok);
                p.options = vec!["A. emphysema".into(), "B. ground-glass opacity".into()];
                p.gold = if class == "emphysema" { "A".into() } else { "B".into() };
                p.predicted_class = Some("emphysema".into());
                if i == 3 {
                    (p.extracted, p.predicted_class, p.failure, p.valid, p.outcome) =
                        (None, None, Some(ExtractFailure::NoAnswerTag), false, Outcome::Unparseable);
                }
                p
            })
            .collect();
        write_jsonl(&dir.join(PREDICTIONS_JSONL), &preds).unwrap();
        let m = Metrics { source, ..metrics_of(&preds, CiMethod::Wilson) };
        std::fs::write(dir.join(METRICS_JSON), serde_json::to_string(&m).unwrap()).unwrap();
        let png = plots::encode_png(&[0, 0, 0, 255, 255, 255], 2, 1).unwrap();
        std::fs::write(dir.join(GALLERY_DIR).join("case0_s.img"), png).unwrap();
        std::fs::write(dir.join(GALLERY_DIR).join("gallery.json"), r#"[{"id": "case0/s", "image": "case0_s.img"}]"#)
            .unwrap();
    }

    fn run_report(root: &Path, out: &str, params: &ReportParams) -> std::path::PathBuf {
        let out = root.join(out);
        let judge = root.join("judge");
        std::fs::create_dir_all(&judge).unwrap();
        let c = serde_json::json!({
            "eval_stage": "eval@grpo", "backend": "rules", "n": 6,
            "rate": {"k": 5, "n": 6, "value": 0.8333, "lo": 0.43, "hi": 0.97},
            "consistent": 5, "inconsistent": 1, "undetermined": 0, "skipped": 0, "errors": 0
        });
        std::fs::write(judge.join(CONSISTENCY_JSON), c.to_string()).unwrap();
        let train = root.join("grpo");
        std::fs::create_dir_all(&train).unwrap();
        std::fs::write(
            train.join("metrics.jsonl"),
            "{\"step\": 1, \"loss\": 0.9, \"reward\": 1.0, \"kl\": 0.0}\n{\"step\": 2, \"loss\": 0.7, \"reward\": 2.5, \"kl\": 0.01, \"note\": \"x\"}\n",
        )
        .unwrap();
        let mut ctx = StageContext::builder("report", &out)
            .input("evals", "eval@base", None, root.join("base"))
            .input("evals", "eval@grpo", None, root.join("grpo_eval"))
            .input("judges", "judge@grpo", None, &judge)
            .input("train", "grpo", None, &train)
            .build()
            .unwrap();
        ReportStage::run(params, &mut ctx).unwrap();
        out
    }

    #[test]
    fn report_has_every_table_plot_and_example_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        write_eval(&dir.path().join("base"), &[false, false, true, false, false, true]);
        write_eval(&dir.path().join("grpo_eval"), &[true, true, true, false, true, true]);
        let params = ReportParams {
            labels: BTreeMap::from([("eval@base".to_string(), "Base (zero-shot)".to_string())]),
            tables: vec![TableSpec {
                title: "Table 4: rewards".into(),
                rows: vec!["eval@base".into(), "eval@grpo".into()],
            }],
            ..Default::default()
        };
        let out = run_report(dir.path(), "out", &params);
        let html = std::fs::read_to_string(out.join("report.html")).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
        // Main, Table 4 and per-class tables.
        assert_eq!(html.matches("<table>").count(), 3);
        assert!(html.contains("<h2>Table 4: rewards</h2>"));
        // Per-class bars + 2 confusion matrices + 3 training curves (loss, reward, kl) + 2 gallery images.
        assert_eq!(html.matches("<img ").count(), 1 + 2 + 3 + 2);
        assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 8);
        assert!(!html.contains("src=\"http"), "self-contained");
        assert!(html.contains("<td>Base (zero-shot)</td>"));
        assert!(html.contains("<td>33.33 [9.68, 70.00]</td>"), "accuracy with Wilson CI");
        assert!(html.contains("<td>+50.00</td>"), "delta vs the first eval");
        assert!(html.contains("<td>83.33 [43.00, 97.00]</td>"), "consistency of the judged eval");
        assert!(html.contains("x &lt; y &amp; z"), "completions are escaped");
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(md.contains("| Model | n | Accuracy | Macro |"), "no side-split column without a train eval");
        assert!(md.contains("![grpo: kl — grpo](plots/train_02.png)"), "{md}");
        for f in ["per_class_accuracy.png", "confusion_00.png", "confusion_01.png", "train_02.png"] {
            assert!(out.join("plots").join(f).is_file(), "{f}");
        }
        let again = run_report(dir.path(), "out2", &params);
        assert_eq!(std::fs::read(out.join("report.html")).unwrap(), std::fs::read(again.join("report.html")).unwrap());
    }

    #[test]
    fn bad_baseline_and_table_rows_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_eval(&dir.path().join("base"), &[true, false]);
        let e = load_eval("eval", &dir.path().join("base"), 2).unwrap();
        let p = ReportParams { baseline: Some("nope".into()), ..Default::default() };
        let err = Report::build(&p, vec![e.clone()], &[]).err().unwrap().to_string();
        assert!(err.contains("`baseline`") && err.contains("nope"), "{err}");
        let p = ReportParams {
            tables: vec![TableSpec { title: "T".into(), rows: vec!["x".into()] }],
            ..Default::default()
        };
        let err = Report::build(&p, vec![e], &[]).err().unwrap().to_string();
        assert!(err.contains("no eval named `x`"), "{err}");
    }

    /// A GRPO metrics.jsonl as TRL names it, for one variant.
    fn write_grpo_metrics(dir: &Path, scale: f64) {
        std::fs::create_dir_all(dir).unwrap();
        let rows: Vec<String> = (1..=4)
            .map(|step| {
                let s = step as f64;
                serde_json::json!({
                    "step": step, "epoch": 0.1 * s, "loss": 0.05 / s, "lr": 1e-6, "grad_norm": 0.3,
                    "reward": scale * s, "reward_std": 0.2,
                    "rewards/format/mean": 0.5 + 0.1 * s, "rewards/format/std": 0.1,
                    "rewards/validity/mean": 0.9, "rewards/validity/std": 0.05,
                    "rewards/correctness/mean": 0.1 * s * scale, "rewards/correctness/std": 0.3,
                    "kl": 0.001 * s, "entropy": 1.5, "completions/mean_length": 40.0 + s,
                    "clip_ratio/region_mean": 0.0, "frac_reward_zero_std": 0.25,
                })
                .to_string()
            })
            .collect();
        std::fs::write(dir.join("metrics.jsonl"), rows.join("\n") + "\n").unwrap();
    }

    #[test]
    fn grpo_curves_plot_loss_reward_components_kl_and_length_per_variant() {
        let dir = tempfile::tempdir().unwrap();
        write_eval(&dir.path().join("e"), &[true, false]);
        write_grpo_metrics(&dir.path().join("ga"), 1.0);
        write_grpo_metrics(&dir.path().join("gb"), 0.5);
        let sft = dir.path().join("sft");
        std::fs::create_dir_all(&sft).unwrap();
        std::fs::write(sft.join("metrics.jsonl"), "{\"step\": 1, \"epoch\": 0, \"loss\": 2.0, \"lr\": 0.1}\n").unwrap();
        let train = vec![
            load_train("sft", &sft).unwrap(),
            load_train("grpo@full", &dir.path().join("ga")).unwrap(),
            load_train("grpo@no_validity", &dir.path().join("gb")).unwrap(),
        ];
        assert!(!train[1].curves.contains_key("epoch") && train[1].curves["reward"].len() == 4);
        let evals = vec![load_eval("eval", &dir.path().join("e"), 2).unwrap()];
        let report = Report::build(&ReportParams::default(), evals, &train).unwrap();
        let md = report.markdown();
        let captions: Vec<&str> = md
            .lines()
            .filter_map(|l| l.strip_prefix("![").and_then(|l| l.split_once("](plots/train_")).map(|(c, _)| c))
            .collect();
        let both = "grpo@full, grpo@no_validity";
        assert_eq!(
            captions,
            [
                "sft: loss — sft".to_string(),
                "sft: lr — sft".to_string(),
                format!("grpo: loss — {both}"),
                format!("grpo: reward (band: ± std) — {both}"),
                format!("grpo: rewards/correctness/mean (band: ± std) — {both}"),
                format!("grpo: rewards/format/mean (band: ± std) — {both}"),
                format!("grpo: rewards/validity/mean (band: ± std) — {both}"),
                format!("grpo: kl — {both}"),
                format!("grpo: completions/mean_length — {both}"),
                format!("grpo: entropy — {both}"),
                format!("grpo: clip_ratio/region_mean — {both}"),
                format!("grpo: frac_reward_zero_std — {both}"),
                format!("grpo: lr — {both}"),
                format!("grpo: grad_norm — {both}"),
            ],
            "one plot per metric, std series drawn as bands"
        );
        let html = report.html();
        assert_eq!(html.matches("<figure>").count(), 1 + 1 + captions.len(), "bars + confusion + curves");
        // An explicit selection plots exactly those metrics (a std then gets its own plot).
        let p = ReportParams { train_metrics: vec!["kl".into(), "reward_std".into()], ..Default::default() };
        let evals = vec![load_eval("eval", &dir.path().join("e"), 2).unwrap()];
        let md = Report::build(&p, evals, &train).unwrap().markdown();
        assert!(md.contains("![grpo: kl — grpo@full, grpo@no_validity](plots/train_00.png)"), "{md}");
        assert!(md.contains("![grpo: reward_std — grpo@full, grpo@no_validity](plots/train_01.png)"), "{md}");
        assert!(!md.contains("sft:"), "sft has neither metric");
        // Bands pair std with mean by step.
        assert_eq!(band(&[(1.0, 2.0), (2.0, 3.0)], Some(&vec![(2.0, 0.5)])), vec![(2.0, 2.5, 3.5)]);
        assert_eq!(std_companion("rewards/format/mean").as_deref(), Some("rewards/format/std"));
        assert_eq!(std_companion("kl"), None);
    }

    #[test]
    fn train_split_evals_become_a_column_of_their_test_eval() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_eval_of(&d.join("base"), &[false, false, true, false], source("tiny_model", "test", "think"));
        write_eval_of(&d.join("test"), &[true, true, false, true], source("sft", "test", "think"));
        write_eval_of(&d.join("train"), &[true, true, true, true, true, false], source("sft", "train", "think"));
        // Same model, other prompt: stays a row of its own.
        write_eval_of(&d.join("nothink"), &[true, false], source("sft", "train", "no_think"));
        let evals = vec![
            load_eval("eval_base", &d.join("base"), 2).unwrap(),
            load_eval("eval", &d.join("test"), 2).unwrap(),
            load_eval("eval_train", &d.join("train"), 2).unwrap(),
            load_eval("eval_train_nothink", &d.join("nothink"), 2).unwrap(),
        ];
        let report = Report::build(&ReportParams::default(), evals.clone(), &[]).unwrap();
        let md = report.markdown();
        assert!(md.contains("| Model | n | Accuracy | train acc | Macro |"), "{md}");
        let row = |id: &str| md.lines().find(|l| l.starts_with(&format!("| {id} | "))).unwrap_or_default().to_string();
        assert!(row("eval").contains("| 75.00 [30.06, 95.44] | 83.33 [43.65, 96.99] |"), "{}", row("eval"));
        assert!(row("eval_base").contains("| 25.00 [4.56, 69.94] | - |"), "{}", row("eval_base"));
        assert!(row("eval_train").is_empty(), "the train eval is a column, not a row");
        assert!(!row("eval_train_nothink").is_empty(), "no test eval with its prompt: a row");
        assert!(!md.contains("### eval_train\n"), "no gallery of the column eval");
        // Without side splits every eval is a row.
        let p = ReportParams { side_splits: Vec::new(), ..Default::default() };
        let md = Report::build(&p, evals, &[]).unwrap().markdown();
        assert!(md.contains("| Model | n | Accuracy | Macro |") && md.contains("| eval_train | 6 |"), "{md}");
    }

    #[test]
    fn runs_are_row_groups_and_ids_are_resolved_per_run() {
        let dir = tempfile::tempdir().unwrap();
        write_eval(&dir.path().join("a"), &[true, false]);
        write_eval(&dir.path().join("b"), &[true, true]);
        let mut evals = Vec::new();
        for (run, sub) in [("mini (run 1)", "a"), ("mini (run 2)", "b")] {
            let mut e = load_eval("eval", &dir.path().join(sub), 2).unwrap();
            e.group = Some(run.into());
            evals.push(e);
        }
        let p = ReportParams { baseline: Some("mini (run 2)/eval".into()), ..Default::default() };
        let report = Report::build(&p, evals.clone(), &[]).unwrap();
        let html = report.html();
        assert_eq!(html.matches("<tr class=\"group\"><th colspan=\"10\">mini (run 1)</th></tr>").count(), 1);
        assert_eq!(html.matches("<tr class=\"group\">").count(), 4, "2 runs x (main + per-class tables)");
        assert!(html.contains("deltas vs mini (run 2) · eval") && html.contains("<td>-50.00</td>"));
        assert!(html.contains("<h3>mini (run 1) · eval</h3>"));
        let md = report.markdown();
        assert!(md.contains("| **mini (run 2)** | | | | | | | | | |"), "{md}");
        // A bare stage id is ambiguous across runs.
        let p = ReportParams { baseline: Some("eval".into()), ..Default::default() };
        let err = format!("{:#}", Report::build(&p, evals, &[]).err().unwrap());
        assert!(err.contains("several runs") && err.contains("mini (run 1)/eval"), "{err}");
    }

    fn write_judge(dir: &Path, eval_stage: &str, judged: Option<&Path>, k: usize) {
        std::fs::create_dir_all(dir).unwrap();
        let digest = judged.map(|d| predictions_digest(&d.join(PREDICTIONS_JSONL)).unwrap());
        let c = serde_json::json!({
            "eval_stage": eval_stage, "eval_predictions": digest, "backend": "rules", "n": 2,
            "rate": {"k": k, "n": 2, "value": k as f64 / 2.0, "lo": 0.0, "hi": 1.0},
            "consistent": k, "inconsistent": 2 - k, "undetermined": 0, "skipped": 0, "errors": 0
        });
        std::fs::write(dir.join(CONSISTENCY_JSON), c.to_string()).unwrap();
    }

    #[test]
    fn judges_find_their_eval_by_predictions_not_by_the_recorded_stage_id() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_eval(&d.join("zoom"), &[true, false]);
        write_eval(&d.join("no_zoom"), &[false, false]);
        let load = || {
            vec![
                load_eval("eval@no_zoom", &d.join("no_zoom"), 2).unwrap(),
                load_eval("eval@zoom", &d.join("zoom"), 2).unwrap(),
            ]
        };
        // A judge output cached from mini recorded `eval`; in the sweep it is
        // `judge@zoom`'s and judged the predictions of `eval@zoom`.
        write_judge(&d.join("judge_zoom"), "eval", Some(&d.join("zoom")), 1);
        write_judge(&d.join("judge_no_zoom"), "eval@no_zoom", Some(&d.join("no_zoom")), 2);
        let mut evals = load();
        attach_judge(&mut evals, None, &d.join("judge_zoom")).unwrap();
        attach_judge(&mut evals, None, &d.join("judge_no_zoom")).unwrap();
        assert_eq!(evals[1].consistency.as_ref().map(|c| c.consistent), Some(1), "eval@zoom");
        assert_eq!(evals[0].consistency.as_ref().map(|c| c.consistent), Some(2), "eval@no_zoom");

        // Identical predictions: the recorded id wins, else the first unjudged eval.
        write_eval(&d.join("same"), &[true, false]);
        let mut evals = load();
        evals.push(load_eval("eval", &d.join("same"), 2).unwrap());
        write_judge(&d.join("judge_same"), "eval", Some(&d.join("same")), 0);
        attach_judge(&mut evals, None, &d.join("judge_same")).unwrap();
        assert_eq!(evals[2].consistency.as_ref().map(|c| c.consistent), Some(0), "the recorded id");
        assert!(evals[1].consistency.is_none());
        write_judge(&d.join("judge_other"), "eval_sft", Some(&d.join("same")), 1);
        attach_judge(&mut evals, None, &d.join("judge_other")).unwrap();
        assert_eq!(evals[1].consistency.as_ref().map(|c| c.consistent), Some(1), "first unjudged");

        // Predictions of an eval the report does not have: an error naming the judge file.
        write_eval(&d.join("elsewhere"), &[true, true, true]);
        write_judge(&d.join("judge_elsewhere"), "eval@zoom", Some(&d.join("elsewhere")), 2);
        let err = format!("{:#}", attach_judge(&mut load(), None, &d.join("judge_elsewhere")).unwrap_err());
        assert!(err.contains("judge_elsewhere") && err.contains("not among the report's evals"), "{err}");

        // Outputs written before the digest existed match by stage id.
        write_judge(&d.join("judge_old"), "eval@zoom", None, 2);
        let mut evals = load();
        attach_judge(&mut evals, None, &d.join("judge_old")).unwrap();
        assert_eq!(evals[1].consistency.as_ref().map(|c| c.consistent), Some(2));
    }
}
