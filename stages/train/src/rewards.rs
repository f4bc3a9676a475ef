//! GRPO rewards: named functions of (completion, gold answer, offered
//! options), looked up by name from the recipe's `reward_weights` table.
//!
//! Each reward is one field of the task contract's score of the completion
//! ([`Scorer::score`], the score the eval metrics aggregate), so a completion
//! the reward pays for is one the evaluation counts:
//!
//! - `format`: the completion is in the prompt's response format
//!   ([`stages_task::completion`]: one non-empty `<think>` block, whitespace,
//!   one non-empty `<answer>` block, nothing else but whitespace around;
//!   under the no-think prompt the answer block alone). The same rule gives
//!   the eval's `format_ok` and decides what the judge judges.
//! - `validity`: the extracted answer is one of the offered option letters.
//! - `correctness`: the extracted answer is the gold letter.
//!
//! Extraction reads the first answer block with the answer regex (default
//! `<answer>\s*(\w+)\s*</answer>`).

use std::collections::BTreeMap;

use stages_task::answer::{AnswerMatch, AnswerRegexError, Scorer};
use stages_task::completion::ResponseFormat;

/// Reward names in the order they are computed and logged.
pub const REWARD_NAMES: [&str; 3] = ["format", "validity", "correctness"];

/// The paper's weights: R = 1·format + 1·validity + 2·correctness.
pub fn paper_weights() -> BTreeMap<String, f64> {
    [("format", 1.0), ("validity", 1.0), ("correctness", 2.0)].into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("unknown reward `{name}` (known: {})", REWARD_NAMES.join(", "))]
    Unknown { name: String },
    #[error("reward `{name}`: weight must be a finite number, got {weight}")]
    BadWeight { name: String, weight: f64 },
    #[error("every reward weight is 0: nothing to learn from")]
    AllZero,
    #[error(transparent)]
    Regex(#[from] AnswerRegexError),
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

struct Format(Scorer);
impl RewardFn for Format {
    fn name(&self) -> &'static str {
        "format"
    }
    fn score(&self, s: &Sample) -> f64 {
        f64::from(u8::from(self.0.score(s.completion, s.gold, s.letters).format_ok))
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

/// The reward function called `name`; `format` is the prompt's response format.
pub fn reward_by_name(
    name: &str,
    format: ResponseFormat,
    answer_regex: &str,
) -> Result<Box<dyn RewardFn>, RewardError> {
    let scorer = || Scorer::new(answer_regex, format, AnswerMatch::Choice);
    Ok(match name {
        "format" => Box::new(Format(scorer()?)),
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
    pub fn new(
        weights: &BTreeMap<String, f64>,
        format: ResponseFormat,
        answer_regex: &str,
    ) -> Result<Self, RewardError> {
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
            .map(|(n, w)| Ok((reward_by_name(n, format, answer_regex)?, w)))
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
    use stages_task::answer::DEFAULT_ANSWER_REGEX;

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
        // Whitespace around the completion (re.fullmatch: format 0).
        (" <think>x</think><answer>B</answer>\n", 1, 0, 1, 1),
        // Two answer tags (re.fullmatch's `.*?` spans `B</answer><answer>A`:
        // format 1): not the format; the first block is the answer.
        ("<think>x</think><answer>B</answer><answer>A</answer>", 0, 0, 1, 1),
        ("<think>x</think><answer>A</answer><answer>B</answer>", 0, 0, 1, 0),
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
        // Empty blocks (re.fullmatch: format 1).
        ("<think></think><answer></answer>", 0, 0, 0, 0),
        ("<think></think><answer>B</answer>", 0, 0, 1, 1),
    ];

    #[test]
    fn tricky_completions_score_as_the_table_says() {
        let weights = paper_weights();
        let think = Rewards::new(&weights, ResponseFormat::Think, DEFAULT_ANSWER_REGEX).unwrap();
        let no_think = Rewards::new(&weights, ResponseFormat::NoThink, DEFAULT_ANSWER_REGEX).unwrap();
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
    fn weights_select_validate_and_zero_out_rewards() {
        let regex = DEFAULT_ANSWER_REGEX;
        let mut w = paper_weights();
        w.insert("format".into(), 0.0);
        let r = Rewards::new(&w, ResponseFormat::Think, regex).unwrap();
        let letters = letters();
        let s = Sample { completion: "<think>x</think><answer>B</answer>", gold: "B", letters: &letters };
        assert_eq!(r.score(&s), vec![1.0, 1.0, 1.0], "a zero-weight reward is still scored (and logged)");
        assert_eq!(r.total(&r.score(&s)), 3.0, "but adds nothing");
        let only: BTreeMap<String, f64> = [("correctness".to_string(), 1.0)].into();
        assert_eq!(Rewards::new(&only, ResponseFormat::Think, regex).unwrap().names(), ["correctness"]);

        w.insert("lenght".into(), 1.0);
        let e = Rewards::new(&w, ResponseFormat::Think, regex).err().unwrap().to_string();
        assert!(e.contains("unknown reward `lenght`") && e.contains("format, validity, correctness"), "{e}");
        let zero: BTreeMap<String, f64> = [("format".to_string(), 0.0)].into();
        assert!(matches!(Rewards::new(&zero, ResponseFormat::Think, regex), Err(RewardError::AllZero)));
        let nan: BTreeMap<String, f64> = [("format".to_string(), f64::NAN)].into();
        assert!(matches!(Rewards::new(&nan, ResponseFormat::Think, regex), Err(RewardError::BadWeight { .. })));
        assert!(matches!(Rewards::new(&only, ResponseFormat::Think, "no group"), Err(RewardError::Regex(_))));
    }
}
