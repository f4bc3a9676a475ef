//! Recipe errors, rendered like rustc/cargo diagnostics:
//!
//! ```text
//! error: unknown parameter `box_min_aera` for stage `slices` (kind `lesion_slices`)
//!   --> recipes/mini.toml:12:1
//!    |
//! 12 | box_min_aera = 1300
//!    | ^^^^^^^^^^^^
//!    = help: did you mean `box_min_area`?
//! ```
//!
//! Whatever the input, the rendering stays short: the source line is shown
//! as a window of at most [`EXCERPT_CHARS`] characters around the column
//! (`...` where it is cut, as rustc does), a word of the message, help or
//! notes (a quoted value, a name) at most [`WORD_CHARS`] characters, and
//! each text at most [`TEXT_CHARS`] characters (cut in the middle), so a
//! 1 MB string or a 100 000-deep array gives a few lines, not megabytes,
//! and the words around a long value (what was expected) stay.

use std::fmt;

use super::source::{Origin, SourceLoc, SourceMap};

/// Widest excerpt of a source line an error shows.
pub const EXCERPT_CHARS: usize = 100;
/// Characters kept before the column when a long line is cut.
const CONTEXT_BEFORE: usize = 30;
/// Longest message, help or note an error shows.
pub const TEXT_CHARS: usize = 400;
/// Longest run of non-space characters a message, help or note shows:
/// long enough for any real path, short enough that a pasted value leaves
/// room for the rest of the sentence.
pub const WORD_CHARS: usize = 120;
/// Marks where an excerpt or a text was cut.
const CUT: &str = "...";

/// Anything wrong with a recipe, located where it was written.
///
/// Boxed: it travels through every `Result` of the loader and should stay
/// one pointer wide.
#[derive(Debug, Clone)]
pub struct RecipeError(Box<Inner>);

#[derive(Debug, Clone)]
struct Inner {
    message: String,
    loc: Option<SourceLoc>,
    /// The excerpt of the line `loc` points into (kept so `Display` needs no
    /// I/O; cut when it is made, so an error never holds a megabyte line).
    excerpt: Option<Excerpt>,
    help: Option<String>,
    notes: Vec<String>,
}

impl RecipeError {
    /// An error without a location (e.g. the recipe file cannot be read).
    pub fn new(message: impl Into<String>) -> Self {
        Self(Box::new(Inner { message: message.into(), loc: None, excerpt: None, help: None, notes: Vec::new() }))
    }

    pub(crate) fn at(sources: &SourceMap, origin: &Origin, message: impl Into<String>) -> Self {
        let (loc, line) = sources.locate(origin);
        let mut err = Self::new(message);
        err.0.excerpt = Some(excerpt(&line, loc.col, loc.len));
        err.0.loc = Some(loc);
        err
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.0.help = Some(help.into());
        self
    }

    pub fn with_help_opt(self, help: Option<String>) -> Self {
        match help {
            Some(h) => self.with_help(h),
            None => self,
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.0.notes.push(note.into());
        self
    }

    /// The one-line message, without location or hints.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    pub fn loc(&self) -> Option<&SourceLoc> {
        self.0.loc.as_ref()
    }

    pub fn help(&self) -> Option<&str> {
        self.0.help.as_deref()
    }

    pub fn notes(&self) -> &[String] {
        &self.0.notes
    }
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let this = &self.0;
        write!(f, "error: {}", shorten(&this.message))?;
        let gutter = match &this.loc {
            Some(loc) => loc.line.to_string().len(),
            None => 0,
        };
        let pad = " ".repeat(gutter);
        if let Some(loc) = &this.loc {
            write!(f, "\n{pad}--> {loc}")?;
            if let Some(Excerpt { text, indent, carets }) = &this.excerpt {
                let indent = " ".repeat(*indent);
                let carets = "^".repeat(*carets);
                write!(f, "\n{pad} |\n{} | {text}\n{pad} | {indent}{carets}", loc.line)?;
            }
        }
        for note in &this.notes {
            write!(f, "\n{pad} = note: {}", shorten(note))?;
        }
        if let Some(help) = &this.help {
            write!(f, "\n{pad} = help: {}", shorten(help))?;
        }
        Ok(())
    }
}

/// What an error shows of its source line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Excerpt {
    text: String,
    /// Spaces before the first caret.
    indent: usize,
    carets: usize,
}

/// The part of `line` to show for a span at 1-based character column
/// `col`, `len` characters long. A line
/// longer than [`EXCERPT_CHARS`] is cut to a window that starts a little
/// before the column, with [`CUT`] on each cut side; control characters
/// (tabs included) show as one space so the carets stay aligned.
fn excerpt(line: &str, col: usize, len: usize) -> Excerpt {
    let chars: Vec<char> = line.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let start_col = col.saturating_sub(1).min(chars.len());
    let len = len.max(1);
    if chars.len() <= EXCERPT_CHARS {
        return Excerpt { text: chars.iter().collect(), indent: start_col, carets: len };
    }
    let from = start_col.saturating_sub(CONTEXT_BEFORE).min(chars.len().saturating_sub(EXCERPT_CHARS));
    let to = (from + EXCERPT_CHARS).min(chars.len());
    let mut shown = String::new();
    let mut indent = start_col - from;
    if from > 0 {
        shown.push_str(CUT);
        indent += CUT.len();
    }
    shown.extend(&chars[from..to]);
    if to < chars.len() {
        shown.push_str(CUT);
    }
    // Carets end at the window (or one past the line, for a span at its end).
    let carets = len.min(to.saturating_sub(start_col)).max(1);
    Excerpt { text: shown, indent, carets }
}

/// A message, help or note as shown: long words cut, then the whole text.
fn shorten(text: &str) -> String {
    elide_middle(&elide_long_words(text, WORD_CHARS), TEXT_CHARS).into_owned()
}

/// `text` with every run of non-whitespace characters longer than `max`
/// cut in its middle to `max` characters ([`elide_middle`]).
fn elide_long_words(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    // Fast path: no word can be longer than `max` in a text that is not.
    if text.chars().count() <= max {
        return text.into();
    }
    let mut out = String::with_capacity(text.len().min(4 * TEXT_CHARS));
    let mut word_start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), word_start) {
            (false, None) => word_start = Some(i),
            (true, Some(start)) => {
                out.push_str(&elide_middle(&text[start..i], max));
                out.push(c);
                word_start = None;
            }
            (true, None) => out.push(c),
            (false, Some(_)) => {}
        }
    }
    if let Some(start) = word_start {
        out.push_str(&elide_middle(&text[start..], max));
    }
    out.into()
}

/// `text` if it has at most `max` characters; else its start and end with
/// [`CUT`] between them, `max` characters in all (the end of a message
/// often says what was expected).
fn elide_middle(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    let count = text.chars().count();
    if count <= max {
        return text.into();
    }
    let keep = max.saturating_sub(CUT.len());
    let head = keep * 2 / 3;
    let tail = keep - head;
    let head_end = text.char_indices().nth(head).map_or(text.len(), |(i, _)| i);
    let tail_start = text.char_indices().nth(count - tail).map_or(text.len(), |(i, _)| i);
    format!("{}{CUT}{}", &text[..head_end], &text[tail_start..]).into()
}

impl std::error::Error for RecipeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_rustc() {
        let mut map = SourceMap::default();
        let text = "[stage.slices]\n".repeat(11) + "box_min_aera = 1300\n";
        let id = map.add("recipes/mini.toml".into(), text.clone());
        let start = text.find("box_min_aera").unwrap();
        let err = RecipeError::at(
            &map,
            &Origin::new(id, start..start + 12),
            "unknown parameter `box_min_aera` for stage `slices` (kind `lesion_slices`)",
        )
        .with_help("did you mean `box_min_area`?");
        let expected = "\
error: unknown parameter `box_min_aera` for stage `slices` (kind `lesion_slices`)
  --> recipes/mini.toml:12:1
   |
12 | box_min_aera = 1300
   | ^^^^^^^^^^^^
   = help: did you mean `box_min_area`?";
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn long_lines_show_a_window_around_the_column() {
        let mut map = SourceMap::default();
        let value = "x".repeat(1_000_000);
        let text = format!("[stage.a]\ntext = \"{value}\" 3\n");
        let id = map.add("r.toml".into(), text.clone());
        let at = text.rfind('3').unwrap();
        let err = RecipeError::at(&map, &Origin::new(id, at..at + 1), "expected newline");
        let shown = err.to_string();
        assert!(shown.len() < 400, "{} bytes:\n{shown}", shown.len());
        let lines: Vec<&str> = shown.lines().collect();
        // The excerpt ends with the offending `3` and the caret sits under it.
        assert!(lines[3].ends_with("xxx\" 3"), "{shown}");
        assert!(lines[3].starts_with("2 | ..."), "{shown}");
        let caret = lines[4].find('^').unwrap();
        assert_eq!(lines[3].as_bytes()[caret], b'3', "{shown}");
        assert_eq!(lines[4].matches('^').count(), 1);
    }

    #[test]
    fn a_long_span_at_the_start_of_a_long_line_is_cut_on_the_right() {
        let cut = excerpt(&"a".repeat(5_000), 1, 5_000);
        assert_eq!((cut.indent, cut.carets), (0, EXCERPT_CHARS));
        assert_eq!(cut.text, format!("{}{CUT}", "a".repeat(EXCERPT_CHARS)));
        // Short lines are shown whole, tabs as spaces.
        assert_eq!(excerpt("a\tb = 1", 3, 1), Excerpt { text: "a b = 1".into(), indent: 2, carets: 1 });
    }

    #[test]
    fn long_messages_and_help_are_cut_in_the_middle() {
        let name = "n".repeat(100_000);
        let err = RecipeError::new(format!("invalid stage name `{name}`: expected at most 64 characters"))
            .with_help(format!("did you mean `{name}`?"))
            .with_note(name.clone());
        let shown = err.to_string();
        assert!(shown.len() < 3 * TEXT_CHARS + 100, "{} bytes", shown.len());
        assert!(shown.starts_with("error: invalid stage name `nnn"), "{shown}");
        assert!(shown.lines().next().unwrap().ends_with("nnn`: expected at most 64 characters"), "{shown}");
        assert_eq!(elide_middle("short", 10), "short");
        // A long value keeps the words around it (what was expected).
        let err = RecipeError::new(format!("invalid type: string \"{name}\", expected u64"));
        let shown = err.to_string();
        assert!(shown.len() < 200 && shown.ends_with("nnn\", expected u64"), "{shown}");
        assert_eq!(elide_long_words("a  bb\tccccccccc d", 7), "a  bb\tcc...cc d");
        let long = format!("{} /a/real/path.toml", "é".repeat(300));
        let shown = elide_long_words(&long, 20);
        assert!(shown.ends_with("éé /a/real/path.toml") && shown.chars().count() == 38, "{shown}");
        assert_eq!(elide_middle("ééééééééééé", 10).chars().count(), 10);
    }

    #[test]
    fn errors_without_location_are_one_line() {
        let err = RecipeError::new("cannot read `x.toml`: not found");
        assert_eq!(err.to_string(), "error: cannot read `x.toml`: not found");
        assert!(err.loc().is_none());
    }
}
