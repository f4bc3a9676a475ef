//! Stage `report`: every eval (and its judge, and the training runs) of a
//! recipe side by side in `report.md` + `plots/*.png` and a self-contained
//! `report.html` (PNG plots and gallery images embedded as base64, opens
//! offline). Deterministic given its inputs: no timestamps, sorted keys,
//! byte-reproducible PNGs.
//!
//! Inputs: `evals` (many `eval` outputs), optional `judges` (many `judge`
//! outputs; matched to evals by the eval stage id they record) and optional
//! `train` (many SFT/GRPO outputs with `metrics.jsonl`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::Path;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use pipeline_engine::context::Artifact;
use pipeline_engine::{InputSpec, ParamError, StageContext, StageKind};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::eval::{GALLERY_DIR, METRICS_JSON};
use crate::judge::{CONSISTENCY_JSON, Consistency};
use crate::metrics::{Metrics, Rate};
use crate::plots;
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
    /// Training metrics to plot (empty: every numeric key of metrics.jsonl).
    pub train_metrics: Vec<String>,
    /// Gallery items shown per eval.
    pub gallery: usize,
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
        }
    }
}

/// One gallery entry of an eval.
#[derive(Debug, Clone)]
pub struct Example {
    pub prediction: Prediction,
    pub image: Option<Vec<u8>>,
}

/// Everything the report knows about one eval.
#[derive(Debug, Clone)]
pub struct EvalRun {
    pub id: String,
    pub metrics: Metrics,
    pub consistency: Option<Consistency>,
    pub examples: Vec<Example>,
}

/// One training run: metric name -> (step, value) points.
#[derive(Debug, Clone)]
pub struct TrainRun {
    pub id: String,
    pub curves: BTreeMap<String, Vec<(f64, f64)>>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: unexpected content", path.display()))
}

pub fn load_eval(id: &str, dir: &Path, gallery: usize) -> anyhow::Result<EvalRun> {
    let metrics: Metrics = read_json(&dir.join(METRICS_JSON))?;
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
    Ok(EvalRun { id: id.into(), metrics, consistency: None, examples: mixed })
}

/// Numeric fields of each `metrics.jsonl` row against `step` (row index when absent).
pub fn load_train(id: &str, dir: &Path, keep: &[String]) -> anyhow::Result<TrainRun> {
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
            if k == "step" || k == "epoch" || !(keep.is_empty() || keep.contains(k)) {
                continue;
            }
            if let Some(y) = v.as_f64().filter(|y| y.is_finite()) {
                curves.entry(k.clone()).or_default().push((x, y));
            }
        }
    }
    Ok(TrainRun { id: id.into(), curves })
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

/// A table: header and rows of cells (plain text).
struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
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

/// The report model: tables and plots built once, written as Markdown and HTML.
pub struct Report {
    title: String,
    tables: Vec<Table>,
    plots: Vec<(String, Vec<Plot>)>,
    evals: Vec<EvalRun>,
    labels: BTreeMap<String, String>,
}

impl Report {
    pub fn build(params: &ReportParams, evals: Vec<EvalRun>, train: &[TrainRun]) -> anyhow::Result<Self> {
        let label = |id: &str| params.labels.get(id).cloned().unwrap_or_else(|| id.to_string());
        let find = |id: &str| evals.iter().find(|e| e.id == id);
        let baseline = match &params.baseline {
            Some(b) => Some(find(b).with_context(|| {
                format!(
                    "param `baseline`: `{b}` is not one of the evals {:?}",
                    evals.iter().map(|e| &e.id).collect::<Vec<_>>()
                )
            })?),
            None => evals.first(),
        };
        let mut tables = Vec::new();
        let base_acc = baseline.map(|b| b.metrics.accuracy.value);
        tables.push(Table {
            title: format!(
                "Accuracy (%, 95% CI) with deltas vs {}",
                baseline.map(|b| label(&b.id)).unwrap_or_else(|| "-".into())
            ),
            header: [
                "Model",
                "n",
                "Accuracy",
                "Macro",
                "Format",
                "Validity",
                "Unparseable",
                "Mean tokens",
                "Consistency",
                "Δ acc (pp)",
            ]
            .map(String::from)
            .to_vec(),
            rows: evals
                .iter()
                .map(|e| {
                    let m = &e.metrics;
                    vec![
                        label(&e.id),
                        m.n.to_string(),
                        pct_ci(&m.accuracy),
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
                    ]
                })
                .collect(),
        });
        for t in &params.tables {
            let mut rows = Vec::new();
            let first = t.rows.first().and_then(|r| find(r)).map(|e| e.metrics.accuracy.value);
            for r in &t.rows {
                let e = find(r).with_context(|| format!("param `tables` (\"{}\"): no eval named `{r}`", t.title))?;
                rows.push(vec![
                    label(r),
                    pct_ci(&e.metrics.accuracy),
                    pct(e.metrics.format_rate.value),
                    pct(e.metrics.validity_rate.value),
                    first.map_or_else(|| "-".into(), |f| signed_pp(e.metrics.accuracy.value - f)),
                ]);
            }
            tables.push(Table {
                title: t.title.clone(),
                header: ["Setting", "Accuracy", "Format", "Validity", "Δ acc (pp)"].map(String::from).to_vec(),
                rows,
            });
        }
        // Per-class accuracy: the union of classes, in first-seen confusion order.
        let mut classes: Vec<String> = Vec::new();
        for e in &evals {
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
            rows: evals
                .iter()
                .map(|e| {
                    let mut row = vec![label(&e.id)];
                    row.extend(
                        classes.iter().map(|c| e.metrics.per_class.get(c).map_or_else(|| "-".into(), |r| pct(r.value))),
                    );
                    row
                })
                .collect(),
        });

        let mut plots = Vec::new();
        let series: Vec<(String, Vec<f64>)> = evals
            .iter()
            .map(|e| {
                (label(&e.id), classes.iter().map(|c| e.metrics.per_class.get(c).map_or(0.0, |r| r.value)).collect())
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
        for (i, e) in evals.iter().enumerate() {
            let c = &e.metrics.confusion;
            let title = format!("Confusion: {}", label(&e.id));
            confusions.push(Plot {
                file: format!("confusion_{i:02}.png"),
                caption: format!("{} (rows gold, columns predicted)", label(&e.id)),
                png: plots::heatmap(&title, &c.classes, &c.columns, &c.counts)?,
            });
        }
        plots.push(("Confusion matrices".to_string(), confusions));
        let mut keys: Vec<&String> = train.iter().flat_map(|t| t.curves.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut curves = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let series: Vec<(String, Vec<(f64, f64)>)> =
                train.iter().filter_map(|t| t.curves.get(*k).map(|p| (label(&t.id), p.clone()))).collect();
            curves.push(Plot {
                file: format!("train_{i:02}.png"),
                caption: (*k).clone(),
                png: plots::lines(k, "step", &series)?,
            });
        }
        if !curves.is_empty() {
            plots.push(("Training curves".to_string(), curves));
        }
        Ok(Self { title: params.title.clone(), tables, plots, evals, labels: params.labels.clone() })
    }

    fn label(&self, id: &str) -> String {
        self.labels.get(id).cloned().unwrap_or_else(|| id.to_string())
    }

    pub fn markdown(&self) -> String {
        let mut s = format!("# {}\n\n", self.title);
        for t in &self.tables {
            let _ = writeln!(s, "## {}\n", t.title);
            let _ = writeln!(s, "| {} |", t.header.iter().map(|h| md_cell(h)).collect::<Vec<_>>().join(" | "));
            let _ = writeln!(s, "|{}|", vec!["---"; t.header.len()].join("|"));
            for r in &t.rows {
                let _ = writeln!(s, "| {} |", r.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | "));
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
        for e in &self.evals {
            let _ = writeln!(s, "### {}\n", self.label(&e.id));
            for ex in &e.examples {
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
            for r in &t.rows {
                s.push_str("<tr>");
                for c in r {
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
        for e in &self.evals {
            let _ = write!(s, "<h3>{}</h3>\n<div class=\"examples\">\n", esc(&self.label(&e.id)));
            for ex in &e.examples {
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

const CSS: &str = "body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}\
h1{border-bottom:2px solid #444}h2{margin-top:2rem}\
table{border-collapse:collapse;font-size:.9rem}th,td{border:1px solid #bbb;padding:.3rem .6rem;text-align:right}\
th{background:#eee}td:first-child,th:first-child{text-align:left}\
.grid{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0}figure img{max-width:100%;border:1px solid #ddd}\
figcaption{font-size:.8rem;color:#555}\
.examples{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:1rem}\
.example{border:2px solid #ccc;border-radius:6px;padding:.5rem;font-size:.8rem}.example.ok{border-color:#3a3}.example.bad{border-color:#c33}\
.example img{width:100%;image-rendering:pixelated}.meta code{word-break:break-all}pre{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;padding:.4rem}";

pub struct ReportStage;

impl StageKind for ReportStage {
    type Params = ReportParams;
    const KIND: &'static str = "report";
    const VERSION: u32 = 1;
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
            let path = a.path.join(CONSISTENCY_JSON);
            let c: Consistency = read_json(&path)?;
            let Some(e) = evals.iter_mut().find(|e| e.id == c.eval_stage) else {
                bail!("{}: judged eval `{}` is not among the report's `evals`", path.display(), c.eval_stage);
            };
            e.consistency = Some(c);
        }
        let mut train = Vec::new();
        for a in ctx.inputs("train") {
            train.push(load_train(&artifact_id(a), &a.path, &params.train_metrics)?);
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
        let m = metrics_of(&preds, CiMethod::Wilson);
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
        assert!(md.contains("| Model | n | Accuracy |") && md.contains("![kl](plots/train_00.png)"));
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
}
