//! The report's tables as plain-text cells: the main accuracy table (with
//! side-split columns and deltas), the recipe's ablation tables and the
//! per-class table; which evals are rows ([`layout`]).

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};

use super::load::EvalRun;
use super::params::ReportParams;
use crate::metrics::Rate;

/// One table row; rows of one run share a `group` (shown as a header row).
#[derive(Debug, Clone)]
pub struct Row {
    pub group: Option<String>,
    pub cells: Vec<String>,
}

/// A table: header and rows of cells (plain text).
#[derive(Debug, Clone)]
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Row>,
}

impl Table {
    /// Each row with the group header that precedes it, if one does: a row
    /// whose group differs from the last group shown opens a new one.
    pub fn rows_with_group_headers(&self) -> Vec<(Option<&str>, &Row)> {
        let mut shown: Option<&str> = None;
        self.rows
            .iter()
            .map(|r| {
                let header = r.group.as_deref().filter(|g| shown != Some(*g));
                if header.is_some() {
                    shown = header;
                }
                (header, r)
            })
            .collect()
    }
}

pub fn pct(v: f64) -> String {
    format!("{:.2}", 100.0 * v)
}

pub fn pct_ci(r: &Rate) -> String {
    format!("{} [{}, {}]", pct(r.value), pct(r.lo), pct(r.hi))
}

pub fn signed_pp(d: f64) -> String {
    format!("{:+.2}", 100.0 * d)
}

/// Find an eval by key (`group/id`), or by stage id when only one run has it.
pub fn find_eval<'a>(evals: &'a [EvalRun], name: &str) -> anyhow::Result<Option<&'a EvalRun>> {
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
pub struct Layout {
    /// Indexes of the row evals, in input order.
    pub rows: Vec<usize>,
    /// Row index -> (split, eval index) of its side columns.
    pub sides: BTreeMap<usize, Vec<(String, usize)>>,
    /// Side splits that got a column, in `side_splits` order.
    pub columns: Vec<String>,
}

pub fn layout(evals: &[EvalRun], side_splits: &[String]) -> Layout {
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

/// The main table: one row per row eval, its side-split accuracies, rates,
/// consistency and the delta to `baseline`.
pub fn main_table(params: &ReportParams, evals: &[EvalRun], lay: &Layout, baseline: Option<&EvalRun>) -> Table {
    let base_acc = baseline.map(|b| b.metrics.accuracy.value);
    let mut header: Vec<String> = ["Model", "n", "Accuracy"].map(String::from).to_vec();
    header.extend(lay.columns.iter().map(|s| format!("{s} acc")));
    header.extend(
        ["Macro", "Format", "Validity", "Unparseable", "Mean tokens", "Consistency", "Δ acc (pp)"].map(String::from),
    );
    Table {
        title: format!(
            "Accuracy (%, 95% CI) with deltas vs {}",
            baseline.map(|b| params.full_label(b.group.as_deref(), &b.id)).unwrap_or_else(|| "-".into())
        ),
        header,
        rows: lay
            .rows
            .iter()
            .map(|&i| {
                let e = &evals[i];
                let m = &e.metrics;
                let mut cells = vec![params.label(e.group.as_deref(), &e.id), m.n.to_string(), pct_ci(&m.accuracy)];
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
    }
}

/// The recipe's ablation tables (`tables`), deltas against each table's first row.
pub fn ablation_tables(params: &ReportParams, evals: &[EvalRun]) -> anyhow::Result<Vec<Table>> {
    let mut tables = Vec::new();
    for t in &params.tables {
        let mut trows = Vec::new();
        let mut first = None;
        for r in &t.rows {
            let e = find_eval(evals, r)
                .with_context(|| format!("param `tables` (\"{}\")", t.title))?
                .with_context(|| format!("param `tables` (\"{}\"): no eval named `{r}`", t.title))?;
            let f = *first.get_or_insert(e.metrics.accuracy.value);
            trows.push(Row {
                group: e.group.clone(),
                cells: vec![
                    params.label(e.group.as_deref(), &e.id),
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
    Ok(tables)
}

/// The classes of the row evals: their union, in first-seen confusion order.
pub fn row_classes(rows: &[&EvalRun]) -> Vec<String> {
    let mut classes: Vec<String> = Vec::new();
    for e in rows {
        for c in &e.metrics.confusion.classes {
            if e.metrics.per_class.contains_key(c) && !classes.contains(c) {
                classes.push(c.clone());
            }
        }
    }
    classes
}

/// Accuracy per class of every row eval.
pub fn per_class_table(params: &ReportParams, rows: &[&EvalRun], classes: &[String]) -> Table {
    let mut header = vec!["Model".to_string()];
    header.extend(classes.iter().cloned());
    Table {
        title: "Per-class accuracy (%)".into(),
        header,
        rows: rows
            .iter()
            .map(|e| {
                let mut cells = vec![params.label(e.group.as_deref(), &e.id)];
                cells.extend(
                    classes.iter().map(|c| e.metrics.per_class.get(c).map_or_else(|| "-".into(), |r| pct(r.value))),
                );
                Row { group: e.group.clone(), cells }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_header_opens_where_the_run_changes() {
        let row = |g: Option<&str>| Row { group: g.map(String::from), cells: vec![] };
        let t = Table {
            title: "t".into(),
            header: vec!["Model".into()],
            rows: vec![row(Some("a")), row(Some("a")), row(None), row(Some("b")), row(Some("a"))],
        };
        let headers: Vec<Option<&str>> = t.rows_with_group_headers().into_iter().map(|(h, _)| h).collect();
        assert_eq!(headers, [Some("a"), None, None, Some("b"), Some("a")]);
    }
}
