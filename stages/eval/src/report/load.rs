//! Outputs on disk -> what the report knows of them: an eval's metrics, its
//! gallery and the digest of its predictions ([`EvalRun`]), the judge that
//! judged it, and the curves of a training run ([`TrainRun`]).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use anyhow::{Context as _, bail};

use crate::artifacts::{
    CONSISTENCY_JSON, GALLERY_DIR, GALLERY_JSON, METRICS_JSON, PREDICTIONS_JSONL, TRAIN_METRICS_JSONL,
    predictions_digest,
};
use crate::judge::Consistency;
use crate::metrics::Metrics;
use crate::predictions::{Prediction, read_jsonl};

/// One gallery entry of an eval.
#[derive(Debug, Clone)]
pub struct Example {
    pub prediction: Prediction,
    pub image: Option<Vec<u8>>,
}

/// `group/id`, or `id` outside a comparison of runs.
pub(crate) fn key_of(group: Option<&str>, id: &str) -> String {
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

    pub(crate) fn split(&self) -> Option<&str> {
        self.metrics.source.as_ref().and_then(|s| s.split.as_deref())
    }

    /// The dataset identity the eval scored (`source.dataset`), if recorded.
    pub(crate) fn dataset(&self) -> Option<String> {
        self.metrics.source.as_ref().map(|s| s.dataset())
    }

    /// The model stage the eval scored, if recorded.
    pub(crate) fn model(&self) -> Option<&str> {
        self.metrics.source.as_ref().map(|s| s.model.as_str())
    }

    /// The prompt variant the eval used, if recorded.
    pub(crate) fn prompt(&self) -> Option<&str> {
        self.metrics.source.as_ref().map(|s| s.prompt.as_str())
    }

    /// Whether a delta between the two evals means anything: both scored
    /// the same dataset. Outputs from before the source was recorded know
    /// no dataset; two such evals are taken as comparable (as they were).
    pub(crate) fn same_dataset(&self, other: &EvalRun) -> bool {
        match (&self.metrics.source, &other.metrics.source) {
            (Some(a), Some(b)) => a.dataset() == b.dataset(),
            (None, None) => true,
            _ => false,
        }
    }

    /// Same run, same model, same prompt (both evals know their source).
    pub(crate) fn same_setting(&self, other: &EvalRun) -> bool {
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
    pub(crate) fn stage(&self) -> &str {
        self.id.split('@').next().unwrap_or(&self.id)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: unexpected content", path.display()))
}

pub fn load_eval(id: &str, dir: &Path, gallery: usize) -> anyhow::Result<EvalRun> {
    let metrics: Metrics = read_json(&dir.join(METRICS_JSON))?;
    let predictions = predictions_digest(&dir.join(PREDICTIONS_JSONL))?;
    let preds = read_jsonl(&dir.join(PREDICTIONS_JSONL))?;
    let by_id: BTreeMap<&str, &Prediction> = preds.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut examples = Vec::new();
    let listing = dir.join(GALLERY_DIR).join(GALLERY_JSON);
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
    let path = dir.join(TRAIN_METRICS_JSONL);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixtures::write_eval;

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
