//! The report's plots as PNG: accuracy per class, one confusion matrix per
//! row eval, and the training curves (one plot per stage and metric, one
//! line per variant and run, std series drawn as bands).

use std::collections::BTreeMap;

use super::load::{EvalRun, TrainRun};
use super::params::ReportParams;
use crate::plots::{self, Line};

/// A PNG plot with a caption.
#[derive(Debug, Clone)]
pub struct Plot {
    pub file: String,
    pub caption: String,
    pub png: Vec<u8>,
}

/// Accuracy per lesion class, one bar per row eval.
pub fn per_class_bars(params: &ReportParams, rows: &[&EvalRun], classes: &[String]) -> anyhow::Result<Plot> {
    let series: Vec<(String, Vec<f64>)> = rows
        .iter()
        .map(|e| {
            (
                params.full_label(e.group.as_deref(), &e.id),
                classes.iter().map(|c| e.metrics.class_headline(c).unwrap_or(0.0)).collect(),
            )
        })
        .collect();
    Ok(Plot {
        file: "per_class_accuracy.png".into(),
        caption: "Accuracy per lesion class, one bar per model".into(),
        png: plots::grouped_bars("Per-class accuracy", classes, &series)?,
    })
}

/// The confusion matrix of every row eval.
pub fn confusions(params: &ReportParams, rows: &[&EvalRun]) -> anyhow::Result<Vec<Plot>> {
    let mut out = Vec::new();
    for (i, e) in rows.iter().enumerate() {
        let c = &e.metrics.confusion;
        let name = params.full_label(e.group.as_deref(), &e.id);
        out.push(Plot {
            file: format!("confusion_{i:02}.png"),
            caption: format!("{name} (rows gold, columns predicted)"),
            png: plots::heatmap(&format!("Confusion: {name}"), &c.classes, &c.columns, &c.counts)?,
        });
    }
    Ok(out)
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

/// One plot per (stage, metric), one line per variant (and run): loss,
/// reward and each reward component (± std bands), KL, completion length...
pub fn training_curves(params: &ReportParams, train: &[TrainRun]) -> anyhow::Result<Vec<Plot>> {
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
                        name: params.full_label(t.group.as_deref(), &t.id),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_pair_std_with_mean_by_step() {
        assert_eq!(band(&[(1.0, 2.0), (2.0, 3.0)], Some(&vec![(2.0, 0.5)])), vec![(2.0, 2.5, 3.5)]);
        assert_eq!(band(&[(1.0, 2.0)], None), vec![]);
        assert_eq!(std_companion("reward").as_deref(), Some("reward_std"));
        assert_eq!(std_companion("rewards/format/mean").as_deref(), Some("rewards/format/std"));
        assert_eq!(std_companion("kl"), None);
    }
}
