//! Answer extraction and the score of one completion: which answer a
//! completion gives (its first answer block, see [`crate::completion`]),
//! whether it is one of the offered options, whether it is the gold one (and
//! with which credit, for benchmarks with partial credit), and whether the
//! completion is in the format the prompt asked for. The eval metrics
//! aggregate these scores; the GRPO rewards are these scores.
//!
//! Extraction: multiple-choice answers are read with a regex in the answer
//! block ([`DEFAULT_ANSWER_REGEX`], the closest public code's); a free-form
//! answer is the whole content of the answer block, trimmed
//! ([`Scorer::block`]): `12.5` or `New York` are answers, not failures.

use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::benchmark::{chartqa_relaxed_correctness, vqa_accuracy};
use crate::completion::{Completion, ResponseFormat, Tag};

/// Answer extraction of the closest public code (domain notes §4), searched
/// in the first answer block.
pub const DEFAULT_ANSWER_REGEX: &str = r"<answer>\s*(\w+)\s*</answer>";

#[derive(Debug, thiserror::Error)]
pub enum AnswerRegexError {
    #[error("regex `answer_regex` ({pattern:?}) is invalid: {message}")]
    Invalid { pattern: String, message: String },
    #[error("regex `answer_regex` ({pattern:?}) has no capture group: expected one group around the answer")]
    NoGroup { pattern: String },
}

/// Why no answer could be read from a completion (every case counts as wrong).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExtractFailure {
    /// Nothing (or only whitespace) was generated.
    Empty,
    /// No `<answer>` tag at all.
    NoAnswerTag,
    /// `<answer>` opened but never closed (typically truncated at max_new_tokens).
    Unclosed,
    /// The answer block is there but its content does not match the regex
    /// (empty, several words, punctuation...), or is empty when the whole
    /// block is the answer.
    Unmatched,
}

/// What a completion led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Correct,
    /// A valid option, but not the gold one.
    Wrong,
    /// An answer was extracted but it is not one of the offered options.
    Invalid,
    /// No answer could be extracted.
    Unparseable,
}

/// How a free-form answer is compared to the gold answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum AnswerMatch {
    /// Multiple choice: the extracted text must equal the gold letter and be
    /// one of the item's option letters to be valid.
    #[default]
    Choice,
    /// Free form: case-, space- and trailing-punctuation-insensitive equality.
    Exact,
    /// Free form, lenient: numbers within 5% relative error match (after
    /// dropping `,` and reading `%`), anything else falls back to `exact`.
    Relaxed,
    /// ChartQA's relaxed accuracy exactly as lmms-eval computes it
    /// ([`crate::benchmark::chartqa_relaxed_correctness`]) against each gold
    /// answer (`answers`, else `answer`); correct if any matches.
    Chartqa,
    /// TextVQA's (and VQAv2's) VQA accuracy over the human answers in
    /// `answers` ([`crate::benchmark::vqa_accuracy`]): partial credit in
    /// [0, 1]; `correct` means full credit.
    VqaAccuracy,
}

impl AnswerMatch {
    /// Free-form matching: the answer is the whole answer block.
    pub fn is_free_form(self) -> bool {
        self != AnswerMatch::Choice
    }

    /// Whether the gold answers must come as a list (`answers`).
    pub fn needs_answer_list(self) -> bool {
        self == AnswerMatch::VqaAccuracy
    }
}

/// The score of one completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemScore {
    pub extracted: Option<String>,
    pub failure: Option<ExtractFailure>,
    pub format_ok: bool,
    pub valid: bool,
    /// Full credit (for `vqa_accuracy`: credit 1).
    pub correct: bool,
    /// The benchmark's credit in [0, 1]: 1 or 0 for every matching but
    /// `vqa_accuracy`, whose partial credit (0.3, 0.6, 0.9) it carries.
    pub credit: f64,
    pub outcome: Outcome,
}

/// How the answer is read from the first answer block.
#[derive(Debug, Clone)]
enum Extraction {
    /// The first group of a regex searched in the block (tags included).
    Regex(Regex),
    /// The block's content, trimmed.
    Block,
}

/// Compiled extraction rule, the response format asked for, and the matching.
#[derive(Debug, Clone)]
pub struct Scorer {
    answer: Extraction,
    format: ResponseFormat,
    matching: AnswerMatch,
}

impl Scorer {
    /// `answer_regex` is searched in the first answer block (tags included,
    /// so `<answer>\s*(\w+)\s*</answer>` must match the whole block); its
    /// first capture group is the answer.
    pub fn new(answer_regex: &str, format: ResponseFormat, matching: AnswerMatch) -> Result<Self, AnswerRegexError> {
        let answer = Regex::new(answer_regex)
            .map_err(|e| AnswerRegexError::Invalid { pattern: answer_regex.into(), message: e.to_string() })?;
        if answer.captures_len() < 2 {
            return Err(AnswerRegexError::NoGroup { pattern: answer_regex.into() });
        }
        Ok(Self { answer: Extraction::Regex(answer), format, matching })
    }

    /// The answer is the whole content of the first answer block, trimmed
    /// (free-form answers: numbers with decimals, several words).
    pub fn block(format: ResponseFormat, matching: AnswerMatch) -> Self {
        Self { answer: Extraction::Block, format, matching }
    }

    pub fn format(&self) -> ResponseFormat {
        self.format
    }

    /// The answer of a completion, trimmed; or why there is none.
    pub fn extract(&self, completion: &str) -> Result<String, ExtractFailure> {
        self.extract_parsed(&Completion::parse(completion))
    }

    fn extract_parsed(&self, c: &Completion) -> Result<String, ExtractFailure> {
        if c.text().trim().is_empty() {
            return Err(ExtractFailure::Empty);
        }
        let Some(block) = c.first_answer_block() else {
            return Err(if !c.has_tag(Tag::AnswerOpen) {
                ExtractFailure::NoAnswerTag
            } else {
                ExtractFailure::Unclosed
            });
        };
        match &self.answer {
            Extraction::Regex(re) => {
                let caps = re.captures(block.tagged).ok_or(ExtractFailure::Unmatched)?;
                caps.get(1).map(|g| g.as_str().trim().to_string()).ok_or(ExtractFailure::Unmatched)
            }
            Extraction::Block => {
                let a = block.content.trim();
                if a.is_empty() { Err(ExtractFailure::Unmatched) } else { Ok(a.to_string()) }
            }
        }
    }

    /// Score one completion against its gold answer and the offered option
    /// letters (ignored for free-form matching).
    pub fn score(&self, completion: &str, gold: &str, options: &[String]) -> ItemScore {
        self.score_answers(completion, gold, &[], options)
    }

    /// [`Self::score`] with every accepted answer of the item (`answers`;
    /// free-form matching compares against them, or against `gold` when
    /// there are none).
    pub fn score_answers(&self, completion: &str, gold: &str, answers: &[String], options: &[String]) -> ItemScore {
        let parsed = Completion::parse(completion);
        let format_ok = parsed.is_well_formed(self.format);
        let (extracted, failure) = match self.extract_parsed(&parsed) {
            Ok(a) => (Some(a), None),
            Err(f) => (None, Some(f)),
        };
        let single = [gold.to_string()];
        let golds: &[String] = if answers.is_empty() { &single } else { answers };
        let binary = |hit: bool| if hit { 1.0 } else { 0.0 };
        let (valid, credit) = match (&extracted, self.matching) {
            (None, _) => (false, 0.0),
            (Some(a), AnswerMatch::Choice) => {
                let valid = options.iter().any(|o| o == a);
                (valid, binary(valid && a == gold.trim()))
            }
            (Some(a), AnswerMatch::Exact) => (!a.is_empty(), binary(golds.iter().any(|g| exact_match(a, g)))),
            (Some(a), AnswerMatch::Relaxed) => (!a.is_empty(), binary(golds.iter().any(|g| relaxed_match(a, g)))),
            (Some(a), AnswerMatch::Chartqa) => {
                (!a.is_empty(), binary(golds.iter().any(|g| chartqa_relaxed_correctness(a, g))))
            }
            (Some(a), AnswerMatch::VqaAccuracy) => (!a.is_empty(), vqa_accuracy(a, golds)),
        };
        let correct = credit >= 1.0;
        let outcome = match (&extracted, valid, correct) {
            (None, _, _) => Outcome::Unparseable,
            (_, _, true) => Outcome::Correct,
            (_, false, _) => Outcome::Invalid,
            _ => Outcome::Wrong,
        };
        ItemScore { extracted, failure, format_ok, valid, correct, credit, outcome }
    }
}

/// An option as the `vqa` stage writes it: `"A. emphysema"`.
pub fn option_text(letter: char, name: &str) -> String {
    format!("{letter}. {name}")
}

/// Option letters of option strings such as `"A. emphysema"` (the text
/// before the first `.`; the whole string when there is none).
pub fn option_letters(options: &[String]) -> Vec<String> {
    options.iter().map(|o| o.split_once('.').map_or(o.as_str(), |(l, _)| l).trim().to_string()).collect()
}

/// The class names of option strings, in option order (`"A. emphysema"` ->
/// `emphysema`; the whole string when there is no `.`).
pub fn option_names(options: &[String]) -> Vec<String> {
    options.iter().map(|o| o.split_once('.').map_or(o.as_str(), |(_, n)| n).trim().to_string()).collect()
}

fn normalise(s: &str) -> String {
    let lower = s.trim().to_lowercase();
    let stripped = lower.trim_end_matches(['.', '!', '?', ',', ';', ':']);
    stripped.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Case-, whitespace- and trailing-punctuation-insensitive equality.
pub fn exact_match(prediction: &str, gold: &str) -> bool {
    normalise(prediction) == normalise(gold)
}

fn parse_number(s: &str) -> Option<f64> {
    let t = normalise(s).replace(',', "");
    let (t, scale) = match t.strip_suffix('%') {
        Some(p) => (p.trim().to_string(), 0.01),
        None => (t, 1.0),
    };
    t.parse::<f64>().ok().filter(|v| v.is_finite()).map(|v| v * scale)
}

/// ChartQA's relaxed accuracy: numbers within 5% of the gold value match
/// (exact when the gold is 0); non-numbers use [`exact_match`].
pub fn relaxed_match(prediction: &str, gold: &str) -> bool {
    match (parse_number(prediction), parse_number(gold)) {
        (Some(p), Some(0.0)) => p == 0.0,
        (Some(p), Some(g)) => ((p - g) / g).abs() <= 0.05,
        _ => exact_match(prediction, gold),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice() -> Scorer {
        Scorer::new(DEFAULT_ANSWER_REGEX, ResponseFormat::Think, AnswerMatch::Choice).unwrap()
    }
    fn letters() -> Vec<String> {
        ["A", "B", "C"].map(String::from).to_vec()
    }

    #[test]
    fn extraction_failure_modes_are_named() {
        let s = choice();
        let cases: &[(&str, Result<&str, ExtractFailure>)] = &[
            ("<think>x</think><answer>B</answer>", Ok("B")),
            ("<answer>\n  C \n</answer>", Ok("C")),
            ("<answer>A</answer> then <answer>B</answer>", Ok("A")),
            ("", Err(ExtractFailure::Empty)),
            ("  \n ", Err(ExtractFailure::Empty)),
            ("The answer is B.", Err(ExtractFailure::NoAnswerTag)),
            ("<think>long reasoning</think><answer>B", Err(ExtractFailure::Unclosed)),
            ("</answer> B <answer>", Err(ExtractFailure::Unclosed)),
            ("<answer></answer>", Err(ExtractFailure::Unmatched)),
            ("<answer>A or B</answer>", Err(ExtractFailure::Unmatched)),
            ("<answer>(B)</answer>", Err(ExtractFailure::Unmatched)),
            // The first block is the answer even when a later one would match.
            ("<answer>A or B</answer><answer>C</answer>", Err(ExtractFailure::Unmatched)),
        ];
        for (text, want) in cases {
            let score = s.score(text, "B", &letters());
            assert_eq!(score.extracted.as_deref().ok_or(score.failure), want.map_err(Some), "{text:?}");
        }
    }

    #[test]
    fn scoring_separates_correct_wrong_invalid_unparseable_and_format() {
        let s = choice();
        let opts = letters();
        let ok = s.score("<think>r</think>\n<answer>B</answer>", "B", &opts);
        assert_eq!((ok.format_ok, ok.valid, ok.correct, ok.outcome), (true, true, true, Outcome::Correct));
        let wrong = s.score("<answer>A</answer>", "B", &opts);
        assert_eq!((wrong.format_ok, wrong.valid, wrong.correct, wrong.outcome), (false, true, false, Outcome::Wrong));
        let invalid = s.score("<think>r</think><answer>Z</answer>", "B", &opts);
        assert_eq!((invalid.valid, invalid.outcome), (false, Outcome::Invalid));
        // Lower case is not the letter: invalid, never silently correct.
        assert_eq!(s.score("<answer>b</answer>", "B", &opts).outcome, Outcome::Invalid);
        let none = s.score("B", "B", &opts);
        assert_eq!(
            (none.correct, none.outcome, none.failure),
            (false, Outcome::Unparseable, Some(ExtractFailure::NoAnswerTag))
        );
        // Text outside the tags breaks the format but not the extraction.
        let chatty = s.score("Sure! <think>r</think><answer>B</answer>", "B", &opts);
        assert_eq!((chatty.format_ok, chatty.correct), (false, true));
        // The scorer's format is the response format it was built for.
        let no_think = Scorer::new(DEFAULT_ANSWER_REGEX, ResponseFormat::NoThink, AnswerMatch::Choice).unwrap();
        assert!(no_think.score("<answer>A</answer>", "B", &opts).format_ok);
    }

    #[test]
    fn regex_errors_name_the_field() {
        let e = Scorer::new("<answer>(", ResponseFormat::Think, AnswerMatch::Choice).unwrap_err().to_string();
        assert!(e.contains("answer_regex"), "{e}");
        let e =
            Scorer::new("<answer>\\w+</answer>", ResponseFormat::Think, AnswerMatch::Choice).unwrap_err().to_string();
        assert!(e.contains("no capture group"), "{e}");
    }

    #[test]
    fn free_form_exact_and_relaxed_matching() {
        assert!(exact_match(" Paris. ", "paris"));
        assert!(!exact_match("Paris France", "paris"));
        assert!(relaxed_match("104", "100"));
        assert!(relaxed_match("1,000", "1020"));
        assert!(relaxed_match("45%", "0.46"));
        assert!(!relaxed_match("106", "100"));
        assert!(relaxed_match("0", "0") && !relaxed_match("0.01", "0"));
        assert!(relaxed_match("Yes", "yes"));
        let s = Scorer::new(r"<answer>\s*(.*?)\s*</answer>", ResponseFormat::NoThink, AnswerMatch::Relaxed).unwrap();
        let r = s.score("<answer>12.1</answer>", "12", &[]);
        assert_eq!((r.valid, r.correct, r.format_ok), (true, true, true));
    }

    #[test]
    fn free_form_answers_are_the_whole_block() {
        let s = Scorer::block(ResponseFormat::NoThink, AnswerMatch::Relaxed);
        // What the default `(\w+)` regex could not read: decimals, several words.
        for (text, gold) in [("<answer> 12.5 </answer>", "12.5"), ("<answer>\nNew York\n</answer>", "new york")] {
            let r = s.score(text, gold, &[]);
            assert_eq!((r.extracted.is_some(), r.correct, r.credit), (true, true, 1.0), "{text:?}");
        }
        let r = s.score("<answer>  </answer>", "x", &[]);
        assert_eq!((r.failure, r.outcome), (Some(ExtractFailure::Unmatched), Outcome::Unparseable));
        let r = s.score("<answer>7</answer> <answer>8</answer>", "7", &[]);
        assert_eq!((r.extracted.as_deref(), r.format_ok), (Some("7"), false), "first block, format broken");
        let regex = Scorer::new(DEFAULT_ANSWER_REGEX, ResponseFormat::NoThink, AnswerMatch::Relaxed).unwrap();
        assert_eq!(regex.score("<answer>12.5</answer>", "12.5", &[]).failure, Some(ExtractFailure::Unmatched));
    }

    #[test]
    fn benchmark_matching_uses_every_gold_answer() {
        let chart = Scorer::block(ResponseFormat::NoThink, AnswerMatch::Chartqa);
        let r = chart.score_answers("<answer>1,000</answer>", "1000", &[], &[]);
        assert!(!r.correct, "ChartQA does not read commas");
        let labels: Vec<String> = ["Yes".into(), "1000".into()].to_vec();
        assert!(chart.score_answers("<answer>1010</answer>", "Yes", &labels, &[]).correct, "any label");
        let vqa = Scorer::block(ResponseFormat::NoThink, AnswerMatch::VqaAccuracy);
        let humans: Vec<String> = (0..10).map(|i| if i < 2 { "stop".into() } else { format!("go{i}") }).collect();
        let r = vqa.score_answers("<answer>Stop.</answer>", "stop", &humans, &[]);
        assert!((r.credit - 0.6).abs() < 1e-12, "{r:?}");
        assert_eq!((r.correct, r.valid, r.outcome), (false, true, Outcome::Wrong), "partial credit is not full");
        let all: Vec<String> = vec!["stop".into(); 10];
        let r = vqa.score_answers("<answer>stop</answer>", "stop", &all, &[]);
        assert_eq!((r.correct, r.credit, r.outcome), (true, 1.0, Outcome::Correct));
        let exact = Scorer::block(ResponseFormat::NoThink, AnswerMatch::Exact);
        assert!(exact.score_answers("<answer>Go3</answer>", "stop", &humans, &[]).correct, "any accepted answer");
    }

    #[test]
    fn option_letters_and_names_come_from_option_strings() {
        let o = [option_text('A', "airway"), "B. emphysema".into(), "C".into()];
        assert_eq!(option_letters(&o), vec!["A", "B", "C"]);
        assert_eq!(option_names(&o), vec!["airway", "emphysema", "C"]);
    }
}
