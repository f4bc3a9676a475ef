//! Answer extraction and the score of one completion: which answer a
//! completion gives (its first answer block, see [`crate::completion`]),
//! whether it is one of the offered options, whether it is the gold one, and
//! whether the completion is in the format the prompt asked for. The eval
//! metrics aggregate these scores; the GRPO rewards are these scores.

use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    /// (empty, several words, punctuation...).
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
    /// Free form, ChartQA style: numbers within 5% relative error match,
    /// anything else falls back to `exact`.
    Relaxed,
}

/// The score of one completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemScore {
    pub extracted: Option<String>,
    pub failure: Option<ExtractFailure>,
    pub format_ok: bool,
    pub valid: bool,
    pub correct: bool,
    pub outcome: Outcome,
}

/// Compiled extraction rule, the response format asked for, and the matching.
#[derive(Debug, Clone)]
pub struct Scorer {
    answer: Regex,
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
        Ok(Self { answer, format, matching })
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
        let caps = self.answer.captures(block.tagged).ok_or(ExtractFailure::Unmatched)?;
        caps.get(1).map(|g| g.as_str().trim().to_string()).ok_or(ExtractFailure::Unmatched)
    }

    /// Score one completion against its gold answer and the offered option
    /// letters (ignored for free-form matching).
    pub fn score(&self, completion: &str, gold: &str, options: &[String]) -> ItemScore {
        let parsed = Completion::parse(completion);
        let format_ok = parsed.is_well_formed(self.format);
        let (extracted, failure) = match self.extract_parsed(&parsed) {
            Ok(a) => (Some(a), None),
            Err(f) => (None, Some(f)),
        };
        let (valid, correct) = match (&extracted, self.matching) {
            (None, _) => (false, false),
            (Some(a), AnswerMatch::Choice) => {
                let valid = options.iter().any(|o| o == a);
                (valid, valid && a == gold.trim())
            }
            (Some(a), AnswerMatch::Exact) => (!a.is_empty(), exact_match(a, gold)),
            (Some(a), AnswerMatch::Relaxed) => (!a.is_empty(), relaxed_match(a, gold)),
        };
        let outcome = match (&extracted, valid, correct) {
            (None, _, _) => Outcome::Unparseable,
            (_, _, true) => Outcome::Correct,
            (_, false, _) => Outcome::Invalid,
            _ => Outcome::Wrong,
        };
        ItemScore { extracted, failure, format_ok, valid, correct, outcome }
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
    fn option_letters_and_names_come_from_option_strings() {
        let o = [option_text('A', "airway"), "B. emphysema".into(), "C".into()];
        assert_eq!(option_letters(&o), vec!["A", "B", "C"]);
        assert_eq!(option_names(&o), vec!["airway", "emphysema", "C"]);
    }
}
