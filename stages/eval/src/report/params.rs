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
    #[schemars(range(max = 10_000))]
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
