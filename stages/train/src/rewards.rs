//! GRPO rewards: named functions of (completion, gold answer, offered
//! options), looked up by name from the recipe's `reward_weights` table.
//!
//! - `format`: the whole completion is `<think>.*?</think>\s*<answer>.*?</answer>`
//!   (Python `re.fullmatch` with DOTALL, as the Med-R1 lineage); under the
//!   no-think prompt, `\s*<answer>.*?</answer>`.
//! - `validity`: the extracted answer is one of the offered option letters.
//! - `correctness`: the extracted answer is the gold letter.
//!
//! Extraction is the eval stage's ([`Scorer`]: first match of the answer
//! regex, default `<answer>\s*(\w+)\s*</answer>`), so a completion the
//! reward calls correct is one the evaluation counts as correct.

use std::collections::BTreeMap;

use regex::Regex;
use stages_eval::metrics::{AnswerMatch, MetricsError, Scorer};

/// Reward names in the order they are computed and logged.
pub const REWARD_NAMES: [&str; 3] = ["format", "validity", "correctness"];

/// The paper's weights: R = 1·format + 1·validity + 2·correctness.
pub fn paper_weights() -> BTreeMap<String, f64> {
    [("format", 1.0), ("validity", 1.0), ("correctness", 2.0)].into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Format of the think prompt, anchored at both ends (`re.fullmatch`).
pub const THINK_FORMAT: &str = r"(?s)\A<think>.*?</think>\s*<answer>.*?</answer>\z";
/// Format of the no-think prompt.
pub const ANSWER_FORMAT: &str = r"(?s)\A\s*<answer>.*?</answer>\z";

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("unknown reward `{name}` (known: {})", REWARD_NAMES.join(", "))]
    Unknown { name: String },
    #[error("reward `{name}`: weight must be a finite number, got {weight}")]
    BadWeight { name: String, weight: f64 },
    #[error("every reward weight is 0: nothing to learn from")]
    AllZero,
    #[error(transparent)]
    Regex(#[from] MetricsError),
}

/// What a reward function sees of one completion.
pub struct Sample<'a> {
    pub completion: &'a str,
    /// Gold answer (an option letter).
    pub gold: &'a str,
    /// Offered option letters (`A`, `B`, ...).
    pub letters: &'a [String],
}

/// A named reward: a score in [0, 1] per completion.
pub trait RewardFn: Send + Sync {
    fn name(&self) -> &'static str;
    fn score(&self, sample: &Sample) -> f64;
}

struct Format(Regex);
impl RewardFn for Format {
    fn name(&self) -> &'static str {
        "format"
    }
    fn score(&self, s: &Sample) -> f64 {
        f64::from(u8::from(self.0.is_match(s.completion)))
    }
}

struct Validity(Scorer);
impl RewardFn for Validity {
    fn name(&self) -> &'static str {
        "validity"
    }
    fn score(&self, s: &Sample) -> f64 {
        f64::from(u8::from(self.0.score(s.completion, s.gold, s.letters).valid))
    }
}

struct Correctness(Scorer);
impl RewardFn for Correctness {
    fn name(&self) -> &'static str {
        "correctness"
    }
    fn score(&self, s: &Sample) -> f64 {
        f64::from(u8::from(self.0.score(s.completion, s.gold, s.letters).correct))
    }
}

/// The reward function called `name`; `think` picks the format variant.
pub fn reward_by_name(name: &str, think: bool, answer_regex: &str) -> Result<Box<dyn RewardFn>, RewardError> {
    // The scorer's own format regex is unused here: `format` is its own reward.
    let scorer = || Scorer::new(answer_regex, ANSWER_FORMAT, AnswerMatch::Choice);
    Ok(match name {
        "format" => {
            let pattern = if think { THINK_FORMAT } else { ANSWER_FORMAT };
            let re = Regex::new(pattern).map_err(|e| MetricsError::Regex {
                field: "format",
                pattern: pattern.into(),
                message: e.to_string(),
            })?;
            Box::new(Format(re))
        }
        "validity" => Box::new(Validity(scorer()?)),
        "correctness" => Box::new(Correctness(scorer()?)),
        other => return Err(RewardError::Unknown { name: other.to_string() }),
    })
}

/// The weighted rewards of a run. Every reward named in the weights table
/// is scored and logged; a weight of 0 takes it out of the total (the
/// paper's Table 4 ablation) while still showing how often it would fire.
pub struct Rewards {
    funcs: Vec<(Box<dyn RewardFn>, f64)>,
}

impl Rewards {
    pub fn new(weights: &BTreeMap<String, f64>, think: bool, answer_regex: &str) -> Result<Self, RewardError> {
        for (name, &w) in weights {
            if !REWARD_NAMES.contains(&name.as_str()) {
                return Err(RewardError::Unknown { name: name.clone() });
            }
            if !w.is_finite() {
                return Err(RewardError::BadWeight { name: name.clone(), weight: w });
            }
        }
        if weights.values().all(|&w| w == 0.0) {
            return Err(RewardError::AllZero);
        }
        let funcs = REWARD_NAMES
            .iter()
            .filter_map(|n| weights.get(*n).map(|&w| (n, w)))
            .map(|(n, w)| Ok((reward_by_name(n, think, answer_regex)?, w)))
            .collect::<Result<_, RewardError>>()?;
        Ok(Self { funcs })
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.funcs.iter().map(|(f, _)| f.name()).collect()
    }

    /// One score per reward function, in [`names`](Self::names) order.
    pub fn score(&self, sample: &Sample) -> Vec<f64> {
        self.funcs.iter().map(|(f, _)| f.score(sample)).collect()
    }

    /// Σ weight · score.
    pub fn total(&self, scores: &[f64]) -> f64 {
        self.funcs.iter().zip(scores).map(|((_, w), s)| w * s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letters() -> Vec<String> {
        ["A", "B", "C", "D", "E", "F", "G"].iter().map(|s| s.to_string()).collect()
    }

    /// (completion, format under think, format under no-think, validity, correctness); gold = "B".
    const TABLE: &[(&str, u8, u8, u8, u8)] = &[
        ("<think>lung window</think><answer>B</answer>", 1, 0, 1, 1),
        ("<think>x</think>\n\n<answer> B </answer>", 1, 0, 1, 1),
        ("<think>x</think><answer>A</answer>", 1, 0, 1, 0),
        // Text before <think>: not the format, the answer still counts.
        ("Sure! <think>x</think><answer>B</answer>", 0, 0, 1, 1),
        // Text after the answer.
        ("<think>x</think><answer>B</answer> done", 0, 0, 1, 1),
        // Two answer tags: `.*?` may span `B</answer><answer>A` under a full
        // match (as Python's re.fullmatch does); the first tag is the answer.
        ("<think>x</think><answer>B</answer><answer>A</answer>", 1, 0, 1, 1),
        ("<think>x</think><answer>A</answer><answer>B</answer>", 1, 0, 1, 0),
        // Newlines inside the tags.
        ("<think>\nstep 1\nstep 2\n</think>\n<answer>\nB\n</answer>", 1, 0, 1, 1),
        // Lowercase letter: extracted, but not an offered option.
        ("<think>x</think><answer>b</answer>", 1, 0, 0, 0),
        // The option's name instead of its letter.
        ("<think>x</think><answer>emphysema</answer>", 1, 0, 0, 0),
        ("<think>x</think><answer>B. emphysema</answer>", 1, 0, 0, 0),
        // A letter that is not offered.
        ("<think>x</think><answer>Z</answer>", 1, 0, 0, 0),
        // No-think completions.
        ("<answer>B</answer>", 0, 1, 1, 1),
        ("  <answer>B</answer>", 0, 1, 1, 1),
        // Truncated, unclosed, empty, missing think close.
        ("<think>x</think><answer>B", 0, 0, 0, 0),
        ("<think>x<answer>B</answer>", 0, 0, 1, 1),
        ("", 0, 0, 0, 0),
        ("<think></think><answer></answer>", 1, 0, 0, 0),
    ];

    #[test]
    fn tricky_completions_score_as_the_table_says() {
        let weights = paper_weights();
        let think = Rewards::new(&weights, true, stages_eval::metrics::DEFAULT_ANSWER_REGEX).unwrap();
        let no_think = Rewards::new(&weights, false, stages_eval::metrics::DEFAULT_ANSWER_REGEX).unwrap();
        assert_eq!(think.names(), REWARD_NAMES);
        let letters = letters();
        for &(completion, fmt, fmt_nt, valid, correct) in TABLE {
            let sample = Sample { completion, gold: "B", letters: &letters };
            let got = think.score(&sample);
            let want = [fmt, valid, correct].map(f64::from);
            assert_eq!(got, want, "think rewards of {completion:?}");
            assert_eq!(no_think.score(&sample)[0], f64::from(fmt_nt), "no-think format of {completion:?}");
            assert_eq!(think.total(&got), f64::from(fmt) + f64::from(valid) + 2.0 * f64::from(correct));
        }
    }

    #[test]
    fn rewards_agree_with_the_eval_scorer() {
        let scorer = stages_eval::eval::EvalParams::default().scorer().unwrap();
        let rewards = Rewards::new(&paper_weights(), true, stages_eval::metrics::DEFAULT_ANSWER_REGEX).unwrap();
        let letters = letters();
        for &(completion, ..) in TABLE {
            let eval = scorer.score(completion, "B", &letters);
            let r = rewards.score(&Sample { completion, gold: "B", letters: &letters });
            assert_eq!((r[1] == 1.0, r[2] == 1.0), (eval.valid, eval.correct), "{completion:?}");
        }
    }

    #[test]
    fn weights_select_validate_and_zero_out_rewards() {
        let regex = stages_eval::metrics::DEFAULT_ANSWER_REGEX;
        let mut w = paper_weights();
        w.insert("format".into(), 0.0);
        let r = Rewards::new(&w, true, regex).unwrap();
        let letters = letters();
        let s = Sample { completion: "<think>x</think><answer>B</answer>", gold: "B", letters: &letters };
        assert_eq!(r.score(&s), vec![1.0, 1.0, 1.0], "a zero-weight reward is still scored (and logged)");
        assert_eq!(r.total(&r.score(&s)), 3.0, "but adds nothing");
        let only: BTreeMap<String, f64> = [("correctness".to_string(), 1.0)].into();
        assert_eq!(Rewards::new(&only, true, regex).unwrap().names(), ["correctness"]);

        w.insert("lenght".into(), 1.0);
        let e = Rewards::new(&w, true, regex).err().unwrap().to_string();
        assert!(e.contains("unknown reward `lenght`") && e.contains("format, validity, correctness"), "{e}");
        let zero: BTreeMap<String, f64> = [("format".to_string(), 0.0)].into();
        assert!(matches!(Rewards::new(&zero, true, regex), Err(RewardError::AllZero)));
        let nan: BTreeMap<String, f64> = [("format".to_string(), f64::NAN)].into();
        assert!(matches!(Rewards::new(&nan, true, regex), Err(RewardError::BadWeight { .. })));
        assert!(matches!(Rewards::new(&only, true, "no group"), Err(RewardError::Regex(_))));
    }
}
