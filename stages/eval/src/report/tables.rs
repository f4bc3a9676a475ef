//! The report's tables as plain-text cells: the main accuracy table (with
//! side-split columns and deltas), the paper-shaped tables (Table 1:
//! [`prompt_table`], Table 2: [`benchmark_table`]), the recipe's ablation
//! tables and the per-class table; which evals are rows ([`layout`]).
//!
//! "Accuracy" is each eval's headline ([`crate::metrics::Metrics::headline`]):
//! the accuracy, or the benchmark's own metric (ChartQA relaxed accuracy,
//! TextVQA VQA accuracy). Deltas are taken only between evals of the same
//! dataset ([`EvalRun::same_dataset`]).

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};

use super::load::{EvalRun, key_of};
use super::params::{BenchmarkTableSpec, PromptTableSpec, ReportParams};
use crate::metrics::Mean;

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

pub fn pct_ci(r: impl Into<Mean>) -> String {
    let r = r.into();
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

/// How a row names its data: the dataset identity, with the matching when
/// it is a benchmark's own metric.
fn data_cell(e: &EvalRun) -> String {
    let Some(src) = &e.metrics.source else { return "-".into() };
    match src.answer_match.as_deref() {
        Some(m @ ("chartqa" | "vqa_accuracy" | "exact" | "relaxed")) => format!("{} ({m})", src.dataset()),
        _ => src.dataset(),
    }
}

/// The eval a row's delta is taken against: `baseline` when it scored the
/// same dataset, else the first row on the row's dataset.
fn delta_reference<'a>(row: &EvalRun, rows: &[&'a EvalRun], baseline: Option<&'a EvalRun>) -> Option<&'a EvalRun> {
    match baseline {
        Some(b) if b.same_dataset(row) => Some(b),
        _ => rows.iter().copied().find(|r| r.same_dataset(row)),
    }
}

/// The main table: one row per row eval, its side-split accuracies, rates,
/// consistency and the delta to `baseline` (to the first row of the same
/// dataset for rows on other data); a "Data" column when rows differ in data.
pub fn main_table(params: &ReportParams, evals: &[EvalRun], lay: &Layout, baseline: Option<&EvalRun>) -> Table {
    let rows: Vec<&EvalRun> = lay.rows.iter().map(|&i| &evals[i]).collect();
    let show_data = rows.iter().any(|r| rows.first().is_some_and(|f| !f.same_dataset(r)));
    let mut header: Vec<String> = vec!["Model".into()];
    if show_data {
        header.push("Data".into());
    }
    header.extend(["n", "Accuracy"].map(String::from));
    header.extend(lay.columns.iter().map(|s| format!("{s} acc")));
    header.extend(
        ["Macro", "Format", "Validity", "Unparseable", "Mean tokens", "Consistency", "Δ acc (pp)"].map(String::from),
    );
    let base_label = baseline.map(|b| params.full_label(b.group.as_deref(), &b.id)).unwrap_or_else(|| "-".into());
    let title = if show_data {
        format!("Accuracy (%, 95% CI) with deltas vs {base_label} (rows on other data: vs the first row on theirs)")
    } else {
        format!("Accuracy (%, 95% CI) with deltas vs {base_label}")
    };
    Table {
        title,
        header,
        rows: lay
            .rows
            .iter()
            .map(|&i| {
                let e = &evals[i];
                let m = &e.metrics;
                let mut cells = vec![params.label(e.group.as_deref(), &e.id)];
                if show_data {
                    cells.push(data_cell(e));
                }
                cells.extend([m.n.to_string(), pct_ci(m.headline())]);
                let side = lay.sides.get(&i);
                for col in &lay.columns {
                    let found = side.and_then(|s| s.iter().find(|(split, _)| split == col));
                    cells.push(found.map_or_else(|| "-".into(), |(_, j)| pct_ci(evals[*j].metrics.headline())));
                }
                let delta = delta_reference(e, &rows, baseline)
                    .map_or_else(|| "-".into(), |b| signed_pp(m.headline().value - b.metrics.headline().value));
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
                        Some(c) => pct_ci(c.rate),
                    },
                    delta,
                ]);
                Row { group: e.group.clone(), cells }
            })
            .collect(),
    }
}

/// Column heading of a prompt variant in a Table 1 shape.
fn prompt_heading(prompt: &str) -> String {
    match prompt {
        "think" => "w think".into(),
        "no_think" => "w/o think".into(),
        "cot_forcing" => "CoT forced".into(),
        "dataset" => "dataset prompt".into(),
        other => other.into(),
    }
}

/// The (group, model) rows of a paper-shaped table: `models` in order when
/// given (each must have an eval among `evals`), else every model of
/// `evals` in order of first appearance.
fn model_rows(evals: &[&EvalRun], models: &[String], what: &str) -> anyhow::Result<Vec<(Option<String>, String)>> {
    let mut seen: Vec<(Option<String>, String)> = Vec::new();
    for e in evals {
        if let Some(m) = e.model() {
            let k = (e.group.clone(), m.to_string());
            if !seen.contains(&k) {
                seen.push(k);
            }
        }
    }
    if models.is_empty() {
        return Ok(seen);
    }
    let mut rows = Vec::new();
    for m in models {
        let matching: Vec<_> = seen.iter().filter(|(g, id)| id == m || key_of(g.as_deref(), id) == *m).collect();
        if matching.is_empty() {
            let have: Vec<String> = seen.iter().map(|(g, id)| key_of(g.as_deref(), id)).collect();
            bail!("{what}: model `{m}` has no eval here (models: {have:?})");
        }
        rows.extend(matching.into_iter().cloned());
    }
    Ok(rows)
}

fn datasets_of(evals: &[EvalRun]) -> Vec<String> {
    let mut all: Vec<String> = evals.iter().filter_map(EvalRun::dataset).collect();
    all.sort();
    all.dedup();
    all
}

/// A Table 1 shape: rows = models, columns = prompt variants, cells = the
/// headline of the model's first eval with that prompt on `spec.dataset`.
pub fn prompt_table(params: &ReportParams, evals: &[EvalRun], spec: &PromptTableSpec) -> anyhow::Result<Table> {
    let what = format!("param `prompt_tables` (\"{}\")", spec.title);
    let on: Vec<&EvalRun> = evals.iter().filter(|e| e.dataset().as_deref() == Some(spec.dataset.as_str())).collect();
    if on.is_empty() {
        bail!("{what}: no eval scored dataset `{}` (datasets: {:?})", spec.dataset, datasets_of(evals));
    }
    let prompts: Vec<&str> = ["think", "no_think", "cot_forcing", "dataset"]
        .into_iter()
        .filter(|p| on.iter().any(|e| e.prompt() == Some(*p)))
        .collect();
    let mut header = vec!["Model".to_string()];
    header.extend(prompts.iter().map(|p| prompt_heading(p)));
    let rows = model_rows(&on, &spec.models, &what)?
        .into_iter()
        .map(|(group, model)| {
            let mut cells = vec![params.label(group.as_deref(), &model)];
            for p in &prompts {
                let e =
                    on.iter().find(|e| e.group == group && e.model() == Some(model.as_str()) && e.prompt() == Some(*p));
                cells.push(e.map_or_else(|| "-".into(), |e| pct_ci(e.metrics.headline())));
            }
            Row { group, cells }
        })
        .collect();
    Ok(Table { title: spec.title.clone(), header, rows })
}

/// A Table 2 shape: rows = models, columns = the benchmark datasets, their
/// sample-weighted average (sum of n x score over sum of n, for rows with
/// every dataset) and its delta to the `base` model's.
pub fn benchmark_table(params: &ReportParams, evals: &[EvalRun], spec: &BenchmarkTableSpec) -> anyhow::Result<Table> {
    let what = format!("param `benchmark_tables` (\"{}\")", spec.title);
    let on: Vec<&EvalRun> = evals
        .iter()
        .filter(|e| e.dataset().is_some_and(|d| spec.datasets.contains(&d)))
        .filter(|e| spec.prompt.as_ref().is_none_or(|p| e.prompt() == Some(p.as_str())))
        .collect();
    for d in &spec.datasets {
        if !on.iter().any(|e| e.dataset().as_deref() == Some(d.as_str())) {
            bail!("{what}: no eval scored dataset `{d}` (datasets: {:?})", datasets_of(evals));
        }
    }
    let cell = |group: &Option<String>, model: &str, d: &str| {
        on.iter().copied().find(|e| e.group == *group && e.model() == Some(model) && e.dataset().as_deref() == Some(d))
    };
    let rows = model_rows(&on, &spec.models, &what)?;
    // Weighted average over every dataset, or None when the row misses one.
    let weighted = |group: &Option<String>, model: &str| -> Option<f64> {
        let (mut sum, mut n) = (0.0, 0u64);
        for d in &spec.datasets {
            let h = cell(group, model, d)?.metrics.headline();
            sum += h.value * h.n as f64;
            n += h.n;
        }
        (n > 0).then(|| sum / n as f64)
    };
    let base = match &spec.base {
        Some(b) => rows
            .iter()
            .find(|(g, m)| m == b || key_of(g.as_deref(), m) == *b)
            .with_context(|| format!("{what}: `base` model `{b}` is not a row"))?,
        None => rows.first().with_context(|| format!("{what}: no rows"))?,
    };
    let base_avg = weighted(&base.0, &base.1);
    let mut header = vec!["Model".to_string()];
    for d in &spec.datasets {
        let n = on.iter().find(|e| e.dataset().as_deref() == Some(d.as_str())).map_or(0, |e| e.metrics.n);
        header.push(format!("{} (n={n})", params.labels.get(d).cloned().unwrap_or_else(|| d.clone())));
    }
    header.push("Weighted avg.".into());
    header.push(format!("Δ vs {} (pp)", params.label(base.0.as_deref(), &base.1)));
    let table_rows = rows
        .iter()
        .map(|(group, model)| {
            let mut cells = vec![params.label(group.as_deref(), model)];
            for d in &spec.datasets {
                cells.push(cell(group, model, d).map_or_else(|| "-".into(), |e| pct_ci(e.metrics.headline())));
            }
            let avg = weighted(group, model);
            cells.push(avg.map_or_else(|| "-".into(), pct));
            cells.push(match (avg, base_avg) {
                (Some(a), Some(b)) => signed_pp(a - b),
                _ => "-".into(),
            });
            Row { group: group.clone(), cells }
        })
        .collect();
    Ok(Table { title: spec.title.clone(), header, rows: table_rows })
}

/// The recipe's ablation tables (`tables`), deltas against each table's
/// first row (n/a for rows on other data than the first row's).
pub fn ablation_tables(params: &ReportParams, evals: &[EvalRun]) -> anyhow::Result<Vec<Table>> {
    let mut tables = Vec::new();
    for t in &params.tables {
        let mut trows = Vec::new();
        let mut first: Option<&EvalRun> = None;
        for r in &t.rows {
            let e = find_eval(evals, r)
                .with_context(|| format!("param `tables` (\"{}\")", t.title))?
                .with_context(|| format!("param `tables` (\"{}\"): no eval named `{r}`", t.title))?;
            let f = *first.get_or_insert(e);
            let delta = if f.same_dataset(e) {
                signed_pp(e.metrics.headline().value - f.metrics.headline().value)
            } else {
                "n/a (other data)".into()
            };
            trows.push(Row {
                group: e.group.clone(),
                cells: vec![
                    params.label(e.group.as_deref(), &e.id),
                    pct_ci(e.metrics.headline()),
                    pct(e.metrics.format_rate.value),
                    pct(e.metrics.validity_rate.value),
                    delta,
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
                cells.extend(classes.iter().map(|c| e.metrics.class_headline(c).map_or_else(|| "-".into(), pct)));
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
