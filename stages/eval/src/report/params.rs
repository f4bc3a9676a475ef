//! The recipe's settings of a report.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::load::key_of;

/// An extra table laid out like the paper's ablation tables (3, 4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    pub title: String,
    /// Eval row ids (stage ids, e.g. `eval@no_validity`), in display order;
    /// deltas are against the first row.
    pub rows: Vec<String>,
}

/// A table shaped like the paper's Table 1: one row per model, one column
/// per prompt variant (`think` "w think", `no_think` "w/o think", then
/// `cot_forcing` and `dataset` when present), from the evals of one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptTableSpec {
    pub title: String,
    /// Dataset identity of the evals placed (their `source.dataset` in
    /// metrics.json: the data input without its sweep variant, e.g. `export.test`).
    pub dataset: String,
    /// Model stage ids (the evals' `model` input), in row order; default:
    /// every model with an eval on `dataset`, in eval order. Row labels come
    /// from `labels` (by model id).
    #[serde(default)]
    pub models: Vec<String>,
}

/// A table shaped like the paper's Table 2: one row per model, one column
/// per benchmark dataset, their sample-weighted average (weights: items
/// scored) and its delta vs `base`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkTableSpec {
    pub title: String,
    /// Dataset identities, one column each (headings from `labels`, by dataset id).
    pub datasets: Vec<String>,
    /// Model stage ids in row order; default: every model with an eval on
    /// one of `datasets`, in eval order.
    #[serde(default)]
    pub models: Vec<String>,
    /// Model the Δ column is taken against (default: the first row).
    #[serde(default)]
    pub base: Option<String>,
    /// Only evals with this prompt variant (default: the first eval of each
    /// model and dataset).
    #[serde(default)]
    pub prompt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ReportParams {
    /// Heading of the report.
    pub title: String,
    /// Eval row id the deltas of the main table are taken against (default:
    /// the first eval). Deltas are only taken between evals of the same
    /// dataset: rows on other data are compared with the first row on theirs.
    pub baseline: Option<String>,
    /// Display names for eval ids (e.g. `"eval_base" = "Qwen2.5-VL (zero-shot)"`),
    /// model ids (rows of `prompt_tables` / `benchmark_tables`) and dataset
    /// ids (columns of `benchmark_tables`).
    pub labels: BTreeMap<String, String>,
    /// Tables shaped like the paper's Table 1 (models x think / no think).
    pub prompt_tables: Vec<PromptTableSpec>,
    /// Tables shaped like the paper's Table 2 (models x benchmarks, weighted average, Δ vs base).
    pub benchmark_tables: Vec<BenchmarkTableSpec>,
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
            prompt_tables: Vec::new(),
            benchmark_tables: Vec::new(),
            tables: Vec::new(),
            train_metrics: Vec::new(),
            gallery: 4,
            side_splits: vec!["train".into(), "val".into()],
        }
    }
}

impl ReportParams {
    /// The display name of an eval or training run: its label (by `group/id`,
    /// else by `id`), else its stage id.
    pub fn label(&self, group: Option<&str>, id: &str) -> String {
        self.labels.get(&key_of(group, id)).or_else(|| self.labels.get(id)).cloned().unwrap_or_else(|| id.to_string())
    }

    /// The label with its run, where no group header row is in sight (plot
    /// legends, gallery headings).
    pub fn full_label(&self, group: Option<&str>, id: &str) -> String {
        match group {
            Some(g) => format!("{g} · {}", self.label(group, id)),
            None => self.label(group, id),
        }
    }
}
