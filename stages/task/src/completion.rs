//! The format of a completion: ONE rule, used by the eval metric
//! (`format_ok`, the report's "Format" column), the GRPO `format` reward and
//! the judge (which judges only completions in the format and reads their
//! reasoning here).
//!
//! # The rule
//!
//! A completion is cut at the four tags `<think>`, `</think>`, `<answer>`,
//! `</answer>` (exactly these ASCII strings: `<Think>` or `<answer >` are
//! plain text). Under [`ResponseFormat::Think`] it is well formed iff it is
//!
//! ```text
//! ws* <think> R </think> ws* <answer> A </answer> ws*
//! ```
//!
//! and under [`ResponseFormat::NoThink`] iff it is `ws* <answer> A </answer> ws*`,
//! where `ws` is whitespace (Unicode `White_Space`, what `\s` matches in
//! Python and in the `regex` crate) and the block contents `R` and `A`
//! contain none of the four tags and at least one non-whitespace character.
//!
//! # Against the reference implementations
//!
//! R1-V and Med-R1 (the paper's lineage) score the format with
//! `re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", content, re.DOTALL)`;
//! TRL's `think_format_reward` uses `re.match(r"^<think>(?!.*<think>)(.*?)</think>.*$", ..)`,
//! open-r1's `format_reward` `re.match(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", ..)`.
//! We keep the full match's shape (one reasoning block, whitespace, one
//! answer block, nothing else) and differ on purpose where the regex accepts
//! more than it means:
//!
//! - **Repeated or nested tags are not the format.** Anchored at both ends,
//!   the lazy `.*?` still stretches across tags, so
//!   `<think>x</think><answer>B</answer><answer>A</answer>` and
//!   `<think>a<think>b</think>c</think><answer>B</answer>` pass the full
//!   match: one reasoning and one answer is the intent, and these are exactly
//!   the completions whose answer is ambiguous. (TRL's lookahead
//!   `(?!.*<think>)` rejects a second `<think>` for the same reason.)
//! - **Empty blocks are not the format.** `.*?` also matches nothing, so the
//!   full match pays the format reward for `<think></think><answer>B</answer>`:
//!   a policy that skips the reasoning the think prompt asks for, which the
//!   judge then has nothing of to judge.
//! - **Whitespace around the whole completion is allowed.** The full match
//!   rejects a leading space or a trailing newline. They carry nothing (the
//!   prompt forbids "extra information or text outside of these tags"), come
//!   and go with decoding details (a `\n` before `<|im_end|>`), and a reward
//!   that depends on them trains the model on whitespace.
//!
//! Whitespace inside the blocks and between `</think>` and `<answer>` is
//! free, as in all three references.
//!
//! # Which answer
//!
//! [`Completion::first_answer_block`]: the first `<answer>` whose next tag is
//! `</answer>` (R1-V's accuracy reward also reads the first,
//! `re.search(r"<answer>(.*?)</answer>")`). A well-formed completion has
//! exactly one answer block, so the answer the format accepts is the answer
//! that is scored; a malformed completion is still scored on its first block
//! (format and answer are separate rewards and separate metrics).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The shape a prompt asks the completion to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Ask for `<think>...</think><answer>...</answer>` (GRPO format).
    Think,
    /// Ask for `<answer>...</answer>` only.
    NoThink,
}

/// The four tags of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    ThinkOpen,
    ThinkClose,
    AnswerOpen,
    AnswerClose,
}

impl Tag {
    pub const ALL: [Tag; 4] = [Tag::ThinkOpen, Tag::ThinkClose, Tag::AnswerOpen, Tag::AnswerClose];

    pub fn as_str(self) -> &'static str {
        match self {
            Tag::ThinkOpen => "<think>",
            Tag::ThinkClose => "</think>",
            Tag::AnswerOpen => "<answer>",
            Tag::AnswerClose => "</answer>",
        }
    }
}

/// A tag or the text between two tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    Tag(Tag),
    Text,
}

/// A piece and its byte range in the completion.
#[derive(Debug, Clone, Copy)]
struct Span {
    piece: Piece,
    start: usize,
    end: usize,
}

/// The blocks of a well-formed completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks<'a> {
    /// The `<think>` content, trimmed (None under [`ResponseFormat::NoThink`]).
    pub reasoning: Option<&'a str>,
    /// The `<answer>` content, trimmed.
    pub answer: &'a str,
}

/// An `<answer>`, the text up to the next tag, and that tag being `</answer>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerBlock<'a> {
    /// The block with its tags (`<answer> B </answer>`): what an answer regex searches.
    pub tagged: &'a str,
    /// The text between the tags, untrimmed.
    pub content: &'a str,
}

/// A completion cut at its tags.
#[derive(Debug, Clone)]
pub struct Completion<'a> {
    text: &'a str,
    spans: Vec<Span>,
}

const THINK_SHAPE: [Piece; 6] = [
    Piece::Tag(Tag::ThinkOpen),
    Piece::Text,
    Piece::Tag(Tag::ThinkClose),
    Piece::Tag(Tag::AnswerOpen),
    Piece::Text,
    Piece::Tag(Tag::AnswerClose),
];
const NO_THINK_SHAPE: [Piece; 3] = [Piece::Tag(Tag::AnswerOpen), Piece::Text, Piece::Tag(Tag::AnswerClose)];

impl<'a> Completion<'a> {
    pub fn parse(text: &'a str) -> Self {
        let mut spans = Vec::new();
        let mut text_start = 0;
        let mut at = 0;
        while let Some(offset) = text[at..].find('<') {
            let pos = at + offset;
            match Tag::ALL.into_iter().find(|t| text[pos..].starts_with(t.as_str())) {
                Some(tag) => {
                    if pos > text_start {
                        spans.push(Span { piece: Piece::Text, start: text_start, end: pos });
                    }
                    let end = pos + tag.as_str().len();
                    spans.push(Span { piece: Piece::Tag(tag), start: pos, end });
                    (at, text_start) = (end, end);
                }
                None => at = pos + 1,
            }
        }
        if text_start < text.len() {
            spans.push(Span { piece: Piece::Text, start: text_start, end: text.len() });
        }
        Self { text, spans }
    }

    /// The completion as given.
    pub fn text(&self) -> &'a str {
        self.text
    }

    fn slice(&self, s: &Span) -> &'a str {
        &self.text[s.start..s.end]
    }

    /// The blocks when the completion is in `format` (see the module doc), else None.
    pub fn blocks(&self, format: ResponseFormat) -> Option<Blocks<'a>> {
        // Whitespace-only text may stand anywhere the rule allows `ws*`; dropped
        // inside a block, it leaves two tags adjacent, which no shape allows.
        let solid: Vec<&Span> =
            self.spans.iter().filter(|s| s.piece != Piece::Text || !self.slice(s).trim().is_empty()).collect();
        let shape: &[Piece] = match format {
            ResponseFormat::Think => &THINK_SHAPE,
            ResponseFormat::NoThink => &NO_THINK_SHAPE,
        };
        if !solid.iter().map(|s| s.piece).eq(shape.iter().copied()) {
            return None;
        }
        let content = |i: usize| self.slice(solid[i]).trim();
        Some(match format {
            ResponseFormat::Think => Blocks { reasoning: Some(content(1)), answer: content(4) },
            ResponseFormat::NoThink => Blocks { reasoning: None, answer: content(1) },
        })
    }

    /// The format rule: is the completion in `format`?
    pub fn is_well_formed(&self, format: ResponseFormat) -> bool {
        self.blocks(format).is_some()
    }

    /// The first `<answer>` whose next tag is `</answer>`; None when there is none.
    pub fn first_answer_block(&self) -> Option<AnswerBlock<'a>> {
        self.spans.iter().enumerate().filter(|(_, s)| s.piece == Piece::Tag(Tag::AnswerOpen)).find_map(|(i, open)| {
            let next = match self.spans.get(i + 1) {
                Some(s) if s.piece == Piece::Text => self.spans.get(i + 2),
                other => other,
            };
            let close = next.filter(|s| s.piece == Piece::Tag(Tag::AnswerClose))?;
            Some(AnswerBlock { tagged: &self.text[open.start..close.end], content: &self.text[open.end..close.start] })
        })
    }

    pub fn has_tag(&self, tag: Tag) -> bool {
        self.spans.iter().any(|s| s.piece == Piece::Tag(tag))
    }
}

/// [`Completion::is_well_formed`] of `text`.
pub fn is_well_formed(text: &str, format: ResponseFormat) -> bool {
    Completion::parse(text).is_well_formed(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (completion, well formed under think, under no-think, first answer block content).
    const TABLE: &[(&str, bool, bool, Option<&str>)] = &[
        ("<think>lung window</think><answer>B</answer>", true, false, Some("B")),
        ("<think>x</think>\n\n<answer> B </answer>", true, false, Some(" B ")),
        ("<think>\nstep 1\nstep 2\n</think>\n<answer>\nB\n</answer>", true, false, Some("\nB\n")),
        // Whitespace around the whole completion (full match: rejected).
        (" <think>x</think><answer>B</answer>", true, false, Some("B")),
        ("<think>x</think><answer>B</answer>\n", true, false, Some("B")),
        ("\u{a0}\t<think>x</think> \u{3000}<answer>B</answer>\r\n", true, false, Some("B")),
        // Text outside the blocks.
        ("Sure! <think>x</think><answer>B</answer>", false, false, Some("B")),
        ("<think>x</think><answer>B</answer> done", false, false, Some("B")),
        ("<think>x</think> so: <answer>B</answer>", false, false, Some("B")),
        // Two answer blocks (full match: accepted); the first is the answer.
        ("<think>x</think><answer>B</answer><answer>A</answer>", false, false, Some("B")),
        ("<think>x</think><answer>A</answer>\n<answer>B</answer>", false, false, Some("A")),
        // Nested or repeated think (full match: accepted).
        ("<think>a<think>b</think>c</think><answer>B</answer>", false, false, Some("B")),
        ("<think>a</think><think>b</think><answer>B</answer>", false, false, Some("B")),
        // An answer rehearsed inside the reasoning: the first block is read.
        ("<think>maybe <answer>A</answer></think><answer>B</answer>", false, false, Some("A")),
        // Unclosed or missing tags.
        ("<think>x</think><answer>B", false, false, None),
        ("<think>x<answer>B</answer>", false, false, Some("B")),
        ("x</think><answer>B</answer>", false, false, Some("B")),
        ("</answer> B <answer>", false, false, None),
        ("<answer>A<answer>B</answer>", false, false, Some("B")),
        // Empty blocks (full match: accepted).
        ("<think></think><answer>B</answer>", false, false, Some("B")),
        ("<think> \n </think><answer>B</answer>", false, false, Some("B")),
        ("<think>x</think><answer></answer>", false, false, Some("")),
        ("<think>x</think><answer>  </answer>", false, false, Some("  ")),
        // Blocks in the wrong order.
        ("<answer>B</answer><think>x</think>", false, false, Some("B")),
        // Tag look-alikes are text.
        ("<Think>x</Think><answer>B</answer>", false, false, Some("B")),
        ("<think>x</think><answer >B</answer>", false, false, None),
        ("<think>a < b > c</think><answer>B</answer>", true, false, Some("B")),
        // No-think completions.
        ("<answer>B</answer>", false, true, Some("B")),
        ("  <answer>B</answer>\n", false, true, Some("B")),
        ("The answer is <answer>B</answer>", false, false, Some("B")),
        ("", false, false, None),
        ("The answer is B.", false, false, None),
    ];

    #[test]
    fn tricky_completions_follow_the_rule() {
        for &(text, think, no_think, answer) in TABLE {
            let c = Completion::parse(text);
            assert_eq!(c.is_well_formed(ResponseFormat::Think), think, "think format of {text:?}");
            assert_eq!(c.is_well_formed(ResponseFormat::NoThink), no_think, "no-think format of {text:?}");
            assert_eq!(c.first_answer_block().map(|b| b.content), answer, "first answer of {text:?}");
            if let Some(b) = c.first_answer_block() {
                assert_eq!(b.tagged, format!("<answer>{}</answer>", b.content));
            }
        }
    }

    #[test]
    fn blocks_of_a_well_formed_completion_are_its_reasoning_and_answer() {
        let c = Completion::parse(" <think>\n bullae: emphysema \n</think>\n<answer> B </answer>\n");
        assert_eq!(c.blocks(ResponseFormat::Think), Some(Blocks { reasoning: Some("bullae: emphysema"), answer: "B" }));
        assert_eq!(c.blocks(ResponseFormat::NoThink), None);
        let c = Completion::parse("<answer> B </answer>");
        assert_eq!(c.blocks(ResponseFormat::NoThink), Some(Blocks { reasoning: None, answer: "B" }));
        // The one answer block of a well-formed completion is the first one.
        for &(text, think, no_think, _) in TABLE {
            let c = Completion::parse(text);
            for (ok, format) in [(think, ResponseFormat::Think), (no_think, ResponseFormat::NoThink)] {
                if ok {
                    let (blocks, first) = (c.blocks(format).unwrap(), c.first_answer_block().unwrap());
                    assert_eq!(blocks.answer, first.content.trim(), "{text:?}");
                }
            }
        }
    }

    #[test]
    fn parse_keeps_multibyte_text_intact() {
        let c = Completion::parse("<think>é < ü</think><answer>Ω</answer>");
        assert_eq!(c.blocks(ResponseFormat::Think).map(|b| (b.reasoning, b.answer)), Some((Some("é < ü"), "Ω")));
        assert!(c.has_tag(Tag::ThinkOpen) && !Completion::parse("<thin").has_tag(Tag::ThinkOpen));
    }
}
