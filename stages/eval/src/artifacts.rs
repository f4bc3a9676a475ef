//! What eval, judge and report outputs exchange: the file names each stage
//! writes and the others read, how an input artifact is named in tables and
//! records, and the digest that ties a judge output to the predictions it
//! judged. Kept here, not in any one of them, so none imports another for a
//! name.

use std::path::Path;

use anyhow::Context as _;
use stage_api::context::Artifact;

/// `eval`: one scored completion per line ([`crate::predictions::Prediction`]).
pub const PREDICTIONS_JSONL: &str = "predictions.jsonl";
/// `eval`: the same rows as flat Parquet columns.
pub const PREDICTIONS_PARQUET: &str = "predictions.parquet";
/// `eval`: the aggregate ([`crate::metrics::Metrics`]).
pub const METRICS_JSON: &str = "metrics.json";
/// `eval`: a few items with their image for the report; listed in [`GALLERY_JSON`].
pub const GALLERY_DIR: &str = "gallery";
pub const GALLERY_JSON: &str = "gallery.json";
/// `eval` with backend `http`: the served model name and the model ids the
/// server reported ([`crate::served::ServedRecord`]).
pub const SERVED_JSON: &str = "served.json";
/// `judge`: one verdict per prediction.
pub const VERDICTS_JSONL: &str = "verdicts.jsonl";
/// `judge`: the consistency rate ([`crate::judge::Consistency`]).
pub const CONSISTENCY_JSON: &str = "consistency.json";
/// `sft` / `grpo`: one row of training metrics per logged step.
pub const TRAIN_METRICS_JSONL: &str = "metrics.jsonl";
/// `report`: the Markdown and HTML renderings and the plots they show.
pub const REPORT_MD: &str = "report.md";
pub const REPORT_HTML: &str = "report.html";
pub const PLOTS_DIR: &str = "plots";

/// A row id for an input artifact: `stage` or `stage.output`.
pub fn artifact_id(a: &Artifact) -> String {
    match &a.output {
        Some(o) => format!("{}.{o}", a.stage),
        None => a.stage.clone(),
    }
}

/// blake3 (hex) of a predictions.jsonl: what a judge output records of the
/// eval it judged, and how the report finds that eval again.
pub fn predictions_digest(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}
