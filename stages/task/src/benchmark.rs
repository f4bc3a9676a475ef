//! The metrics of the paper's general-VQA check (Table 2), ported from the
//! standard evaluation harness, lmms-eval, so our numbers are comparable
//! with the ones it (and the paper) reports:
//!
//! - ChartQA *relaxed accuracy* ([`chartqa_relaxed_correctness`]):
//!   `lmms_eval/tasks/chartqa/utils.py`, `relaxed_correctness` (taken there
//!   from Qwen-VL's `eval_mm/evaluate_vqa.py`; ChartQA paper, end of §5.1).
//! - TextVQA *VQA accuracy* over the 10 human answers ([`vqa_accuracy`]):
//!   `lmms_eval/tasks/textvqa/utils.py`, `textvqa_process_results`, with the
//!   answer normalisation [`EvalAiNormalizer`] of
//!   `lmms_eval/tasks/_task_utils/vqa_eval_metric.py` (`EvalAIAnswerProcessor`,
//!   itself copied from mmf and the official VQA evaluation `vqaEval.py`).
//!
//! The ports keep the quirks of the originals on purpose (a "fix" would make
//! our numbers incomparable); each is named where it is reproduced.

use std::sync::LazyLock;

use regex::Regex;

/// Python's `float(text)` for the strings a model answers with: surrounding
/// whitespace is ignored, `_` is allowed between digits, and `inf`/`nan`
/// parse (Rust's `f64::from_str` accepts the same spellings otherwise).
fn python_float(text: &str) -> Option<f64> {
    let t = text.trim();
    let t = if t.contains('_') {
        // `1_000` is 1000 in Python; `_1`, `1_`, `1__0` and `1._5` are errors.
        let b = t.as_bytes();
        let ok = b.iter().enumerate().all(|(i, &c)| {
            c != b'_' || (i > 0 && i + 1 < b.len() && b[i - 1].is_ascii_digit() && b[i + 1].is_ascii_digit())
        });
        if !ok {
            return None;
        }
        t.replace('_', "")
    } else {
        t.to_string()
    };
    t.parse::<f64>().ok()
}

/// `_to_float` of `relaxed_correctness`: a trailing `%` (all of them, as
/// `rstrip("%")` does) divides by 100.
fn chartqa_float(text: &str) -> Option<f64> {
    if text.ends_with('%') { python_float(text.trim_end_matches('%')).map(|v| v / 100.0) } else { python_float(text) }
}

/// ChartQA's relaxed correctness (lmms-eval `relaxed_correctness`, max
/// relative change 5 %): when both parse as numbers and the target is not
/// zero, correct iff `|prediction - target| / |target| <= 0.05`; otherwise
/// case-insensitive string equality. No other normalisation: `1,000` is not
/// a number (Python's `float` rejects it) and a target of `0` falls back to
/// string equality (`if ... and target_float` is false for 0.0).
pub fn chartqa_relaxed_correctness(prediction: &str, target: &str) -> bool {
    const MAX_RELATIVE_CHANGE: f64 = 0.05;
    match (chartqa_float(prediction), chartqa_float(target)) {
        // NaN is truthy in Python; the comparison with NaN is then false.
        (Some(p), Some(t)) if t != 0.0 => (p - t).abs() / t.abs() <= MAX_RELATIVE_CHANGE,
        _ => prediction.to_lowercase() == target.to_lowercase(),
    }
}

/// The answer normalisation of the VQA / TextVQA evaluation
/// (`EvalAIAnswerProcessor.__call__`): lower case, `,` and `?` dropped,
/// `'s` split off, punctuation removed or turned into spaces, periods not
/// followed by a digit removed, number words to digits, articles dropped,
/// contractions restored.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvalAiNormalizer;

/// `CONTRACTIONS`, verbatim. Keys with capitals (`Id've`, `Im`, `Ive`) can
/// never match (words are lower-cased first), and `somebody'd` maps to
/// `somebodyd`: both quirks of the original table, kept.
const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// `NUMBER_MAP`.
const NUMBER_MAP: &[(&str, &str)] = &[
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

/// `ARTICLES`.
const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// `PUNCTUATIONS`, in their order (the order matters: each is replaced in turn).
const PUNCTUATIONS: [&str; 21] =
    [";", "/", "[", "]", "\"", "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"];

/// `PERIOD_STRIP.sub("", text, re.UNICODE)` passes `re.UNICODE` (32) as the
/// positional `count`: at most 32 periods are removed.
const PERIOD_STRIP_COUNT: usize = 32;

/// `COMMA_STRIP = (?<=\d)(\,)+(?=\d)`, used only with `re.search`: a match
/// exists iff `\d,+\d` occurs (the `regex` crate has no look-around).
static COMMA_STRIP: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"\d,+\d").ok());
/// Python's `\d` on `str` is any Unicode decimal digit (category Nd), as is
/// the `regex` crate's.
static DIGIT: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"\A\d").ok());

fn starts_with_digit(s: &str) -> bool {
    match DIGIT.as_ref() {
        Some(re) => re.is_match(s),
        None => s.starts_with(|c: char| c.is_ascii_digit()),
    }
}

/// Python's `str.split()`: runs of Unicode whitespace.
fn split_words(s: &str) -> impl Iterator<Item = &str> {
    s.split(char::is_whitespace).filter(|w| !w.is_empty())
}

impl EvalAiNormalizer {
    /// `word_tokenize`: lower case, drop `,` and `?`, `'s` -> ` 's`, strip.
    fn word_tokenize(word: &str) -> String {
        word.to_lowercase().replace([',', '?'], "").replace("'s", " 's").trim().to_string()
    }

    /// `process_punctuation`. The conditions test the text as it came in
    /// (not as already rewritten); the comma test can never fire after
    /// `word_tokenize` removed every comma, but is kept as written.
    fn process_punctuation(in_text: &str) -> String {
        let comma_strip = COMMA_STRIP.as_ref().is_some_and(|re| re.is_match(in_text));
        let mut out = in_text.to_string();
        for p in PUNCTUATIONS {
            let spaced = in_text.contains(&format!("{p} ")) || in_text.contains(&format!(" {p}"));
            out = if spaced || comma_strip { out.replace(p, "") } else { out.replace(p, " ") };
        }
        Self::period_strip(&out)
    }

    /// `PERIOD_STRIP = (?!<=\d)(\.)(?!\d)`: the first group is a negative
    /// *lookahead* for the literal `<=` and a digit (a typo for a lookbehind),
    /// which a `.` never starts with; so every `.` not followed by a digit
    /// goes, up to [`PERIOD_STRIP_COUNT`] of them.
    fn period_strip(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut removed = 0;
        for (i, c) in text.char_indices() {
            if c == '.' && removed < PERIOD_STRIP_COUNT && !starts_with_digit(&text[i + 1..]) {
                removed += 1;
                continue;
            }
            out.push(c);
        }
        out
    }

    /// `process_digit_article`: number words to digits, articles dropped,
    /// then contractions restored, words joined by one space.
    fn process_digit_article(in_text: &str) -> String {
        let lower = in_text.to_lowercase();
        let words: Vec<&str> = split_words(&lower)
            .map(|w| NUMBER_MAP.iter().find(|(k, _)| *k == w).map_or(w, |(_, v)| v))
            .filter(|w| !ARTICLES.contains(w))
            .map(|w| CONTRACTIONS.iter().find(|(k, _)| *k == w).map_or(w, |(_, v)| v))
            .collect();
        words.join(" ")
    }

    /// Normalise one answer (`__call__`).
    pub fn normalize(&self, answer: &str) -> String {
        let item = Self::word_tokenize(answer);
        let item = item.replace(['\n', '\t'], " ").trim().to_string();
        let item = Self::process_punctuation(&item);
        Self::process_digit_article(&item)
    }
}

/// TextVQA's VQA accuracy of one prediction against the human answers
/// (`textvqa_process_results`): prediction and answers normalised by
/// [`EvalAiNormalizer`]; for each answer `i`, `min(1, #(other answers equal
/// to the prediction) / 3)`; the mean over `i`. With the usual 10 answers a
/// prediction matching 0, 1, 2, 3, >= 4 of them scores 0, 0.3, 0.6, 0.9, 1.
/// No answers scores 0 (the harness reports 0 for the unlabelled test split).
pub fn vqa_accuracy(prediction: &str, answers: &[String]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let n = EvalAiNormalizer;
    let pred = n.normalize(prediction);
    let gold: Vec<String> = answers.iter().map(|a| n.normalize(a)).collect();
    let total: f64 = (0..gold.len())
        .map(|i| {
            let matching = gold.iter().enumerate().filter(|(j, a)| *j != i && **a == pred).count();
            (matching as f64 / 3.0).min(1.0)
        })
        .sum();
    total / gold.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        EvalAiNormalizer.normalize(s)
    }

    #[test]
    fn normalisation_follows_the_official_rules() {
        // Hand-derived from the rules, step by step (word_tokenize ->
        // punctuation -> periods -> digits/articles -> contractions).
        let cases: &[(&str, &str)] = &[
            ("Two", "2"),                     // number word
            ("none", "0"),                    // `none` is a number word too
            ("The Cat.", "cat"),              // lower case, final period, article
            ("an apple", "apple"),            // article
            ("dont", "don't"),                // contraction restored
            ("Im", "im"),                     // capital key `Im` never matches after lower-casing
            ("somebody'd", "somebodyd"),      // the table's reversed entry
            ("coca-cola", "coca cola"),       // `-` between words becomes a space ...
            ("coca - cola", "coca cola"),     // ... and is removed when spaced (double space collapses)
            ("hello (world)", "hello world"), // `(` spaced: removed; `)` not spaced: space
            ("(hello)", "hello"),
            ("a/b", "b"),      // `/` -> space, then `a` is an article
            ("1,000", "1000"), // commas go in word_tokenize
            ("3.5", "3.5"),    // a period before a digit stays
            ("3.5.", "3.5"),   // the final one goes
            ("e.g.", "eg"),    // periods not followed by a digit go
            ("it's", "it 's"), // `'s` is split off, not a contraction
            ("What?", "what"),
            ("yes!", "yes"),
            ("  New\tYork\n", "new york"),
            ("100%", "100%"), // `%` is not in the list
            ("\"stop\"", "stop"),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw), *want, "{raw:?}");
        }
    }

    #[test]
    fn period_strip_removes_at_most_32_periods() {
        // `re.UNICODE` passed as `count`: 40 periods in, 8 out.
        assert_eq!(norm(&".".repeat(40)), ".".repeat(8));
        assert_eq!(norm(&format!("a{}", ".".repeat(32))), "");
        // Digits count in any script (Python's `\d`): `٣` is ARABIC-INDIC THREE.
        assert_eq!(norm("1.٣"), "1.٣");
    }

    #[test]
    fn vqa_accuracy_is_the_leave_one_out_mean() {
        let answers = |matching: usize| -> Vec<String> {
            (0..10).map(|i| if i < matching { "Coca Cola".to_string() } else { format!("other{i}") }).collect()
        };
        // 10 humans, m of them say the prediction: for the m leave-one-out
        // subsets without a matching human min(1, (m-1)/3), for the 10-m
        // others min(1, m/3); mean over the 10.
        for (m, want) in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)] {
            let got = vqa_accuracy("coca-cola.", &answers(m));
            assert!((got - want).abs() < 1e-12, "{m} matching: {got} != {want}");
        }
        assert_eq!(vqa_accuracy("x", &[]), 0.0);
        // Normalisation on both sides: "two" is "2", "the sign" is "sign".
        let gold: Vec<String> = ["2", "two", "2", "the sign", "sign"].map(String::from).to_vec();
        // 5 answers, 3 match: 3 x (2/3) + 2 x 1, over 5.
        assert!((vqa_accuracy("Two", &gold) - 0.8).abs() < 1e-12);
        // 5 answers, 2 match: 2 x (1/3) + 3 x (2/3), over 5.
        assert!((vqa_accuracy("Sign.", &gold) - (2.0 / 3.0 + 2.0) / 5.0).abs() < 1e-12);
    }

    #[test]
    fn chartqa_relaxed_correctness_as_the_harness_computes_it() {
        assert!(chartqa_relaxed_correctness("104", "100"));
        assert!(chartqa_relaxed_correctness("95", "100"));
        assert!(!chartqa_relaxed_correctness("105.1", "100"));
        assert!(chartqa_relaxed_correctness("-104", "-100"), "relative to |target|");
        assert!(chartqa_relaxed_correctness("45%", "0.46"), "percent divides by 100");
        assert!(chartqa_relaxed_correctness("0.46", "46%%"), "rstrip removes every trailing %");
        assert!(!chartqa_relaxed_correctness("0.46", "46"), "0.46 is not 46");
        assert!(chartqa_relaxed_correctness(" 12 ", "12"), "float() ignores surrounding spaces");
        assert!(chartqa_relaxed_correctness("1_000", "1000"), "float() reads digit underscores");
        assert!(!chartqa_relaxed_correctness("1,000", "1000"), "float() rejects commas: string compare");
        assert!(chartqa_relaxed_correctness("0", "0") && !chartqa_relaxed_correctness("0.0", "0"), "target 0: strings");
        assert!(chartqa_relaxed_correctness("Yes", "yes") && !chartqa_relaxed_correctness("yes.", "yes"));
        assert!(!chartqa_relaxed_correctness("nan", "nan"), "NaN never within 5%");
        // Both parse (case-insensitively) as infinity: inf - inf is NaN, so
        // not within 5%, and there is no fall-back to the string compare.
        assert!(!chartqa_relaxed_correctness("inf", "INF"));
    }
}
