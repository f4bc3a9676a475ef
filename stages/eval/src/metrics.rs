//! The aggregate metrics of `metrics.json`: accuracy overall, per class and
//! macro, format / validity / invalid / unparseable rates, the confusion
//! matrix, all with 95% confidence intervals, and the mean benchmark credit
//! ([`Score`]: the accuracy for binary matching, TextVQA's VQA accuracy for
//! `vqa_accuracy`). The per-item scores come from the task contract
//! ([`stages_task::answer::Scorer`]).
//!
//! Pure Rust (no tch) so the judge and report stages and their tests use it
//! without a model.

use std::collections::BTreeMap;

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stages_task::answer::{ItemScore, Outcome};

/// Two-sided 95% normal quantile.
const Z95: f64 = 1.959_963_984_540_054;

/// How confidence intervals are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case", tag = "method")]
pub enum CiMethod {
    /// Wilson score interval (closed form; good for small n and p near 0/1).
    #[default]
    Wilson,
    /// Percentile bootstrap over items, seeded.
    Bootstrap { resamples: u32, seed: u64 },
}

/// A proportion with its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub k: u64,
    pub n: u64,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

/// Wilson score interval for `k` successes out of `n`; (0, 1) when n = 0.
pub fn wilson(k: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Percentile bootstrap interval of the mean of 0/1 outcomes.
pub fn bootstrap(outcomes: &[bool], resamples: u32, seed: u64) -> (f64, f64) {
    let values: Vec<f64> = outcomes.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
    bootstrap_mean(&values, resamples, seed)
}

/// Percentile bootstrap interval of the mean of `values` (draws in the same
/// order as [`bootstrap`], so 0/1 values give its interval).
pub fn bootstrap_mean(values: &[f64], resamples: u32, seed: u64) -> (f64, f64) {
    let n = values.len();
    if n == 0 || resamples == 0 {
        return (0.0, 1.0);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> =
        (0..resamples).map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64).collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    (at(0.025), at(0.975))
}

/// Normal-approximation 95% interval of the mean of values in [0, 1]
/// (clamped), for partial credits where the Wilson interval does not apply.
pub fn normal_mean(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (0.0, 1.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = if n > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
    let half = Z95 * (var / n as f64).sqrt();
    ((mean - half).max(0.0), (mean + half).min(1.0))
}

impl CiMethod {
    pub fn rate(&self, outcomes: &[bool]) -> Rate {
        let n = outcomes.len() as u64;
        let k = outcomes.iter().filter(|&&b| b).count() as u64;
        let (lo, hi) = match *self {
            CiMethod::Wilson => wilson(k, n),
            CiMethod::Bootstrap { resamples, seed } => bootstrap(outcomes, resamples, seed),
        };
        Rate { k, n, value: if n == 0 { 0.0 } else { k as f64 / n as f64 }, lo, hi }
    }

    /// The mean credit with its interval: exactly [`Self::rate`] when every
    /// credit is 0 or 1; otherwise the bootstrap of the mean (bootstrap) or
    /// the normal approximation (wilson).
    pub fn mean(&self, credits: &[f64]) -> Mean {
        let n = credits.len() as u64;
        if credits.iter().all(|&c| c == 0.0 || c == 1.0) {
            let r = self.rate(&credits.iter().map(|&c| c == 1.0).collect::<Vec<_>>());
            return Mean { n, value: r.value, lo: r.lo, hi: r.hi };
        }
        let value = credits.iter().sum::<f64>() / n as f64;
        let (lo, hi) = match *self {
            CiMethod::Wilson => normal_mean(credits),
            CiMethod::Bootstrap { resamples, seed } => bootstrap_mean(credits, resamples, seed),
        };
        Mean { n, value, lo, hi }
    }
}

/// A mean in [0, 1] with its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Mean {
    pub n: u64,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

impl From<Rate> for Mean {
    fn from(r: Rate) -> Self {
        Mean { n: r.n, value: r.value, lo: r.lo, hi: r.hi }
    }
}

/// The mean benchmark credit of an eval: what a benchmark reports. Equal to
/// `accuracy` for binary matching (choice, exact, relaxed, chartqa); the
/// VQA accuracy for `vqa_accuracy`, where an item earns 0, 0.3, 0.6, 0.9 or 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    #[serde(flatten)]
    pub mean: Mean,
    /// Mean credit per class (classes with at least one item).
    pub per_class: BTreeMap<String, f64>,
}

/// What the aggregate needs of one scored item.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredItem {
    pub class: String,
    /// The class the extracted answer names (through the item's options);
    /// None when invalid or unparseable.
    pub predicted_class: Option<String>,
    pub score: ItemScore,
    pub completion_tokens: usize,
    pub completion_chars: usize,
}

/// Rows are gold classes, columns predicted classes then `invalid` and
/// `unparseable`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Confusion {
    pub classes: Vec<String>,
    pub columns: Vec<String>,
    pub counts: Vec<Vec<u64>>,
}

/// What an eval scored: its model and data inputs (stage ids, `stage.output`
/// for named outputs), the split name and the prompt variant. The report
/// uses it to put an eval on the training split next to the test eval of the
/// same model and prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalSource {
    pub model: String,
    pub data: String,
    /// `train`, `test`, ...: the data input's output name (`export.train`),
    /// else the HF shard prefix of its Parquet files (`train-00000-of-00001`).
    pub split: Option<String>,
    pub prompt: String,
    /// Which data was scored, as the report compares evals: the data input
    /// without its sweep variant, `[:limit]` when a prefix was scored
    /// (`crate::eval::dataset_identity`). Absent before eval v5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// The `answer_match` the eval scored with. Absent before eval v5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_match: Option<String>,
}

impl EvalSource {
    /// The dataset identity, derived from `data` for outputs before eval v5.
    pub fn dataset(&self) -> String {
        self.dataset.clone().unwrap_or_else(|| {
            let (stage, output) = match self.data.split_once('.') {
                Some((s, o)) => (s, Some(o)),
                None => (self.data.as_str(), None),
            };
            crate::eval::dataset_identity(stage, output, None)
        })
    }
}

/// The contents of `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub n: u64,
    pub accuracy: Rate,
    pub per_class: BTreeMap<String, Rate>,
    /// Mean of the per-class accuracies (classes with at least one item).
    pub macro_accuracy: f64,
    pub format_rate: Rate,
    pub validity_rate: Rate,
    /// Extracted but not an offered option.
    pub invalid_rate: Rate,
    /// No answer could be extracted.
    pub unparseable_rate: Rate,
    /// Counts of each extraction failure mode.
    pub failures: BTreeMap<String, u64>,
    pub mean_completion_tokens: f64,
    pub mean_completion_chars: f64,
    pub confusion: Confusion,
    pub ci: CiMethod,
    /// Mean benchmark credit. Absent in metrics.json written before eval v5
    /// (then `accuracy` is the score).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<Score>,
    /// Absent in metrics.json written before eval v2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<EvalSource>,
}

impl Metrics {
    /// What the eval reports as its result: the mean credit ([`Score`]),
    /// else (older outputs) the accuracy.
    pub fn headline(&self) -> Mean {
        self.score.as_ref().map_or_else(|| self.accuracy.into(), |s| s.mean)
    }

    /// The result of one class, as [`Self::headline`].
    pub fn class_headline(&self, class: &str) -> Option<f64> {
        match &self.score {
            Some(s) => s.per_class.get(class).copied(),
            None => self.per_class.get(class).map(|r| r.value),
        }
    }
}

/// Aggregate scored items. `classes` fixes the confusion-matrix order
/// (classes seen in the items but missing from it are appended, sorted).
pub fn aggregate(items: &[ScoredItem], classes: &[String], ci: CiMethod) -> Metrics {
    let rate = |f: &dyn Fn(&ScoredItem) -> bool| ci.rate(&items.iter().map(f).collect::<Vec<_>>());
    let mut order: Vec<String> = classes.to_vec();
    let mut extra: Vec<String> = items
        .iter()
        .flat_map(|i| std::iter::once(&i.class).chain(i.predicted_class.as_ref()))
        .filter(|c| !order.contains(c))
        .cloned()
        .collect();
    extra.sort();
    extra.dedup();
    order.extend(extra);
    let mut per_class = BTreeMap::new();
    for c in &order {
        let outcomes: Vec<bool> = items.iter().filter(|i| &i.class == c).map(|i| i.score.correct).collect();
        if !outcomes.is_empty() {
            per_class.insert(c.clone(), ci.rate(&outcomes));
        }
    }
    let macro_accuracy = if per_class.is_empty() {
        0.0
    } else {
        per_class.values().map(|r| r.value).sum::<f64>() / per_class.len() as f64
    };
    let mut columns = order.clone();
    columns.extend(["invalid".to_string(), "unparseable".to_string()]);
    let mut counts = vec![vec![0u64; columns.len()]; order.len()];
    let mut failures = BTreeMap::new();
    for i in items {
        let row = order.iter().position(|c| c == &i.class).unwrap_or(0);
        let col = match (&i.predicted_class, i.score.outcome) {
            (_, Outcome::Unparseable) => columns.len() - 1,
            (Some(p), _) => order.iter().position(|c| c == p).unwrap_or(columns.len() - 2),
            (None, _) => columns.len() - 2,
        };
        if let Some(r) = counts.get_mut(row) {
            r[col] += 1;
        }
        if let Some(f) = i.score.failure {
            let key = serde_json::to_value(f).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            *failures.entry(key).or_insert(0) += 1;
        }
    }
    let credits: Vec<f64> = items.iter().map(|i| i.score.credit).collect();
    let per_class_score = per_class
        .keys()
        .map(|c| {
            let v: Vec<f64> = items.iter().filter(|i| &i.class == c).map(|i| i.score.credit).collect();
            (c.clone(), v.iter().sum::<f64>() / v.len() as f64)
        })
        .collect();
    let n = items.len();
    let mean = |f: &dyn Fn(&ScoredItem) -> usize| {
        if n == 0 { 0.0 } else { items.iter().map(f).sum::<usize>() as f64 / n as f64 }
    };
    Metrics {
        n: n as u64,
        accuracy: rate(&|i| i.score.correct),
        per_class,
        macro_accuracy,
        format_rate: rate(&|i| i.score.format_ok),
        validity_rate: rate(&|i| i.score.valid),
        invalid_rate: rate(&|i| i.score.outcome == Outcome::Invalid),
        unparseable_rate: rate(&|i| i.score.outcome == Outcome::Unparseable),
        failures,
        mean_completion_tokens: mean(&|i| i.completion_tokens),
        mean_completion_chars: mean(&|i| i.completion_chars),
        confusion: Confusion { classes: order, columns, counts },
        ci,
        score: Some(Score { mean: ci.mean(&credits), per_class: per_class_score }),
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use stages_task::answer::{AnswerMatch, DEFAULT_ANSWER_REGEX, Scorer};
    use stages_task::completion::ResponseFormat;

    use super::*;

    #[test]
    fn wilson_matches_known_values() {
        // Reference values: roots of the score-test quadratic (p - x)^2 = z^2 x (1 - x) / n
        // (what statsmodels' proportion_confint(method="wilson") returns).
        let (lo, hi) = wilson(8, 10);
        assert!((lo - 0.490_162).abs() < 1e-5 && (hi - 0.943_318).abs() < 1e-5, "{lo} {hi}");
        let (lo, hi) = wilson(0, 10);
        assert!(lo == 0.0 && (hi - 0.277_533).abs() < 1e-5, "{hi}");
        let (lo, hi) = wilson(52, 100);
        assert!((lo - 0.423_166).abs() < 1e-5 && (hi - 0.615_354).abs() < 1e-5, "{lo} {hi}");
        assert_eq!(wilson(0, 0), (0.0, 1.0));
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets_the_mean() {
        let outcomes: Vec<bool> = (0..200).map(|i| i % 4 != 0).collect();
        let a = bootstrap(&outcomes, 2000, 7);
        assert_eq!(a, bootstrap(&outcomes, 2000, 7));
        assert!(a.0 < 0.75 && a.1 > 0.75, "{a:?}");
        // Close to the normal approximation 0.75 +- 1.96 * sqrt(.75*.25/200) = +-0.060.
        assert!((a.1 - a.0 - 0.12).abs() < 0.03, "{a:?}");
        let all = bootstrap(&[true; 10], 100, 1);
        assert_eq!(all, (1.0, 1.0));
    }

    #[test]
    fn aggregate_counts_classes_rates_and_confusion() {
        let s = Scorer::new(DEFAULT_ANSWER_REGEX, ResponseFormat::Think, AnswerMatch::Choice).unwrap();
        let opts = ["A", "B", "C"].map(String::from).to_vec();
        let class_of = |l: &str| match l {
            "A" => Some("air".to_string()),
            "B" => Some("emph".to_string()),
            "C" => Some("ggo".to_string()),
            _ => None,
        };
        let rows = [
            ("air", "A", "<think>t</think><answer>A</answer>"),
            ("air", "A", "<think>t</think><answer>B</answer>"),
            ("emph", "B", "<answer>B</answer>"),
            ("emph", "B", "<answer>Q</answer>"),
            ("ggo", "C", "no tags"),
        ];
        let items: Vec<ScoredItem> = rows
            .iter()
            .map(|(class, gold, text)| {
                let score = s.score(text, gold, &opts);
                let predicted_class = if score.valid { score.extracted.as_deref().and_then(class_of) } else { None };
                ScoredItem {
                    class: class.to_string(),
                    predicted_class,
                    score,
                    completion_tokens: 10,
                    completion_chars: text.len(),
                }
            })
            .collect();
        let classes = ["air", "emph", "ggo"].map(String::from);
        let m = aggregate(&items, &classes, CiMethod::Wilson);
        assert_eq!((m.n, m.accuracy.k), (5, 2));
        assert!((m.accuracy.value - 0.4).abs() < 1e-12);
        assert_eq!(m.per_class["air"].k, 1);
        assert_eq!(m.per_class["ggo"].k, 0);
        assert!((m.macro_accuracy - (0.5 + 0.5 + 0.0) / 3.0).abs() < 1e-12);
        assert_eq!((m.format_rate.k, m.validity_rate.k, m.invalid_rate.k, m.unparseable_rate.k), (2, 3, 1, 1));
        assert_eq!(m.failures.get("no_answer_tag"), Some(&1));
        assert_eq!(m.mean_completion_tokens, 10.0);
        assert_eq!(m.confusion.columns, vec!["air", "emph", "ggo", "invalid", "unparseable"]);
        assert_eq!(m.confusion.counts, vec![vec![1, 1, 0, 0, 0], vec![0, 1, 0, 1, 0], vec![0, 0, 0, 0, 1]]);
        let (lo, hi) = wilson(2, 5);
        assert_eq!((m.accuracy.lo, m.accuracy.hi), (lo, hi));
        assert_eq!(m.headline(), Mean::from(m.accuracy), "binary credit: the score is the accuracy");
        assert_eq!(m.class_headline("air"), Some(0.5));
    }

    #[test]
    fn partial_credit_is_averaged_with_its_own_interval() {
        let s = Scorer::block(ResponseFormat::NoThink, AnswerMatch::VqaAccuracy);
        let humans = |m: usize| -> Vec<String> {
            (0..10).map(|i| if i < m { "yes".to_string() } else { format!("no{i}") }).collect()
        };
        // Credits 1, 0.9, 0.6, 0: mean 0.625; one item has full credit.
        let items: Vec<ScoredItem> = [4, 3, 2, 0]
            .iter()
            .map(|&m| ScoredItem {
                class: "all".into(),
                predicted_class: None,
                score: s.score_answers("<answer>yes</answer>", "yes", &humans(m), &[]),
                completion_tokens: 3,
                completion_chars: 20,
            })
            .collect();
        let m = aggregate(&items, &[], CiMethod::Wilson);
        assert_eq!(m.accuracy.k, 1);
        let h = m.headline();
        assert!((h.value - 0.625).abs() < 1e-12 && h.n == 4, "{h:?}");
        // Sample sd of (1, .9, .6, 0) = 0.4500; half width 1.96 * 0.45 / 2 = 0.441;
        // the upper end is clamped to 1.
        assert!((h.value - h.lo - 0.441).abs() < 1e-3 && h.hi == 1.0, "{h:?}");
        assert!((m.class_headline("all").unwrap() - 0.625).abs() < 1e-12);
        let b = aggregate(&items, &[], CiMethod::Bootstrap { resamples: 500, seed: 1 }).headline();
        assert!(b.lo < 0.625 && b.hi > 0.625 && b.hi <= 1.0, "{b:?}");
    }
}
